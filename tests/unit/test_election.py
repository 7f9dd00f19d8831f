"""vipd.core.election: the rule, its timers and its ordered actions, under virtual time.

Every test drives one `Election` by hand: `now` is passed explicitly, peer heartbeats are
built directly (no sockets, no crypto) and deadlines are asserted exactly. With
interval 0.04 and dead_after 8 the dead interval is DEAD = 0.32 s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.core.election import (
    TRANSITIONS,
    AcquireVips,
    Action,
    Announce,
    Command,
    CommandKind,
    CommandResult,
    DampingChanged,
    Election,
    ElectionConfig,
    Event,
    HealthChanged,
    HeartbeatReceived,
    ReleaseVips,
    RunHook,
    SendHeartbeat,
    Shutdown,
    Start,
    Tick,
    Transition,
    VipFailed,
    Warn,
)
from vipd.core.events import UNPLANNED_TAKEOVERS, DuplicateNode, Effect, Hook, VipsLost, Why
from vipd.core.protocol import Advert, Flag, Heartbeat, KeyRing, Received, Session, State

S, F, K = State, Flag, CommandKind
T0 = 1.0
INTERVAL = 0.04
DEAD = INTERVAL * 8
EPS = 1e-4
ECHO_AGE = 0.001  # the peer echoes one of our heartbeats sent this long ago


# --- helpers -----------------------------------------------------------------------------

def cfg(**kw: Any) -> ElectionConfig:
    base: dict[str, Any] = dict(node="a", priority=100, preempt=True, preempt_delay=0.0,
                                interval=INTERVAL, dead_after=8)
    base.update(kw)
    return ElectionConfig(**base)


def peer(now: float, state: State = S.STANDBY, flags: Flag = F.HEALTHY, *, term: int = 0,
         priority: int = 100, node: str = "b", hears: bool | float = True,
         digest: bytes = b"") -> HeartbeatReceived:
    """A heartbeat from the peer received at `now`.

    hears=True: it echoes one of ours (a confirmed heartbeat), False: it echoes nothing,
    a float: it echoes our heartbeat sent at that time (use an old one for a stale echo).
    """
    if hears is True:
        echo: float | None = now - ECHO_AGE
    elif hears is False:
        echo = None
    else:
        echo = hears
    hb = Heartbeat(
        state=state, flags=flags, key_id=1, newest_key_id=1, boot_id=0xB007, seq=1,
        send_time_ns=0, term=term, priority=priority, effective_priority=priority,
        settings_digest=digest, echo_boot=0, echo_seq=0, echo_hold_us=0, cluster="web",
        node=node,
    )
    return HeartbeatReceived(Received(heartbeat=hb, received_at=now, echo_sent_at=echo,
                                      rtt=None))


def started(*, health: bool | None = True, now: float = T0, **kw: Any) -> Election:
    e = Election(cfg(**kw))
    e.handle(Start(), now)
    if health is not None:
        e.handle(HealthChanged(health, "" if health else "probe web: 503"), now)
    return e


def active(*, term: int = 0, **kw: Any) -> tuple[Election, float]:
    """A node that took over alone at the end of its start-up hold-down (term + 1)."""
    e = Election(cfg(**kw), term=term)
    e.handle(Start(), T0)
    e.handle(HealthChanged(True), T0)
    now = T0 + DEAD
    e.handle(Tick(), now)
    assert e.state is S.ACTIVE
    return e, now


def standby_with_active_peer(**kw: Any) -> tuple[Election, float]:
    """A standby that hears (and is heard by) an active peer of term 1."""
    e = started(**kw)
    now = T0 + 0.01
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)
    assert e.state is (S.FAULT if kw.get("health") is False else S.STANDBY)
    return e, now


def advance(e: Election, until: float) -> list[Action]:
    """Tick at every deadline up to and including `until`."""
    actions: list[Action] = []
    while (d := e.next_deadline()) is not None and d <= until:
        actions += e.handle(Tick(), d)
    return actions


def due(e: Election) -> float:
    d = e.next_deadline()
    assert d is not None
    return d


def transitions(actions: Sequence[Action]) -> list[tuple[State, State]]:
    return [(a.old, a.new) for a in actions if isinstance(a, Transition)]


def adverts(actions: Sequence[Action]) -> list[Advert]:
    return [a.advert for a in actions if isinstance(a, SendHeartbeat)]


def only(actions: Sequence[Action], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def takeover_reason(actions: list[Action]) -> str:
    """The reason of the one takeover in `actions` (and nothing else moved)."""
    assert len(transitions(actions)) == 1, transitions(actions)
    (tr,) = only(actions, Transition)
    assert (tr.old, tr.new) == (S.STANDBY, S.ACTIVE)
    return tr.reason


def feed(e: Election, start: float, end: float, state: State = S.STANDBY,
         flags: Flag = F.HEALTHY, **kw: Any) -> tuple[list[Action], float]:
    """The peer sends a heartbeat every interval from `start` while before `end`; we tick.

    Returns the actions and the time of the last heartbeat.
    """
    actions: list[Action] = []
    t = start
    while t < end:
        actions += advance(e, t)
        actions += e.handle(peer(t, state, flags, **kw), t)
        last, t = t, t + INTERVAL
    return actions, last


def result(actions: list[Action]) -> CommandResult:
    (res,) = only(actions, CommandResult)
    return res


# --- TRANSITIONS: every entry the rule can produce, with its side effects ----------------

def _init_standby() -> tuple[Election, list[Action]]:
    e = Election(cfg())
    return e, e.handle(Start(), T0)


def _init_maintenance() -> tuple[Election, list[Action]]:
    e = Election(cfg(), maintenance=True)
    return e, e.handle(Start(), T0)


def _standby_active() -> tuple[Election, list[Action]]:
    e = started()
    return e, e.handle(Tick(), T0 + DEAD)


def _standby_event(event: Event) -> Callable[[], tuple[Election, list[Action]]]:
    def scenario() -> tuple[Election, list[Action]]:
        e = started()
        return e, e.handle(event, T0 + 0.1)
    return scenario


def _active_event(event: Event) -> Callable[[], tuple[Election, list[Action]]]:
    def scenario() -> tuple[Election, list[Action]]:
        e, now = active()
        return e, e.handle(event, now + 0.1)
    return scenario


def _active_standby() -> tuple[Election, list[Action]]:
    e, now = active(term=4)  # a fresh takeover (term 5) against a settled active: we yield
    return e, e.handle(peer(now + 0.1, S.ACTIVE, F.HEALTHY | F.SETTLED, term=2), now + 0.1)


def _fault_event(event: Event) -> Callable[[], tuple[Election, list[Action]]]:
    def scenario() -> tuple[Election, list[Action]]:
        e = started(health=False)
        assert e.state is S.FAULT
        return e, e.handle(event, T0 + 0.1)
    return scenario


def _maintenance_event(*events: Event) -> Callable[[], tuple[Election, list[Action]]]:
    def scenario() -> tuple[Election, list[Action]]:
        e = Election(cfg(), maintenance=True)
        e.handle(Start(), T0)
        actions: list[Action] = []
        for event in events:
            actions = e.handle(event, T0 + 0.1)
        return e, actions
    return scenario


SCENARIOS: dict[tuple[State, State], Callable[[], tuple[Election, list[Action]]]] = {
    (S.INIT, S.STANDBY): _init_standby,
    (S.INIT, S.MAINTENANCE): _init_maintenance,
    (S.STANDBY, S.ACTIVE): _standby_active,
    (S.STANDBY, S.FAULT): _standby_event(HealthChanged(False, "probe web: 503")),
    (S.STANDBY, S.MAINTENANCE): _standby_event(Command(K.MAINTENANCE_ON)),
    (S.STANDBY, S.STOPPED): _standby_event(Shutdown()),
    (S.ACTIVE, S.STANDBY): _active_standby,
    (S.ACTIVE, S.FAULT): _active_event(HealthChanged(False, "probe web: 503")),
    (S.ACTIVE, S.MAINTENANCE): _active_event(Command(K.MAINTENANCE_ON)),
    (S.ACTIVE, S.STOPPED): _active_event(Shutdown()),
    (S.FAULT, S.STANDBY): _fault_event(HealthChanged(True)),
    (S.FAULT, S.MAINTENANCE): _fault_event(Command(K.MAINTENANCE_ON)),
    (S.FAULT, S.STOPPED): _fault_event(Shutdown()),
    (S.MAINTENANCE, S.STANDBY): _maintenance_event(Command(K.MAINTENANCE_OFF)),
    (S.MAINTENANCE, S.FAULT): _maintenance_event(HealthChanged(False),
                                                 Command(K.MAINTENANCE_OFF)),
    (S.MAINTENANCE, S.STOPPED): _maintenance_event(Shutdown()),
}
# Start always enters STANDBY or MAINTENANCE first; see test_init_only_leaves_via_start.
UNREACHABLE = {(S.INIT, S.FAULT), (S.INIT, S.STOPPED)}


def test_scenarios_cover_every_reachable_transition() -> None:
    assert set(SCENARIOS) | UNREACHABLE == set(TRANSITIONS)
    assert not set(SCENARIOS) & UNREACHABLE


_EFFECT_TYPES = {Effect.ACQUIRE: AcquireVips, Effect.RELEASE: ReleaseVips}


@pytest.mark.parametrize("edge", list(SCENARIOS), ids=lambda k: f"{k[0].name}->{k[1].name}")
def test_transition_side_effects_follow_the_table(edge: tuple[State, State]) -> None:
    e, actions = SCENARIOS[edge]()
    new = edge[1]
    assert transitions(actions) == [edge]
    if isinstance(actions[0], CommandResult):
        actions = actions[1:]
    assert isinstance(actions[0], Transition)
    assert e.state is new
    effects = TRANSITIONS[edge]
    # The non-heartbeat effects, in table order, follow the Transition.
    expected: list[tuple[type, Any]] = []
    for effect in effects:
        if isinstance(effect, Hook):
            expected.append((RunHook, effect))
        elif effect is not Effect.HEARTBEAT:
            expected.append((_EFFECT_TYPES[effect], None))
    # Flap damping's notice of a failure (DampingChanged) is not an effect of the edge.
    got = [(type(a), a.hook if isinstance(a, RunHook) else None) for a in actions[1:]
           if not isinstance(a, SendHeartbeat | CommandResult | DampingChanged)]
    assert got == expected
    for hook in only(actions, RunHook):
        assert (hook.state, hook.term) == (new, e.term)
    sends = adverts(actions)
    if Effect.HEARTBEAT in effects:
        assert len(sends) == 1
        assert sends[0].state is new
    else:
        assert sends == []
    if Effect.RELEASE in effects:
        kinds = [type(a) for a in actions]
        assert kinds.index(ReleaseVips) < kinds.index(SendHeartbeat)


def test_init_only_leaves_via_start() -> None:
    """INIT -> FAULT / STOPPED are in the table but Start always passes through STANDBY."""
    e = Election(cfg())
    assert e.handle(HealthChanged(False), T0) == []
    assert e.handle(Shutdown(), T0) == []
    assert e.state is S.INIT and e.next_deadline() is None
    actions = e.handle(Start(), T0)
    assert transitions(actions) == [(S.INIT, S.STANDBY), (S.STANDBY, S.STOPPED)]


def test_takeover_actions_exact_order() -> None:
    """Takeover: Transition, AcquireVips (whose executor announces), on_active hook,
    SendHeartbeat (ACTIVE).

    A step ends with its one heartbeat, carrying the step's final state (see TRANSITIONS);
    the runtime starts hooks as background tasks, so they never delay it.
    """
    e = Election(cfg(), term=3)
    e.handle(Start(), T0)
    e.handle(HealthChanged(True), T0)
    now = T0 + 0.05
    actions = e.handle(peer(now, S.ACTIVE, F.HEALTHY | F.RESIGNING, term=7), now)
    assert [type(a) for a in actions] == [Transition, AcquireVips, RunHook, SendHeartbeat]
    tr, acq, hook, send = actions
    assert isinstance(tr, Transition) and isinstance(acq, AcquireVips)
    assert isinstance(send, SendHeartbeat) and isinstance(hook, RunHook)
    assert (tr.old, tr.new, tr.term) == (S.STANDBY, S.ACTIVE, 8)
    assert tr.reason == "peer b hands over"
    assert acq.term == 8
    assert (send.advert.state, send.advert.term) == (S.ACTIVE, 8)
    assert (hook.hook, hook.state, hook.term) == (Hook.ON_ACTIVE, S.ACTIVE, 8)
    assert tr.why is Why.PEER_HANDOVER


@pytest.mark.parametrize(
    ("own", "peer_term", "expected"),
    [(0, 0, 1), (3, 7, 8), (9, 2, 10), (5, 5, 6)],
    ids=["fresh", "peer-higher", "own-higher", "equal"],
)
def test_takeover_term_is_max_plus_one(own: int, peer_term: int, expected: int) -> None:
    e = Election(cfg(), term=own)
    e.handle(Start(), T0)
    e.handle(HealthChanged(True), T0)
    now = T0 + 0.01
    actions = e.handle(peer(now, S.FAULT, F.NONE, term=peer_term), now)
    assert e.state is S.ACTIVE and e.term == expected
    assert only(actions, AcquireVips) == [AcquireVips(expected)]


@pytest.mark.parametrize(
    ("make", "event"),
    [
        (lambda: active(), HealthChanged(False, "x")),
        (lambda: active(), Command(K.MAINTENANCE_ON)),
        (lambda: active(), Shutdown()),
        (lambda: active(), VipFailed("netlink: EPERM")),
        (lambda: active(term=4), peer(T0 + DEAD + 0.1, S.ACTIVE, F.HEALTHY | F.SETTLED,
                                      term=2)),
    ],
    ids=["fault", "maintenance", "shutdown", "vip-failed", "split-brain"],
)
def test_leaving_active_releases_before_the_heartbeat(
    make: Callable[[], tuple[Election, float]], event: Event
) -> None:
    e, now = make()
    actions = [a for a in e.handle(event, now + 0.1) if not isinstance(a, CommandResult)]
    kinds = [type(a) for a in actions]
    assert kinds[0] is Transition and kinds.count(ReleaseVips) == 1
    assert kinds.index(ReleaseVips) == 1
    assert kinds.index(ReleaseVips) < kinds.index(SendHeartbeat)
    assert AcquireVips not in kinds
    assert adverts(actions)[0].state is e.state is not S.ACTIVE


# --- 1. start ----------------------------------------------------------------------------

def test_start_enters_standby_and_sends() -> None:
    e = Election(cfg())
    assert e.next_deadline() is None
    actions = e.handle(Start(), T0)
    assert actions == [Transition(S.INIT, S.STANDBY, Why.START, "started", 0),
                       SendHeartbeat(Advert(S.STANDBY, F.PREEMPT | F.HEALTH_PENDING, 0,
                                            100, 100))]


def test_start_in_maintenance() -> None:
    e = Election(cfg(), maintenance=True)
    actions = e.handle(Start(), T0)
    assert transitions(actions) == [(S.INIT, S.MAINTENANCE)]
    e.handle(HealthChanged(True), T0)
    assert advance(e, T0 + 5) and e.state is S.MAINTENANCE


def test_start_twice_is_ignored() -> None:
    e = started()
    assert transitions(e.handle(Start(), T0 + 0.1)) == []


def test_no_peer_takeover_exactly_after_one_dead_interval() -> None:
    e = started()
    assert e.next_deadline() == T0 + INTERVAL / 8  # the start burst comes first
    acts = advance(e, T0 + DEAD - EPS)
    assert transitions(acts) == []
    assert e.next_deadline() == T0 + DEAD
    assert transitions(e.handle(Tick(), T0 + DEAD - EPS)) == []
    actions = e.handle(Tick(), T0 + DEAD)
    assert takeover_reason(actions) == "no peer heard within 320 ms of start"
    assert e.state is S.ACTIVE and e.term == 1


def test_confirmed_heartbeat_ends_the_holddown() -> None:
    e = started()
    now = T0 + 0.02
    actions = e.handle(peer(now, S.FAULT, F.NONE, hears=True), now)
    assert takeover_reason(actions) == "peer b is FAULT"


def test_unconfirmed_heartbeat_does_not_end_the_holddown() -> None:
    e = started()
    now = T0 + 0.02
    assert transitions(e.handle(peer(now, S.FAULT, F.NONE, hears=False), now)) == []
    now2 = T0 + 0.2
    assert transitions(advance(e, now2)) == []
    assert transitions(e.handle(peer(now2, S.FAULT, F.NONE, hears=False), now2)) == []
    acts = advance(e, T0 + DEAD - EPS)
    assert transitions(acts) == []
    actions = e.handle(Tick(), T0 + DEAD)
    assert takeover_reason(actions) == "peer b is FAULT"


def test_holddown_deadline_offered_until_peer_confirmed() -> None:
    e = started()
    advance(e, T0 + 0.1)
    e.handle(peer(T0 + 0.1, S.ACTIVE, F.HEALTHY, term=1, hears=False), T0 + 0.1)
    advance(e, T0 + DEAD - 0.01)
    assert e.next_deadline() == T0 + DEAD
    e.handle(peer(T0 + 0.31, S.ACTIVE, F.HEALTHY, term=1, hears=True), T0 + 0.31)
    assert due(e) > T0 + DEAD


def test_holddown_with_unconfirmed_active_peer_stays_standby() -> None:
    e = started()
    acts, _ = feed(e, T0 + INTERVAL, T0 + 2, S.ACTIVE, term=1, hears=False)
    assert transitions(acts) == [] and e.state is S.STANDBY


# --- 2. health ---------------------------------------------------------------------------

def test_unknown_health_never_takes_over() -> None:
    e = started(health=None)
    acts = advance(e, T0 + 3)
    now = T0 + 3
    acts += e.handle(peer(now, S.FAULT, F.NONE), now)
    acts += advance(e, now + 3)
    assert e.state is S.STANDBY
    assert not only(acts, AcquireVips)
    assert all(F.HEALTHY not in a.flags for a in adverts(acts))


def test_health_false_from_standby() -> None:
    e = started()
    actions = e.handle(HealthChanged(False, "probe web: 503"), T0 + 0.1)
    assert actions[0] == Transition(S.STANDBY, S.FAULT, Why.HEALTH,
                                    "health check failing: probe web: 503",
                                    0)
    assert only(actions, RunHook) == [RunHook("on_fault", S.FAULT, 0)]
    assert adverts(actions)[0].flags == F.PREEMPT


def test_health_false_from_active_releases_then_fault_hook() -> None:
    e, now = active()
    actions = e.handle(HealthChanged(False, "probe web: 503"), now + 0.1)
    assert actions[0] == Transition(S.ACTIVE, S.FAULT, Why.HEALTH,
                                    "health check failing: probe web: 503",
                                    1)
    assert actions[1] == ReleaseVips()
    assert only(actions, RunHook) == [RunHook("on_fault", S.FAULT, 1)]
    assert not only(actions, AcquireVips)


def test_health_back_goes_standby_then_active_in_one_call() -> None:
    e = started(health=False)
    advance(e, T0 + 1)
    assert e.state is S.FAULT
    actions = e.handle(HealthChanged(True), T0 + 1)
    assert transitions(actions) == [(S.FAULT, S.STANDBY), (S.STANDBY, S.ACTIVE)]
    assert only(actions, Transition)[0].reason == "healthy again"
    assert [h.hook for h in only(actions, RunHook)] == ["on_standby", "on_active"]
    assert [a.state for a in adverts(actions)] == [S.ACTIVE]


def test_health_back_during_holddown_stays_standby() -> None:
    e = started(health=False)
    actions = e.handle(HealthChanged(True), T0 + 0.1)
    assert transitions(actions) == [(S.FAULT, S.STANDBY)]
    assert only(actions, RunHook) == [RunHook("on_standby", S.STANDBY, 0)]


def test_health_unknown_on_active_keeps_vips_but_drops_healthy_flag() -> None:
    e, now = active()
    actions = e.handle(HealthChanged(None), now + 0.1)
    assert transitions(actions) == []
    assert e.state is S.ACTIVE
    assert F.HEALTHY not in e.advert().flags


# --- 3. peer dead / ineligible -----------------------------------------------------------

def test_peer_dead_exactly_at_dead_interval() -> None:
    e, _ = standby_with_active_peer()
    last = T0 + 1.0
    e.handle(peer(last, S.ACTIVE, F.HEALTHY, term=1), last)
    advance(e, last + DEAD - 0.01)
    assert e.next_deadline() == last + DEAD
    assert transitions(e.handle(Tick(), last + DEAD - EPS)) == []
    actions = e.handle(Tick(), last + DEAD)
    assert takeover_reason(actions) == "peer b silent for 320 ms"
    assert e.term == 2


INELIGIBLE = [
    (S.FAULT, F.HEALTHY, "peer b is FAULT"),
    (S.FAULT, F.NONE, "peer b is FAULT"),
    (S.MAINTENANCE, F.HEALTHY, "peer b is MAINTENANCE"),
    (S.STOPPED, F.HEALTHY, "peer b is STOPPED"),
    (S.INIT, F.HEALTHY, "peer b is INIT"),
    (S.STANDBY, F.NONE, "peer b is unhealthy"),
    (S.ACTIVE, F.HEALTHY | F.RESIGNING, "peer b hands over"),
    (S.ACTIVE, F.HEALTHY | F.RESIGNING | F.SWITCHOVER, "peer b hands over"),
    (S.ACTIVE, F.HEALTHY | F.PREFERRED | F.RESIGNING, "peer b hands over"),
]


@pytest.mark.parametrize(("state", "flags", "reason"), INELIGIBLE,
                         ids=[f"{s.name}-{f!r}" for s, f, _ in INELIGIBLE])
def test_ineligible_peer_means_immediate_takeover(state: State, flags: Flag,
                                                  reason: str) -> None:
    e = started()
    now = T0 + 0.05
    actions = e.handle(peer(now, state, flags, term=1, priority=200), now)
    assert takeover_reason(actions) == reason
    assert e.state is S.ACTIVE
    preferred = (F.RESIGNING | F.SWITCHOVER) in flags
    assert e.preferred is preferred
    assert (F.PREFERRED in adverts(actions)[0].flags) is preferred


# --- 4. both healthy standbys ------------------------------------------------------------

ELECTION = [
    ("a", 150, "b", 100, True),
    ("a", 100, "b", 150, False),
    ("a", 100, "b", 100, True),
    ("b", 100, "a", 100, False),
    ("ab", 100, "a", 100, False),
    ("a", 100, "ab", 100, True),
    ("z", 200, "a", 199, True),
]


@pytest.mark.parametrize(("node", "prio", "peer_node", "peer_prio", "wins"), ELECTION,
                         ids=[f"{n}{p}-vs-{pn}{pp}" for n, p, pn, pp, _ in ELECTION])
def test_election_between_healthy_standbys(node: str, prio: int, peer_node: str,
                                           peer_prio: int, wins: bool) -> None:
    e = started(node=node, priority=prio)
    now = T0 + 0.05
    actions = e.handle(peer(now, S.STANDBY, F.HEALTHY, priority=peer_prio, node=peer_node),
                       now)
    if wins:
        assert takeover_reason(actions) == "election: we have priority over the standby peer"
    else:
        assert transitions(actions) == []
        assert e.state is S.STANDBY


def test_loser_takes_over_when_winner_idles_one_dead_interval() -> None:
    e = started(priority=100)
    first = T0 + 0.05
    acts, _ = feed(e, first, first + DEAD, priority=150)
    acts += advance(e, first + DEAD - EPS)
    assert transitions(acts) == [] and e.state is S.STANDBY
    assert e.next_deadline() == first + DEAD
    assert transitions(e.handle(Tick(), first + DEAD - EPS)) == []
    actions = e.handle(Tick(), first + DEAD)
    assert takeover_reason(actions) == "peer b won the election but did not take over"


def test_winner_idle_timer_restarts_when_the_winner_acts() -> None:
    e = started(priority=100)
    first = T0 + 0.05
    acts, _ = feed(e, first, first + 0.2, priority=150)
    mid = first + 0.2
    acts += e.handle(peer(mid, S.ACTIVE, F.HEALTHY, term=1, priority=150), mid)
    later = mid + 0.1
    more, _ = feed(e, later, later + DEAD, term=1, priority=150)
    acts += more + advance(e, later + DEAD - EPS)
    assert transitions(acts) == []
    assert e.next_deadline() == later + DEAD
    actions = e.handle(Tick(), later + DEAD)
    assert takeover_reason(actions) == "peer b won the election but did not take over"


# --- 5. preemption -----------------------------------------------------------------------

def test_preempt_sets_want_active_exactly_after_delay() -> None:
    e = started(priority=150, preempt_delay=0.1)
    now = T0 + 0.01
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)
    acts = advance(e, now + 0.1 - EPS)
    assert acts and not any(F.WANT_ACTIVE in a.flags for a in adverts(acts))
    assert e.next_deadline() == now + 0.1
    assert e.handle(Tick(), now + 0.1 - EPS) == []
    assert F.WANT_ACTIVE not in e.advert().flags
    actions = e.handle(Tick(), now + 0.1)
    (sent,) = adverts(actions)
    assert F.WANT_ACTIVE in sent.flags and sent.state is S.STANDBY
    assert transitions(actions) == []
    assert e.next_deadline() == now + 0.1 + INTERVAL / 8  # a fresh burst carries it


def test_preempt_zero_delay_is_immediate() -> None:
    e = started(priority=150)
    now = T0 + 0.01
    actions = e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)
    assert F.WANT_ACTIVE in adverts(actions)[0].flags
    assert due(e) > now


NO_PREEMPT: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("peer-preferred", {}, {"flags": F.HEALTHY | F.PREFERRED}),
    ("peer-does-not-hear", {}, {"hears": False}),
    ("stale-echo", {}, {"hears": "stale"}),
    ("preempt-off", {"preempt": False}, {}),
    ("equal-priority", {"priority": 100}, {}),
    ("lower-priority", {"priority": 50}, {}),
]


@pytest.mark.parametrize(("own", "other"), [(o, p) for _, o, p in NO_PREEMPT],
                         ids=[i for i, _, _ in NO_PREEMPT])
def test_no_want_active(own: dict[str, Any], other: dict[str, Any]) -> None:
    e = started(**{"priority": 150, **own})
    acts: list[Action] = []
    t = T0
    while t < T0 + 2:
        t += INTERVAL
        kw = {"flags": F.HEALTHY, **other}
        if kw.get("hears") == "stale":
            kw["hears"] = t - DEAD - 0.01 if t - T0 > DEAD + 0.02 else False
        acts += advance(e, t)
        acts += e.handle(peer(t, S.ACTIVE, term=1, **kw), t)
    assert e.state is S.STANDBY
    assert not any(F.WANT_ACTIVE in a.flags for a in adverts(acts))


def test_want_active_withdrawn_when_peer_stops_hearing_us() -> None:
    e = started(priority=150)
    now = T0 + 0.01
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)
    assert F.WANT_ACTIVE in e.advert().flags
    now += 0.05
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1, hears=False), now)
    assert F.WANT_ACTIVE not in e.advert().flags


def test_active_grants_want_active_with_make_before_break() -> None:
    e, now = active()
    now += 0.1
    actions = e.handle(peer(now, S.STANDBY, F.HEALTHY | F.WANT_ACTIVE, priority=150), now)
    assert transitions(actions) == [] and e.state is S.ACTIVE
    assert not only(actions, ReleaseVips)
    (sent,) = adverts(actions)
    assert F.RESIGNING in sent.flags and F.SWITCHOVER not in sent.flags
    assert sent.state is S.ACTIVE
    now += 0.01
    actions = e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=2, priority=150), now)
    assert actions[:2] == [Transition(S.ACTIVE, S.STANDBY, Why.HANDED_OVER,
                                      "handed over to b (term 2)", 1),
                           ReleaseVips()]
    assert only(actions, RunHook) == [RunHook("on_standby", S.STANDBY, 1)]
    assert F.RESIGNING not in e.advert().flags


@pytest.mark.parametrize(
    "hb_kw",
    [{"hears": False}, {"flags": F.WANT_ACTIVE}, {"state": S.FAULT}],
    ids=["does-not-hear-us", "unhealthy", "fault"],
)
def test_active_ignores_want_active_from_ineligible_peer(hb_kw: dict[str, Any]) -> None:
    e, now = active()
    kw: dict[str, Any] = {"state": S.STANDBY, "flags": F.HEALTHY | F.WANT_ACTIVE, **hb_kw}
    actions = e.handle(peer(now + 0.1, priority=150, **kw), now + 0.1)
    assert all(F.RESIGNING not in a.flags for a in adverts(actions))
    assert e.handover is None


def test_preferred_active_ignores_want_active() -> None:
    e = started()
    now = T0 + 0.05
    e.handle(peer(now, S.ACTIVE, F.HEALTHY | F.RESIGNING | F.SWITCHOVER, term=1), now)
    assert e.state is S.ACTIVE and e.preferred
    assert F.PREFERRED in e.advert().flags
    now += 0.02
    e.handle(peer(now, S.STANDBY, F.HEALTHY, term=1, priority=150), now)
    actions = e.handle(peer(now + 0.04, S.STANDBY, F.HEALTHY | F.WANT_ACTIVE, term=1,
                            priority=150), now + 0.04)
    assert e.handover is None
    assert all(F.RESIGNING not in a.flags for a in adverts(actions))


def test_preempt_takeover_is_not_preferred() -> None:
    e = started(priority=150)
    now = T0 + 0.01
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)
    actions = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY | F.RESIGNING, term=1), now + 0.01)
    assert takeover_reason(actions) == "peer b hands over"
    assert not e.preferred and F.WANT_ACTIVE not in e.advert().flags


# --- 6. handover timeouts ----------------------------------------------------------------

def _active_with_standby_peer() -> tuple[Election, float]:
    e, now = active()
    now += 0.05
    e.handle(peer(now, S.STANDBY, F.HEALTHY), now)
    return e, now


def test_a_pair_switches_over_only_to_its_peer() -> None:
    e, now = _active_with_standby_peer()
    res = e.handle(Command(K.SWITCHOVER, target="node3"), now)
    assert not result(res).accepted and "'node3' is not this pair's peer" in result(res).message
    assert e.handover is None
    peer_name = e.peer.heartbeat.node if e.peer is not None else ""
    res = e.handle(Command(K.SWITCHOVER, target=peer_name), now)
    assert result(res).accepted and e.handover is not None


def test_switchover_not_completed_is_aborted() -> None:
    e, now = _active_with_standby_peer()
    res = e.handle(Command(K.SWITCHOVER), now)
    assert result(res).accepted
    assert (F.RESIGNING | F.SWITCHOVER) in adverts(res)[0].flags
    keep_alive = now + 0.2
    e.handle(peer(keep_alive, S.STANDBY, F.HEALTHY), keep_alive)
    advance(e, now + DEAD - EPS)
    assert e.next_deadline() == now + DEAD
    assert transitions(e.handle(Tick(), now + DEAD - EPS)) == []
    assert e.handover is not None
    actions = e.handle(Tick(), now + DEAD)
    assert e.state is S.ACTIVE and e.handover is None
    assert transitions(actions) == [] and not only(actions, ReleaseVips)
    (warn,) = only(actions, Warn)
    assert warn.message == "handover aborted: the peer did not take over within 320 ms"
    (sent,) = adverts(actions)
    assert F.RESIGNING not in sent.flags and F.SWITCHOVER not in sent.flags


@pytest.mark.parametrize(
    ("event", "target", "hook"),
    [(Command(K.MAINTENANCE_ON), S.MAINTENANCE, "on_standby"),
     (Shutdown(), S.STOPPED, "on_standby")],
    ids=["maintenance", "shutdown"],
)
def test_leaving_handover_times_out_and_releases(event: Event, target: State,
                                                 hook: str) -> None:
    e, now = _active_with_standby_peer()
    actions = e.handle(event, now)
    assert e.state is S.ACTIVE and not only(actions, ReleaseVips)
    (sent,) = adverts(actions)
    assert F.RESIGNING in sent.flags and F.SWITCHOVER not in sent.flags
    keep_alive = now + 0.2
    e.handle(peer(keep_alive, S.STANDBY, F.HEALTHY), keep_alive)
    assert transitions(advance(e, now + DEAD - EPS)) == []
    assert e.next_deadline() == now + DEAD
    actions = e.handle(Tick(), now + DEAD)
    assert actions[:2] == [Transition(S.ACTIVE, target, Why.HANDOVER_TIMEOUT,
                                      "handover timed out, releasing anyway",
                                      1), ReleaseVips()]
    assert only(actions, RunHook) == [RunHook(hook, target, 1)]


@pytest.mark.parametrize(
    ("event", "target"),
    [(Command(K.MAINTENANCE_ON), S.MAINTENANCE), (Shutdown(), S.STOPPED),
     (Command(K.SWITCHOVER), S.STANDBY)],
    ids=["maintenance", "shutdown", "switchover"],
)
def test_handover_completes_when_peer_active_with_higher_term(event: Event,
                                                              target: State) -> None:
    e, now = _active_with_standby_peer()
    e.handle(event, now)
    now += 0.01
    # Same term is not enough: only a newer term proves the peer took over.
    assert transitions(e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)) == []
    assert e.state is S.ACTIVE
    now += 0.01
    actions = e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=2), now)
    assert actions[:2] == [Transition(S.ACTIVE, target, Why.HANDED_OVER,
                                      "handed over to b (term 2)", 1),
                           ReleaseVips()]


# --- 7. commands -------------------------------------------------------------------------

def _dead_peer_active() -> tuple[Election, float]:
    e, now = _active_with_standby_peer()
    return e, now + DEAD


SWITCHOVER_REFUSED: list[tuple[str, Callable[[], tuple[Election, float]], str]] = [
    ("standby", lambda: (started(), T0 + 0.1), "this node is STANDBY, not ACTIVE"),
    ("fault", lambda: (started(health=False), T0 + 0.1), "this node is FAULT, not ACTIVE"),
    ("no-peer", lambda: active(), "no peer heard since start"),
    ("peer-dead", _dead_peer_active, "peer b not heard for 320 ms"),
]


@pytest.mark.parametrize(("make", "message"), [(m, r) for _, m, r in SWITCHOVER_REFUSED],
                         ids=[i for i, _, _ in SWITCHOVER_REFUSED])
def test_switchover_refused(make: Callable[[], tuple[Election, float]], message: str) -> None:
    e, now = make()
    actions = e.handle(Command(K.SWITCHOVER), now)
    assert result(actions) == CommandResult(K.SWITCHOVER, False, message)
    assert e.handover is None


@pytest.mark.parametrize(
    ("hb_kw", "message"),
    [({"state": S.FAULT, "flags": F.NONE}, "peer b is FAULT and unhealthy"),
     ({"state": S.MAINTENANCE}, "peer b is MAINTENANCE"),
     ({"flags": F.NONE}, "peer b is STANDBY and unhealthy"),
     ({"hears": False}, "peer b does not hear us (one-way link)")],
    ids=["fault", "maintenance", "unhealthy", "one-way"],
)
def test_switchover_refused_for_peer_unless_forced(hb_kw: dict[str, Any], message: str) -> None:
    e, now = active()
    now += 0.05
    kw: dict[str, Any] = {"state": S.STANDBY, "flags": F.HEALTHY, **hb_kw}
    e.handle(peer(now, **kw), now)
    assert e.state is S.ACTIVE
    assert result(e.handle(Command(K.SWITCHOVER), now)) == CommandResult(
        K.SWITCHOVER, False, message)
    actions = e.handle(Command(K.SWITCHOVER, force=True), now)
    assert result(actions).accepted
    assert (F.RESIGNING | F.SWITCHOVER) in adverts(actions)[0].flags


def test_switchover_refused_while_handover_runs() -> None:
    e, now = _active_with_standby_peer()
    assert result(e.handle(Command(K.SWITCHOVER), now)).accepted
    assert result(e.handle(Command(K.SWITCHOVER), now + 0.01)) == CommandResult(
        K.SWITCHOVER, False, "a handover is already in progress")


def test_switchover_refused_while_stopping() -> None:
    e, now = _active_with_standby_peer()
    e.handle(Shutdown(), now)
    assert result(e.handle(Command(K.SWITCHOVER), now)) == CommandResult(
        K.SWITCHOVER, False, "node is shutting down")


def test_switchover_accepted_and_completed_makes_peer_preferred() -> None:
    e, now = _active_with_standby_peer()
    actions = e.handle(Command(K.SWITCHOVER), now)
    assert actions[0] == CommandResult(K.SWITCHOVER, True, "handover to peer started")
    assert e.state is S.ACTIVE and not only(actions, ReleaseVips)
    # The peer's side of the same switchover: our RESIGNING|SWITCHOVER advert.
    taker = started(node="b", priority=50)
    t = T0 + 0.05
    sent = adverts(actions)[0]
    acts = taker.handle(peer(t, sent.state, sent.flags, term=sent.term, node="a"), t)
    assert takeover_reason(acts) == "peer a hands over"
    assert taker.preferred and F.PREFERRED in adverts(acts)[0].flags


def test_promote_on_active() -> None:
    e, now = active()
    assert result(e.handle(Command(K.PROMOTE), now)) == CommandResult(K.PROMOTE, True,
                                                                      "already ACTIVE")
    assert F.PREFERRED in e.advert().flags


@pytest.mark.parametrize(
    ("make", "force", "message"),
    [(lambda: started(health=None), False,
      "this node is not eligible: health not yet known; use force"),
     (lambda: started(health=False), False,
      "this node is not eligible: health check failing: probe web: 503; use force"),
     (lambda: Election(cfg(), maintenance=True), False, "this node is in maintenance"),
     (lambda: Election(cfg(), maintenance=True), True, "this node is in maintenance")],
    ids=["health-unknown", "unhealthy", "maintenance", "maintenance-forced"],
)
def test_promote_refused(make: Callable[[], Election], force: bool, message: str) -> None:
    e = make()
    if e.state is S.INIT:
        e.handle(Start(), T0)
        e.handle(HealthChanged(True), T0)
    state = e.state
    actions = e.handle(Command(K.PROMOTE, force=force), T0 + 0.1)
    assert result(actions) == CommandResult(K.PROMOTE, False, message)
    assert not only(actions, Warn) and transitions(actions) == []
    assert e.state is state and not e.health_override


def test_forced_promote_overrides_failing_health_until_checks_recover() -> None:
    e = started(health=False)
    actions = e.handle(Command(K.PROMOTE, force=True), T0 + 0.05)
    assert actions[:2] == [
        Warn("health override by forced promote: acting as healthy until the checks recover "
             "(health check failing: probe web: 503)"),
        CommandResult(K.PROMOTE, True, "taking over"),
    ]
    assert transitions(actions) == [(S.FAULT, S.STANDBY), (S.STANDBY, S.ACTIVE)]
    assert only(actions, Transition)[1].reason == "operator promote"
    assert (F.HEALTHY | F.PREFERRED) in e.advert().flags
    # Still failing: the override holds. Recovered: it ends, the next failure counts.
    assert transitions(e.handle(HealthChanged(False, "probe web: 503"), T0 + 0.1)) == []
    assert transitions(e.handle(HealthChanged(True), T0 + 0.2)) == []
    assert not e.health_override
    actions = e.handle(HealthChanged(False, "probe web: 500"), T0 + 0.3)
    assert actions[:2] == [Transition(S.ACTIVE, S.FAULT, Why.HEALTH,
                                      "health check failing: probe web: 500",
                                      1), ReleaseVips()]


def test_forced_promote_override_ends_with_the_promote_request() -> None:
    """A forced promote the active peer never completes must not leave a sick node eligible.

    The request lapses after two dead intervals; the override must lapse with it, or the
    node (checks still failing) advertises HEALTHY and later takes over on its own.
    """
    e, now = standby_with_active_peer(health=False)
    actions = e.handle(Command(K.PROMOTE, force=True), now)
    assert result(actions).message == "asked the active peer to hand over"
    assert F.PROMOTE in e.advert().flags
    acts, last = feed(e, now + INTERVAL, now + 3 * DEAD, S.ACTIVE, term=1)
    assert F.PROMOTE not in e.advert().flags
    assert e.state is S.FAULT and F.HEALTHY not in e.advert().flags
    acts += advance(e, last + 2 * DEAD)  # the peer dies
    assert not only(acts, AcquireVips)


def test_a_lapsing_forced_promote_faults_a_sick_node_at_once() -> None:
    """When the request lapses, the override goes and the sick node turns FAULT in that
    same step: no further STANDBY heartbeat claiming health goes out first."""
    e, now = standby_with_active_peer(health=False)
    e.handle(Command(K.PROMOTE, force=True), now)
    lapse = now + 2 * DEAD
    feed(e, now + INTERVAL, lapse - EPS, S.ACTIVE, term=1)
    assert e.state is S.STANDBY
    acts = e.handle(Tick(), lapse)
    assert e.state is S.FAULT
    assert [t.new for t in acts if isinstance(t, Transition)] == [S.FAULT]
    assert all(a.advert.state is S.FAULT and F.HEALTHY not in a.advert.flags
               for a in acts if isinstance(a, SendHeartbeat))


def test_promote_asks_active_peer_that_hears_us() -> None:
    e, now = standby_with_active_peer()
    actions = e.handle(Command(K.PROMOTE), now)
    assert actions[0] == CommandResult(K.PROMOTE, True, "asked the active peer to hand over")
    (sent,) = adverts(actions)
    assert F.PROMOTE in sent.flags and sent.state is S.STANDBY
    assert e.state is S.STANDBY
    # The request lasts exactly two dead intervals unless the peer hands over first.
    feed(e, now + INTERVAL, now + 2 * DEAD, S.ACTIVE, term=1)
    advance(e, now + 2 * DEAD - EPS)
    assert F.PROMOTE in e.advert().flags
    assert e.next_deadline() == now + 2 * DEAD
    e.handle(Tick(), now + 2 * DEAD)
    assert F.PROMOTE not in e.advert().flags


def test_promote_completes_as_preferred_takeover() -> None:
    e, now = standby_with_active_peer()
    e.handle(Command(K.PROMOTE), now)
    now += 0.01
    actions = e.handle(peer(now, S.ACTIVE, F.HEALTHY | F.RESIGNING | F.SWITCHOVER, term=1),
                       now)
    assert takeover_reason(actions) == "peer b hands over"
    sent = adverts(actions)[0]
    assert F.PREFERRED in sent.flags and F.PROMOTE not in sent.flags


@pytest.mark.parametrize("preferred", [False, True], ids=["normal", "preferred"])
def test_active_hands_over_with_switchover_on_peer_promote(preferred: bool) -> None:
    e, now = _active_with_standby_peer()
    e.preferred = preferred
    actions = e.handle(peer(now + 0.01, S.STANDBY, F.HEALTHY | F.PROMOTE), now + 0.01)
    assert (F.RESIGNING | F.SWITCHOVER) in adverts(actions)[0].flags
    assert e.state is S.ACTIVE


def test_promote_with_dead_peer_takes_over_during_holddown() -> None:
    e = started()
    now = T0 + 0.05
    actions = e.handle(Command(K.PROMOTE), now)
    assert actions[0] == CommandResult(K.PROMOTE, True, "taking over")
    assert takeover_reason(actions) == "operator promote"
    assert e.state is S.ACTIVE and e.preferred


def test_promote_with_active_peer_that_does_not_hear_us() -> None:
    e = started()
    now = T0 + 0.05
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1, hears=False), now)
    assert result(e.handle(Command(K.PROMOTE), now)) == CommandResult(
        K.PROMOTE, False, "the active peer does not hear us; use force")
    actions = e.handle(Command(K.PROMOTE, force=True), now)
    assert takeover_reason(actions) == "operator promote"
    assert e.term == 2


def test_maintenance_on_standby() -> None:
    e = started()
    actions = e.handle(Command(K.MAINTENANCE_ON), T0 + 0.1)
    assert actions[0] == CommandResult(K.MAINTENANCE_ON, True, "maintenance on")
    assert actions[1] == Transition(S.STANDBY, S.MAINTENANCE, Why.MAINTENANCE, "maintenance on", 0)
    assert transitions(advance(e, T0 + 3)) == []


def test_maintenance_on_active_hands_over_first() -> None:
    e, now = _active_with_standby_peer()
    actions = e.handle(Command(K.MAINTENANCE_ON), now)
    assert result(actions).accepted and transitions(actions) == []
    assert F.RESIGNING in adverts(actions)[0].flags
    actions = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY, term=2), now + 0.01)
    assert transitions(actions) == [(S.ACTIVE, S.MAINTENANCE)]
    assert actions[1] == ReleaseVips()


def test_maintenance_on_active_without_peer_releases_at_once() -> None:
    e, now = active()
    actions = e.handle(Command(K.MAINTENANCE_ON), now + 0.1)
    assert actions[1:3] == [
        Transition(S.ACTIVE, S.MAINTENANCE, Why.MAINTENANCE,
                   "maintenance and no eligible peer to hand over to",
                   1),
        ReleaseVips(),
    ]


def test_maintenance_off() -> None:
    e = Election(cfg(), maintenance=True)
    e.handle(Start(), T0)
    e.handle(HealthChanged(True), T0)
    actions = e.handle(Command(K.MAINTENANCE_OFF), T0 + 0.1)
    assert actions[:2] == [CommandResult(K.MAINTENANCE_OFF, True, "maintenance off"),
                           Transition(S.MAINTENANCE, S.STANDBY, Why.RECOVERED,
                                      "maintenance off", 0)]
    assert only(actions, RunHook) == [RunHook("on_standby", S.STANDBY, 0)]


def test_maintenance_off_cancels_a_running_maintenance_handover() -> None:
    """Maintenance switched off while the handover runs: the node keeps its VIPs."""
    e, now = _active_with_standby_peer()
    e.handle(Command(K.MAINTENANCE_ON), now)
    e.handle(Command(K.MAINTENANCE_OFF), now + 0.01)
    keep = now + 0.2
    e.handle(peer(keep, S.STANDBY, F.HEALTHY), keep)
    acts = advance(e, now + DEAD)
    assert not only(acts, ReleaseVips)
    assert e.state is S.ACTIVE


# --- 8. split brain ----------------------------------------------------------------------

SPLIT = [
    # own: node, priority, term before takeover, settled; peer: node, priority, term,
    # settled; do we keep the VIPs?
    ("a", 100, 4, False, "b", 100, 2, True, False),  # false suspicion: fresh yields
    ("a", 100, 0, True, "b", 100, 2, False, True),  # settled beats a fresh takeover
    ("a", 100, 4, True, "b", 100, 2, True, True),  # real partition: newer term (5 > 2)
    ("a", 100, 0, True, "b", 100, 2, True, False),  # real partition: older term (1 < 2)
    ("a", 100, 4, False, "b", 100, 2, False, True),  # both fresh: newer term
    ("a", 100, 0, False, "b", 200, 1, False, False),  # equal terms, peer priority higher
    ("a", 200, 0, False, "b", 100, 1, False, True),
    ("a", 100, 0, False, "b", 100, 1, False, True),  # equal terms and priority: smaller name
    ("c", 100, 0, False, "b", 100, 1, False, False),
]


@pytest.mark.parametrize(
    ("node", "prio", "term", "settled", "pnode", "pprio", "pterm", "psettled", "keep"), SPLIT,
    ids=["fresh-vs-settled", "settled-vs-fresh", "settled-newer", "settled-older",
         "fresh-newer", "prio-lower", "prio-higher", "name-smaller", "name-larger"])
def test_split_brain_resolution(node: str, prio: int, term: int, settled: bool, pnode: str,
                                pprio: int, pterm: int, psettled: bool, keep: bool) -> None:
    e, now = active(node=node, priority=prio, term=term)
    if settled:  # hold the VIPs alone for two dead intervals: our heartbeats say SETTLED
        now += 2 * DEAD + INTERVAL
        assert Flag.SETTLED in adverts(advance(e, now))[-1].flags
    all_actions: list[Action] = []
    flags = F.HEALTHY | (F.SETTLED if psettled else F.NONE)
    for i in range(5):
        t = now + 0.01 + i * INTERVAL
        all_actions += advance(e, t)
        all_actions += e.handle(peer(t, S.ACTIVE, flags, term=pterm, priority=pprio,
                                     node=pnode), t)
    if keep:
        assert e.state is S.ACTIVE
        (ann,) = only(all_actions, Announce)
        assert ann.reason == f"split brain with {pnode} healed, we keep the VIPs"
        assert transitions(all_actions) == []
    else:
        assert e.state is S.STANDBY
        assert transitions(all_actions) == [(S.ACTIVE, S.STANDBY)]
        (tr,) = only(all_actions, Transition)
        assert tr.reason == f"split brain: {pnode} keeps the VIPs (term {pterm})"
        assert only(all_actions, ReleaseVips) == [ReleaseVips()]
        assert not only(all_actions, Announce)


def test_split_brain_announces_again_for_a_new_episode() -> None:
    e, now = active(term=4)  # a newer term than the peer's fresh takeovers: we keep
    acts = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY, term=2), now + 0.01)
    assert len(only(acts, Announce)) == 1
    assert adverts(acts)  # the announcement is accompanied by a heartbeat burst
    e.handle(peer(now + 0.05, S.STANDBY, F.HEALTHY, term=2), now + 0.05)
    acts = e.handle(peer(now + 0.09, S.ACTIVE, F.HEALTHY, term=3), now + 0.09)
    assert len(only(acts, Announce)) == 1


def test_active_peer_that_does_not_hear_us_wins_after_one_dead_interval() -> None:
    e, now = active()
    first = now + 0.05
    acts, _ = feed(e, first, first + DEAD, S.ACTIVE, term=5, hears=False)
    acts += advance(e, first + DEAD - EPS)
    assert transitions(acts) == [] and e.state is S.ACTIVE
    assert e.next_deadline() == first + DEAD
    assert transitions(e.handle(Tick(), first + DEAD - EPS)) == []
    actions = e.handle(Tick(), first + DEAD)
    assert actions[:2] == [
        Transition(S.ACTIVE, S.STANDBY, Why.ONE_WAY_LINK,
                   "peer b is active and has not heard us for 320 ms", 1),
        ReleaseVips(),
    ]
    later, _ = feed(e, first + DEAD + INTERVAL / 2, first + 3 * DEAD, S.ACTIVE, term=5,
                    hears=False)
    assert transitions(later) == [] and e.state is S.STANDBY


def test_concede_timer_resets_when_peer_hears_us_again() -> None:
    e, now = active()
    first = now + 0.05
    e.handle(peer(first, S.ACTIVE, F.HEALTHY, term=5, hears=False), first)
    advance(e, first + 0.1)
    e.handle(peer(first + 0.1, S.ACTIVE, F.HEALTHY | F.RESIGNING, term=5), first + 0.1)
    advance(e, first + 0.2)
    e.handle(peer(first + 0.2, S.ACTIVE, F.HEALTHY, term=5, hears=False), first + 0.2)
    assert transitions(advance(e, first + DEAD)) == []
    assert e.state is S.ACTIVE
    assert e.timers.concede_at == first + 0.2 + DEAD  # restarted by the later stale echo
    # the heartbeat cadence goes on: the next deadline is a heartbeat, not the concession
    assert first + DEAD < due(e) <= first + DEAD + INTERVAL < e.timers.concede_at


def test_takeover_from_unhealthy_active_peer_does_not_flap() -> None:
    """A peer ACTIVE without HEALTHY (its health became unknown) that hears a healthy standby.

    The standby rule takes over at once ("peer b active but unhealthy": healthy beats
    unhealthy), so the split-brain rule must not hand the VIPs straight back: exactly one
    takeover, then the node stays ACTIVE while the peer keeps advertising the same.
    """
    e = started()
    now = T0 + 0.05
    first = e.handle(peer(now, S.ACTIVE, F.NONE, term=1), now)
    assert transitions(first) == [(S.STANDBY, S.ACTIVE)], [
        (a.old.name, a.new.name, a.reason) for a in only(first, Transition)]
    acts, _ = feed(e, now + INTERVAL, now + 0.5, S.ACTIVE, F.NONE, term=1)
    assert transitions(acts) == [] and e.state is S.ACTIVE


# --- 9. shutdown -------------------------------------------------------------------------

def test_shutdown_standby_sends_final_burst_then_finishes() -> None:
    e = started()
    now = T0 + 0.1
    advance(e, now)
    actions = e.handle(Shutdown(), now)
    assert actions == [Transition(S.STANDBY, S.STOPPED, Why.SHUTDOWN, "shutdown", 0),
                       SendHeartbeat(Advert(S.STOPPED, F.HEALTHY | F.PREEMPT, 0, 100, 100))]
    assert not e.finished
    second = now + INTERVAL / 8
    assert e.next_deadline() == second
    assert adverts(e.handle(Tick(), second))[0].state is S.STOPPED
    assert not e.finished
    third = second + INTERVAL / 8
    assert e.next_deadline() == third
    assert len(adverts(e.handle(Tick(), third))) == 1
    assert e.finished and e.next_deadline() is None
    assert e.handle(Tick(), third + 1) == []


def test_shutdown_active_hands_over_first() -> None:
    e, now = _active_with_standby_peer()
    actions = e.handle(Shutdown(), now)
    assert e.state is S.ACTIVE and not e.finished
    assert F.RESIGNING in adverts(actions)[0].flags
    actions = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY, term=2), now + 0.01)
    assert actions[:2] == [Transition(S.ACTIVE, S.STOPPED, Why.HANDED_OVER,
                                      "handed over to b (term 2)", 1),
                           ReleaseVips()]
    assert only(actions, RunHook) == [RunHook("on_standby", S.STOPPED, 1)]
    advance(e, now + 1)
    assert e.finished


def test_shutdown_active_without_peer_releases_at_once() -> None:
    e, now = active()
    actions = e.handle(Shutdown(), now + 0.1)
    assert actions[:2] == [
        Transition(S.ACTIVE, S.STOPPED, Why.SHUTDOWN,
                   "stopped and no eligible peer to hand over to", 1),
        ReleaseVips(),
    ]
    advance(e, now + 1)
    assert e.finished


# --- 10. heartbeat cadence ---------------------------------------------------------------

def test_steady_state_one_heartbeat_per_interval() -> None:
    e = started(health=None)
    # The start burst: at once, then two copies interval / 8 apart.
    assert e.next_deadline() == T0 + INTERVAL / 8
    assert len(adverts(e.handle(Tick(), T0 + INTERVAL / 8))) == 1
    assert e.next_deadline() == T0 + INTERVAL / 8 + INTERVAL / 8
    advance(e, T0 + DEAD)  # past the start-up hold-down (health unknown: no takeover)
    when = due(e)
    for _ in range(25):
        assert len(adverts(e.handle(Tick(), when))) == 1
        assert e.next_deadline() == when + INTERVAL
        when += INTERVAL


def test_events_between_heartbeats_do_not_send() -> None:
    e = started(health=None)
    advance(e, T0 + 0.5)
    when = due(e)
    assert adverts(e.handle(Tick(), when - 0.01)) == []
    assert adverts(e.handle(HealthChanged(None), when - 0.005)) == []
    assert e.next_deadline() == when


def test_state_change_sends_at_once_plus_two_quick_copies() -> None:
    e, now = active()
    advance(e, now + 0.5)
    t = now + 0.5 + 0.013
    actions = e.handle(HealthChanged(False), t)
    assert [a.state for a in adverts(actions)] == [S.FAULT]
    burst = [t + INTERVAL / 8]
    burst.append(burst[0] + INTERVAL / 8)
    for when in burst:
        assert e.next_deadline() == when
        assert [a.state for a in adverts(e.handle(Tick(), when))] == [S.FAULT]
    assert e.next_deadline() == burst[1] + INTERVAL


def test_late_tick_keeps_heartbeats_scheduled() -> None:
    """A timer that fires more than one interval late (a stalled event loop).

    The heartbeat is sent at once and the next one is still scheduled: an active node
    with no peer heard must never stop heartbeating (and ticking) for good.
    """
    e, now = active()
    advance(e, now + 0.5)
    late = due(e) + INTERVAL + 0.01
    assert len(adverts(e.handle(Tick(), late))) == 1
    nxt = e.next_deadline()
    assert nxt is not None and late < nxt <= late + INTERVAL


def test_deadline_never_at_or_before_now_after_zero_delay_timers() -> None:
    e = started(priority=150)
    now = T0 + 0.01
    e.handle(peer(now, S.ACTIVE, F.HEALTHY, term=1), now)
    assert due(e) > now
    # An event handled with a past timestamp does not move time backwards either.
    e.handle(Tick(), now - 0.005)
    assert due(e) > now


# --- 11. settings digest -----------------------------------------------------------------

def test_digest_mismatch_warns_once_then_on_match() -> None:
    e = started(digest=b"ours-dig")
    t = T0 + 0.01
    acts = e.handle(peer(t, digest=b"theirs-d"), t)
    (warn,) = only(acts, Warn)
    assert warn.message == (f"peer b has different pair settings (cluster, VIPs, interval, "
                            f"dead_after): digest {b'theirs-d'.hex()} vs ours "
                            f"{b'ours-dig'.hex()}")
    assert only(e.handle(peer(t + 0.04, digest=b"theirs-d"), t + 0.04), Warn) == []
    acts = e.handle(peer(t + 0.08, digest=b"other-dg"), t + 0.08)
    assert len(only(acts, Warn)) == 1
    acts = e.handle(peer(t + 0.12, digest=b"ours-dig"), t + 0.12)
    assert only(acts, Warn) == [Warn("peer b pair settings match again")]
    assert only(e.handle(peer(t + 0.16, digest=b"ours-dig"), t + 0.16), Warn) == []


def test_digest_check_disabled_without_own_digest() -> None:
    e = started()
    assert only(e.handle(peer(T0 + 0.01, digest=b"whatever"), T0 + 0.01), Warn) == []


def test_digest_mismatch_still_processes_the_heartbeat() -> None:
    e = started(digest=b"ours-dig")
    acts = e.handle(peer(T0 + 0.01, S.FAULT, F.NONE, digest=b"theirs-d"), T0 + 0.01)
    assert only(acts, Warn) and e.state is S.ACTIVE


# --- VIP failures ------------------------------------------------------------------------

def test_vip_failure_faults_for_vip_retry_then_recovers() -> None:
    e, now = active(vip_retry=1.0)
    actions = e.handle(VipFailed("netlink: EPERM"), now)
    assert actions[:2] == [Transition(S.ACTIVE, S.FAULT, Why.VIP_ERROR,
                                      "VIP operation failed: netlink: EPERM",
                                      1), ReleaseVips()]
    assert transitions(advance(e, now + 1.0 - EPS)) == []
    assert e.next_deadline() == now + 1.0
    actions = e.handle(Tick(), now + 1.0)
    assert transitions(actions) == [(S.FAULT, S.STANDBY), (S.STANDBY, S.ACTIVE)]


def test_promote_during_vip_fault_does_not_linger() -> None:
    """A promote while FAULT (VIP failure) is refused and must not fire later on its own.

    Otherwise the node, once the fault clears, grabs the VIPs from a healthy active
    peer that hears it, without the make-before-break handover promote normally uses.
    """
    e, now = active(vip_retry=1.0)
    e.handle(VipFailed("netlink: EPERM"), now)
    refused = result(e.handle(Command(K.PROMOTE), now + 0.01))
    assert not refused.accepted and "EPERM" in refused.message
    acts, _ = feed(e, now + INTERVAL, now + 1.2, S.ACTIVE, term=2)
    assert not only(acts, AcquireVips)
    assert e.state is S.STANDBY


# --- two real elections back to back ----------------------------------------------------

class Pair:
    """Nodes "a" and "b" wired together: every heartbeat arrives at once, echoes are exact.

    After every handled event it checks that VIPs are never left unheld once someone has
    taken over, except while no node is eligible (make-before-break handovers).
    """

    def __init__(self, a: ElectionConfig, b: ElectionConfig) -> None:
        self.nodes = {"a": Election(a), "b": Election(b)}
        self.echo: dict[str, float | None] = {"a": None, "b": None}  # peer's send time seen
        self.held = {"a": False, "b": False}
        self.takeovers: list[tuple[float, str, str]] = []
        self.takeover_whys: list[Why] = []
        self.ever_held = False
        self.gap_allowed = False

    def other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def handle(self, name: str, event: Event, now: float) -> list[Action]:
        actions = self.nodes[name].handle(event, now)
        for a in actions:
            if isinstance(a, AcquireVips):
                self.held[name] = self.ever_held = True
            elif isinstance(a, ReleaseVips):
                self.held[name] = False
            elif isinstance(a, Transition) and a.new is S.ACTIVE:
                self.takeovers.append((now, name, a.reason))
                self.takeover_whys.append(a.why)
        for a in actions:
            if isinstance(a, SendHeartbeat):
                self._deliver(name, a.advert, now)
        if self.ever_held and not self.gap_allowed:
            assert any(self.held.values()), f"nobody holds the VIPs at {now} after {name}"
        return actions

    def _deliver(self, src: str, advert: Advert, now: float) -> None:
        dst = self.other(src)
        if self.nodes[dst].state in (S.INIT, S.STOPPED) and self.nodes[dst].finished:
            return
        echo, self.echo[dst] = self.echo[src], now
        rx = peer(now, advert.state, advert.flags, term=advert.term,
                  priority=advert.priority, node=src, hears=echo if echo is not None else False)
        self.handle(dst, rx, now)

    def start(self, name: str, now: float, *, health_first: bool = True) -> None:
        events: list[Event] = [HealthChanged(True), Start()]
        for event in events if health_first else events[::-1]:
            self.handle(name, event, now)

    def run(self, until: float) -> None:
        while True:
            due_at = [(d, n) for n, e in self.nodes.items()
                      if (d := e.next_deadline()) is not None and d <= until]
            if not due_at:
                return
            when, name = min(due_at)
            self.handle(name, Tick(), when)

    def states(self) -> tuple[State, State]:
        return self.nodes["a"].state, self.nodes["b"].state


def _pair(**a_kw: Any) -> Pair:
    return Pair(cfg(**{"priority": 150, **a_kw}), cfg(node="b", priority=100))


def test_pair_start_higher_priority_wins_without_waiting() -> None:
    p = _pair()
    p.start("a", T0)
    p.start("b", T0 + 0.003)
    p.run(T0 + 2)
    assert p.states() == (S.ACTIVE, S.STANDBY)
    assert [(n, r) for _, n, r in p.takeovers] == [
        ("a", "election: we have priority over the standby peer")]
    assert p.takeovers[0][0] < T0 + DEAD  # heard the peer: no hold-down wait


def test_pair_start_waits_for_a_peer_whose_health_is_pending() -> None:
    """The daemon starts the election before the first probe result: a node advertises
    HEALTH_PENDING until then, and a peer that would lose to it waits (at most one dead
    interval) instead of grabbing the VIPs and having them preempted back: one move."""
    p = _pair()
    p.start("b", T0)
    p.start("a", T0 + 0.003, health_first=False)
    p.run(T0 + 2)
    assert p.states() == (S.ACTIVE, S.STANDBY)
    assert [n for _, n, _ in p.takeovers] == ["a"]


def test_winning_over_a_peer_whose_health_is_pending_is_an_election_not_a_failure() -> None:
    """The peer is a standby still learning its health and we outrank it: we take over
    at once, and the reason says election (a planned start-up decision, not counted as
    an unplanned failover in the metrics)."""
    p = _pair()
    p.handle("b", Start(), T0)  # b's first probe has not reported (yet)
    p.start("a", T0 + 0.003)
    p.run(T0 + 1)
    assert p.states() == (S.ACTIVE, S.STANDBY)
    assert [(n, r) for _, n, r in p.takeovers] == [
        ("a", "election: we have priority over the standby peer")]
    assert p.takeover_whys == [Why.ELECTION] and Why.ELECTION not in UNPLANNED_TAKEOVERS


def test_pair_late_higher_priority_node_preempts_make_before_break() -> None:
    p = _pair(preempt_delay=0.2)
    p.start("b", T0)
    p.run(T0 + 1)
    assert p.states() == (S.INIT, S.ACTIVE)
    p.start("a", T0 + 1)
    p.run(T0 + 3)
    assert p.states() == (S.ACTIVE, S.STANDBY)
    (_, first, why), (when, name, reason) = p.takeovers
    assert (first, why) == ("b", "no peer heard within 320 ms of start")
    assert (name, reason) == ("a", "peer b hands over")
    # a is heard by b with b's next heartbeat (within one interval), then waits the delay.
    assert T0 + 1 + 0.2 <= when <= T0 + 1 + INTERVAL + 0.2
    assert p.nodes["a"].term == 2 and not p.nodes["a"].preferred


def test_pair_switchover_moves_vips_and_sticks() -> None:
    p = _pair()
    p.start("a", T0)
    p.start("b", T0)
    p.run(T0 + 1)
    actions = p.handle("a", Command(K.SWITCHOVER), T0 + 1)
    assert result(actions).accepted
    p.run(T0 + 4)  # a has priority and preempt, but b is PREFERRED now
    assert p.states() == (S.STANDBY, S.ACTIVE)
    assert p.nodes["b"].preferred
    assert [n for _, n, _ in p.takeovers] == ["a", "b"]


def test_pair_promote_on_standby_moves_vips() -> None:
    p = _pair()
    p.start("a", T0)
    p.start("b", T0)
    p.run(T0 + 1)
    actions = p.handle("b", Command(K.PROMOTE), T0 + 1)
    assert result(actions).message == "asked the active peer to hand over"
    p.run(T0 + 4)
    assert p.states() == (S.STANDBY, S.ACTIVE)
    assert p.takeovers[-1][1:] == ("b", "peer a hands over")


def test_pair_maintenance_round_trip() -> None:
    p = _pair()
    p.start("a", T0)
    p.start("b", T0)
    p.run(T0 + 1)
    p.handle("a", Command(K.MAINTENANCE_ON), T0 + 1)
    p.run(T0 + 2)
    assert p.states() == (S.MAINTENANCE, S.ACTIVE)
    p.handle("a", Command(K.MAINTENANCE_OFF), T0 + 2)
    p.run(T0 + 3)  # a has priority and preempt; b took over as an ordinary handover
    assert p.states() == (S.ACTIVE, S.STANDBY)
    assert [n for _, n, _ in p.takeovers] == ["a", "b", "a"]


def test_pair_shutdown_of_active_hands_over_then_finishes() -> None:
    p = _pair()
    p.start("a", T0)
    p.start("b", T0)
    p.run(T0 + 1)
    p.handle("a", Shutdown(), T0 + 1)
    p.run(T0 + 2)
    assert p.nodes["a"].finished and p.nodes["b"].state is S.ACTIVE
    assert p.takeovers[-1][1:] == ("b", "peer a hands over")


# --- hypothesis: invariants under random event sequences ---------------------------------

_KINDS = ["tick", "tick", "deadline", "deadline", "deadline", "hb", "hb", "hb", "hb",
          "health", "command", "vipfail", "shutdown"]
_GAP = st.floats(min_value=0.0, max_value=0.6, allow_nan=False)


@st.composite
def event_steps(draw: st.DrawFn) -> tuple[str, float, Any]:
    kind = draw(st.sampled_from(_KINDS))
    gap = draw(_GAP)
    if kind == "hb":
        return kind, gap, (
            draw(st.sampled_from(list(State))), Flag(draw(st.integers(0, 127))),
            draw(st.integers(0, 12)), draw(st.sampled_from([50, 100, 150])),
            draw(st.sampled_from(["b", "0"])),
            draw(st.sampled_from(["none", "fresh", "stale"])),
            draw(st.floats(0.0, 0.05, allow_nan=False)),
        )
    if kind == "health":
        return kind, gap, draw(st.sampled_from([True, False, None]))
    if kind == "command":
        return kind, gap, Command(draw(st.sampled_from(list(CommandKind))), draw(st.booleans()))
    return kind, gap, None


@st.composite
def elections(draw: st.DrawFn) -> Election:
    c = cfg(priority=draw(st.sampled_from([50, 100, 150])), preempt=draw(st.booleans()),
            preempt_delay=draw(st.sampled_from([0.0, 0.1, 0.5])))
    return Election(c, term=draw(st.integers(0, 6)), maintenance=draw(st.booleans()))


def _to_event(e: Election, step: tuple[str, float, Any], now: float) -> tuple[Event, float]:
    kind, gap, arg = step
    if kind == "deadline":
        d = e.next_deadline()
        return Tick(), (d if d is not None else now + gap)
    now += gap
    if kind == "tick":
        return Tick(), now
    if kind == "hb":
        state, flags, term, prio, node, echo, age = arg
        hears: bool | float = {"none": False, "fresh": now - age,
                               "stale": now - DEAD - 0.01 - age}[echo]
        return peer(now, state, flags, term=term, priority=prio, node=node, hears=hears), now
    if kind == "health":
        return HealthChanged(arg, "prop"), now
    if kind == "command":
        return arg, now
    if kind == "vipfail":
        return VipFailed("prop"), now
    return Shutdown(), now


def _run(e: Election, steps: list[tuple[str, float, Any]]) -> None:
    now, held, term, state = T0, False, e.term, e.state
    for i in range(len(steps) + 1):
        event, when = (Start(), T0) if i == 0 else _to_event(e, steps[i - 1], now)
        now = max(now, when)
        actions = e.handle(event, when)
        for a in actions:
            if isinstance(a, Transition):
                assert (a.old, a.new) in TRANSITIONS
                assert a.old is state and a.term >= term
                state, term = a.new, a.term
            elif isinstance(a, AcquireVips):
                assert not held and state is S.ACTIVE and a.term == term
                held = True
            elif isinstance(a, ReleaseVips):
                assert held
                held = False
        assert isinstance(e.state, State) and state is e.state
        assert held == (e.state is S.ACTIVE)
        assert e.term >= term
        term = e.term
        d = e.next_deadline()
        assert d is None or (math.isfinite(d) and d > now)


@settings(max_examples=300, deadline=None)
@given(elections(), st.lists(event_steps(), max_size=60))
def test_property_invariants_hold_for_random_events(
    e: Election, steps: list[tuple[str, float, Any]]
) -> None:
    """Never raises; deadlines lie ahead; VIPs held exactly while ACTIVE; terms only grow."""
    _run(e, steps)


def test_config_dead_interval() -> None:
    assert cfg().dead_interval == DEAD
    assert dataclasses.replace(cfg(), dead_after=3).dead_interval == INTERVAL * 3


# --- answering: the idle pair's wakeups ----------------------------------------------------

def sends(actions: Sequence[Action]) -> int:
    return sum(1 for a in actions if isinstance(a, SendHeartbeat))


def test_a_heartbeat_due_soon_goes_out_as_the_answer_to_the_peers() -> None:
    e, now = standby_with_active_peer()
    advance(e, now + 5 * INTERVAL)  # past the start-up burst, plain cadence
    due = e.next_deadline()
    assert due is not None
    last_sent = due - INTERVAL
    older = last_sent - INTERVAL  # the peer's heartbeat echoes one of ours before the last
    # Due in more than half an interval: a peer heartbeat is not answered.
    early = due - 0.6 * INTERVAL
    assert sends(e.handle(peer(early, S.ACTIVE, F.HEALTHY, term=1, hears=older), early)) == 0
    # The peer's own answer to our latest heartbeat (echo of it, held ~0): not answered
    # either, or the pair would ping-pong at the round-trip time.
    soon = due - 0.4 * INTERVAL
    reply = peer(soon, S.ACTIVE, F.HEALTHY, term=1, hears=last_sent)
    assert sends(e.handle(reply, soon)) == 0
    # Due within half an interval: answered at once, and the own timer then waits
    # ANSWER_GRACE intervals for the peer's next heartbeat.
    soon += EPS
    assert sends(e.handle(peer(soon, S.ACTIVE, F.HEALTHY, term=1, hears=older), soon)) == 1
    assert e.next_deadline() == pytest.approx(soon + 1.25 * INTERVAL)
    # Right after an answer another peer heartbeat is not answered again.
    later = soon + EPS
    assert sends(e.handle(peer(later, S.ACTIVE, F.HEALTHY, term=1, hears=older), later)) == 0


def run_pair(seconds: float, delay: float, *, b_dies_at: float | None = None
             ) -> dict[str, list[tuple[float, str]]]:
    """Two elections with real sessions over a link of ``delay`` seconds, each driven at
    its own deadlines and on arrivals. Returns each node's sends as (time, "timer" or
    "answer"). After ``b_dies_at`` node b neither runs nor receives."""
    keys = KeyRing({1: b"k" * 32})
    nodes = {n: started(node=n, priority=p) for n, p in (("a", 150), ("b", 100))}
    sessions = {n: Session(cluster="web", node=n, keys=keys, boot_id=i, digest=b"\0" * 8)
                for i, n in enumerate(nodes, start=1)}
    log: dict[str, list[tuple[float, str]]] = {"a": [], "b": []}
    in_flight: list[tuple[float, str, bytes]] = []  # (arrival, receiver, datagram)

    def dead(name: str, at: float) -> bool:
        return name == "b" and b_dies_at is not None and at >= b_dies_at

    def deliver(sender: str, actions: Sequence[Action], at: float, why: str) -> None:
        for action in actions:
            if isinstance(action, SendHeartbeat):
                log[sender].append((at, why))
                data = sessions[sender].seal(action.advert, at, round(at * 1e9))
                in_flight.append((at + delay, "b" if sender == "a" else "a", data))

    now, end = T0, T0 + seconds
    while now < end:
        timers = [(d, n) for n, e in nodes.items()
                  if (d := e.next_deadline()) is not None and not dead(n, d)]
        arrival = min(in_flight, default=None)
        timer = min(timers, default=None)
        if arrival is not None and (timer is None or arrival[0] <= timer[0]):
            in_flight.remove(arrival)
            now, receiver, data = arrival
            if not dead(receiver, now):
                rx = sessions[receiver].open(data, now, round(now * 1e9))
                deliver(receiver, nodes[receiver].handle(HeartbeatReceived(rx), now), now,
                        "answer")
        else:
            assert timer is not None
            now, name = timer
            deliver(name, nodes[name].handle(Tick(), now), now, "timer")
    return log


@pytest.mark.parametrize("delay", [0.0002, 0.002, 0.015])
def test_an_idle_pair_settles_into_one_node_leading_and_the_other_answering(
        delay: float) -> None:
    log = run_pair(20.0, delay)
    steady = {n: [(t, why) for t, why in sends if t > T0 + 5.0] for n, sends in log.items()}
    by_timer = {n: sum(1 for _, why in s if why == "timer") for n, s in steady.items()}
    answers = {n: sum(1 for _, why in s if why == "answer") for n, s in steady.items()}
    leader = max(by_timer, key=by_timer.__getitem__)
    follower = "b" if leader == "a" else "a"
    expected = 15.0 / INTERVAL
    # The follower sends only answers (no timer wakeups), the leader only on its timer.
    assert by_timer[follower] == 0 and answers[follower] >= 0.99 * expected, (by_timer, answers)
    assert answers[leader] == 0 and by_timer[leader] >= 0.99 * expected
    # Both still send once per interval: the peer's view of liveness is unchanged.
    for n, s in steady.items():
        gaps = [b[0] - a[0] for a, b in pairwise(s)]
        assert max(gaps) <= INTERVAL + 2 * EPS, (n, max(gaps))
        assert min(gaps) >= INTERVAL / 2, (n, min(gaps))


def test_an_answering_node_whose_peer_dies_keeps_sending_on_its_own_timer() -> None:
    dies = T0 + 6.0
    log = run_pair(8.0, 0.0002, b_dies_at=dies)
    # a outranks b, so after b's death a is ACTIVE and sends on its own.
    after = [t for t, _ in log["a"] if t > dies]
    assert after, "a fell silent when its peer died"
    gaps = [y - x for x, y in pairwise([dies, *after])]
    assert max(gaps) <= 1.25 * INTERVAL + 2 * EPS, max(gaps)
    assert len(after) >= 1.9 / INTERVAL * 0.95


def test_the_advert_follows_a_reloaded_priority() -> None:
    e, _ = active()
    before = e.advert()
    assert before.priority == 100 and e.advert() is before  # reused while unchanged
    e.cfg = dataclasses.replace(e.cfg, priority=180)
    assert e.advert().priority == 180


# --- a node's own stall is not its peer's silence (issue 10) -------------------------------

PAUSE = 5.0


def sent_at(actions: Sequence[Action], now: float) -> float | None:
    """`now` if a heartbeat went out in `actions` (the runtime seals it at `now`)."""
    return now if adverts(actions) else None


@pytest.mark.parametrize("backlog_first", [True, False], ids=["backlog-first", "timer-first"])
def test_a_paused_standby_listens_before_it_judges(backlog_first: bool) -> None:
    """SIGSTOP of the standby for 5 s: on resume the overdue timer and the queued
    heartbeats arrive in either order; none makes it take over while the peer lives."""
    e, now = standby_with_active_peer()
    advance(e, now + 0.2)
    e.handle(peer(now + 0.2, S.ACTIVE, F.HEALTHY, term=1), now + 0.2)
    resume = now + 0.2 + PAUSE
    acts: list[Action] = []
    old_echo = now + 0.2 - ECHO_AGE  # the queued ones echo what we sent before the pause
    if backlog_first:
        acts += e.handle(peer(resume, S.ACTIVE, F.HEALTHY, term=1, hears=old_echo), resume)
    acts += e.handle(Tick(), resume)
    if not backlog_first:
        acts += e.handle(peer(resume, S.ACTIVE, F.HEALTHY, term=1, hears=old_echo), resume)
    assert transitions(acts) == [] and e.state is S.STANDBY
    (warn,) = only(acts, Warn)
    assert "stalled for" in warn.message and "listening" in warn.message
    assert adverts(acts), "the heartbeat whose echo ends the listening goes out at once"
    # The peer's answer to that heartbeat ends the listening: still STANDBY.
    acts = advance(e, resume + 0.01)
    acts += e.handle(peer(resume + 0.01, S.ACTIVE, F.HEALTHY, term=1, hears=resume),
                     resume + 0.01)
    assert e.timers.listen_until is None
    acts += feed(e, resume + 0.05, resume + 3 * DEAD, S.ACTIVE, term=1)[0]
    assert transitions(acts) == [] and e.state is S.STANDBY


def test_after_a_stall_a_silent_peer_is_judged_after_one_dead_interval_of_listening() -> None:
    e, now = standby_with_active_peer()
    resume = now + PAUSE
    acts = e.handle(Tick(), resume)
    assert transitions(acts) == []
    assert due(e) <= resume + DEAD
    acts = advance(e, resume + DEAD - EPS)
    assert transitions(acts) == [], "listening: no judgement of the peer yet"
    acts = advance(e, resume + DEAD)
    assert transitions(acts) == [(S.STANDBY, S.ACTIVE)]
    assert takeover_reason(acts).startswith("peer b silent for")


def test_an_echo_of_a_heartbeat_from_before_the_stall_does_not_end_the_listening() -> None:
    e, now = standby_with_active_peer()
    resume = now + PAUSE
    e.handle(Tick(), resume)
    e.handle(peer(resume + 0.01, S.STANDBY, F.NONE, term=1, hears=now), resume + 0.01)
    assert e.timers.listen_until == resume + DEAD
    acts = advance(e, resume + DEAD - EPS)
    assert transitions(acts) == [], "an old echo proves nothing about the peer now"


def test_a_small_delay_is_not_a_stall() -> None:
    e, _ = standby_with_active_peer()
    later = due(e) + INTERVAL * 1.5  # late, but under STALL_INTERVALS intervals
    acts = e.handle(Tick(), later)
    assert not only(acts, Warn) and e.timers.listen_until is None


def test_a_stall_while_the_peer_was_already_silent_changes_nothing() -> None:
    e = started()
    e.handle(peer(T0 + 0.01, S.STANDBY, F.HEALTHY, term=0, priority=200), T0 + 0.01)
    advance(e, T0 + 0.01 + DEAD + INTERVAL)  # the peer went silent: we took over
    assert e.state is S.ACTIVE
    acts = e.handle(Tick(), T0 + 10)
    assert not only(acts, Warn) and e.timers.listen_until is None


# --- the holder re-validates when its VIPs may be gone ----------------------------------------

def test_vips_lost_steps_down_and_takes_over_again_only_after_hearing_the_peer() -> None:
    e, now = standby_with_active_peer(priority=150)
    e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY | F.RESIGNING, term=1), now + 0.01)
    assert e.state is S.ACTIVE and e.term == 2
    t = now + 0.05
    advance(e, t)
    e.handle(peer(t, S.STANDBY, F.HEALTHY, term=1, hears=t - ECHO_AGE), t)
    t2 = t + 0.02
    advance(e, t2)
    acts = e.handle(VipsLost("lease lapsed: last renewal 5012 ms ago"), t2)
    assert acts[:2] == [
        Transition(S.ACTIVE, S.STANDBY, Why.VIP_LOST,
                   "VIPs lost: lease lapsed: last renewal 5012 ms ago; "
                   "re-validating with the peer", 2),
        ReleaseVips(),
    ]
    assert only(acts, Transition)[0].why is Why.VIP_LOST
    # The peer's old view (STANDBY, we have priority) is not enough: listen first.
    acts = advance(e, t2 + 0.01)
    acts += e.handle(peer(t2 + 0.01, S.STANDBY, F.HEALTHY, term=1, hears=t), t2 + 0.01)
    assert transitions(acts) == []
    acts = e.handle(peer(t2 + 0.02, S.STANDBY, F.HEALTHY, term=1, hears=t2), t2 + 0.02)
    assert transitions(acts) == [(S.STANDBY, S.ACTIVE)]
    assert only(acts, AcquireVips) == [AcquireVips(3)]


def test_vips_lost_while_the_peer_took_over_leaves_the_vips_with_the_peer() -> None:
    e, now = active(term=1)
    t = now + 0.02
    acts = e.handle(VipsLost("lease lapsed"), t)
    assert transitions(acts) == [(S.ACTIVE, S.STANDBY)]
    acts = e.handle(peer(t + 0.01, S.ACTIVE, F.HEALTHY | F.SETTLED, term=3, hears=t),
                    t + 0.01)
    acts += feed(e, t + 0.05, t + 3 * DEAD, S.ACTIVE, F.HEALTHY | F.SETTLED, term=3)[0]
    assert transitions(acts) == [] and e.state is S.STANDBY


def test_vips_lost_is_ignored_when_not_active() -> None:
    e, now = standby_with_active_peer()
    acts = e.handle(VipsLost("lease lapsed"), now)
    assert transitions(acts) == [] and not only(acts, ReleaseVips)
    assert e.timers.listen_until is None


# --- the winner announces again when the peer may have announced ------------------------------

def test_a_term_rise_seen_only_in_a_standby_heartbeat_makes_the_holder_announce() -> None:
    """The peer took over while we did not hear it, announced, and yielded: all we see is
    its STANDBY heartbeat with a higher term. Its GARP may have moved clients: announce."""
    e, now = active(term=1)
    e.handle(peer(now + 0.01, S.STANDBY, F.HEALTHY, term=1), now + 0.01)
    advance(e, now + 0.05)
    acts = e.handle(peer(now + 0.05, S.STANDBY, F.HEALTHY, term=3), now + 0.05)
    (ann,) = only(acts, Announce)
    assert "term rose" in ann.reason and transitions(acts) == []
    advance(e, now + 0.09)
    acts = e.handle(peer(now + 0.09, S.STANDBY, F.HEALTHY, term=3), now + 0.09)
    assert not only(acts, Announce), "once per episode"


def test_the_winner_of_a_dual_active_announces_again_when_the_loser_yields() -> None:
    e, now = active(term=4)
    acts = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY, term=5), now + 0.01)
    assert transitions(acts) == [] and len(only(acts, Announce)) == 1  # we win: settled
    advance(e, now + 0.02)
    acts = e.handle(peer(now + 0.02, S.STANDBY, F.HEALTHY, term=5), now + 0.02)
    assert len(only(acts, Announce)) == 1, "the loser may have announced after our first"


def test_an_active_peer_that_does_not_hear_us_is_announced_over_once_it_yields() -> None:
    e, now = active(term=4)
    acts = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY, term=5, hears=False), now + 0.01)
    assert not only(acts, Announce)
    advance(e, now + 0.03)
    acts = e.handle(peer(now + 0.03, S.STANDBY, F.HEALTHY, term=5), now + 0.03)
    assert len(only(acts, Announce)) == 1


def test_a_handover_to_us_does_not_announce_twice() -> None:
    e, now = standby_with_active_peer()
    acts = e.handle(peer(now + 0.01, S.ACTIVE, F.HEALTHY | F.RESIGNING | F.SWITCHOVER,
                         term=1), now + 0.01)
    assert transitions(acts) == [(S.STANDBY, S.ACTIVE)]
    acts = e.handle(peer(now + 0.012, S.ACTIVE, F.HEALTHY | F.RESIGNING | F.SWITCHOVER,
                         term=1), now + 0.012)
    acts += advance(e, now + 0.03)
    acts += e.handle(peer(now + 0.03, S.STANDBY, F.HEALTHY, term=1), now + 0.03)
    acts += advance(e, now + 1.0)
    assert not only(acts, Announce)


def test_no_announcement_while_we_hand_over() -> None:
    e, now = active(term=4)
    e.handle(peer(now + 0.01, S.STANDBY, F.HEALTHY, term=1), now + 0.01)
    e.handle(Command(K.SWITCHOVER), now + 0.02)
    acts = e.handle(peer(now + 0.03, S.ACTIVE, F.HEALTHY | F.PREFERRED, term=e.term + 1),
                    now + 0.03)
    assert transitions(acts) == [(S.ACTIVE, S.STANDBY)] and not only(acts, Announce)


# --- two nodes with one name ----------------------------------------------------------------

def test_a_duplicate_node_name_faults_and_releases_until_it_is_gone() -> None:
    e, now = active(term=1)
    detail = "duplicate node name 'a': the node at 198.51.100.2 also uses it"
    acts = e.handle(DuplicateNode(detail), now + 0.01)
    assert acts[:2] == [Transition(S.ACTIVE, S.FAULT, Why.DUPLICATE_NODE,
                                   detail, e.term), ReleaseVips()]
    refused = e.handle(Command(K.PROMOTE, force=True), now + 0.02)
    assert only(refused, CommandResult)[0].accepted is False
    acts = e.handle(DuplicateNode(detail), now + 0.1)  # still heard: stays FAULT
    acts += advance(e, now + 0.1 + DEAD - EPS)
    assert transitions(acts) == [] and e.state is S.FAULT
    acts = advance(e, now + 0.1 + DEAD)
    assert (S.FAULT, S.STANDBY) in transitions(acts)
