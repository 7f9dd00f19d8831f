"""Who holds the VIPs in a group of nodes arbitrated by etcd: the pure rule.

etcd decides who holds. The holder owns the key ``PREFIX/CLUSTER/holder``, created
put-if-absent in a transaction under the holder's etcd lease: at most one node owns it,
and etcd deletes it when that lease expires. The key's create revision is the term (the
fencing token). Every node publishes its `Member` record under its own lease and watches
the prefix, so each sees who holds and who could (`Observed`).

This module decides what a node asks etcd and when, and how long its kernel gate may be
open: only while its lease is certainly alive on etcd, counted on its own clock from the
*send* time of the last keep-alive etcd answered, for the TTL etcd reported, shortened by
the clock-rate margin of vipd.core.votes. etcd expires a lease no earlier than the TTL
after the last keep-alive it processed, which is after we sent it; so a holder that keeps
its gate within this bound has shut it before etcd can give the key to anyone else
(docs/election.md, "Groups on etcd").

No sockets, no clock, no etcd client: the runtime turns etcd's answers into events and
carries out the actions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from vipd.core.damping import Cause, Damper, DampingConfig, Flap
from vipd.core.election import TRANSITIONS, _name_key
from vipd.core.events import (
    AcquireVips,
    Action,
    CloseGate,
    Command,
    CommandKind,
    CommandResult,
    Effect,
    HealthChanged,
    Hook,
    ReleaseVips,
    RunHook,
    Shutdown,
    Start,
    Tick,
    Transition,
    VipFailed,
    VipsLost,
    Why,
)
from vipd.core.protocol import State
from vipd.core.votes import counted_lease

KEEPALIVES_PER_TTL = 4  # a keep-alive every TTL/4: three may be lost before the gate shuts
MIN_CLAIM_LEASE = 0.5  # share of the TTL our lease must still surely have to claim the key
PROMOTE_FOR = 2.0  # TTLs a promote request stays up before it is dropped
Reason = tuple[Why, str]


class Store(enum.StrEnum):
    """How this node stands with etcd (status, metrics `vipd_etcd_state`, logs)."""

    CONNECTING = "connecting"  # no lease yet
    OK = "ok"
    UNREACHABLE = "unreachable"  # the last call failed; the lease may still be alive
    LEASE_EXPIRED = "lease_expired"  # etcd says our lease is gone: a new one is asked


@dataclass(frozen=True, slots=True)
class GroupConfig:
    node: str
    priority: int = 100
    preempt: bool = True
    preempt_delay: float = 0.0
    ttl: float = 1.0  # the lease TTL asked of etcd
    digest: str = ""  # the config digest each member publishes (mismatches are reported)
    version: str = ""
    vip_retry: float = 5.0  # how long a VIP (netlink) failure keeps the node in FAULT
    damping: DampingConfig = field(default_factory=DampingConfig)  # of preemption
    # A started node waits this long after its first read of the group before it claims
    # (None: one TTL), so members started together elect by priority, not by who reached
    # etcd first (the pair's node waits a dead interval the same way).
    start_wait: float | None = None


@dataclass(frozen=True, slots=True)
class Member:
    """What a node publishes under ``members/NODE`` (and what the others decide by)."""

    node: str
    priority: int
    state: State
    healthy: bool
    maintenance: bool = False
    wants: bool = False  # preempting (after its preempt_delay) or promoted: asks for the VIPs
    promote: bool = False  # an operator's promote: the holder hands over whatever the rank
    preferred: bool = False  # the holder got the VIPs by switchover or promote: not preempted
    version: str = ""
    digest: str = ""
    starting: bool = False  # in its start wait: the others wait for it to end, then a TTL

    @property
    def eligible(self) -> bool:
        return (self.healthy and not self.maintenance
                and self.state in (State.STANDBY, State.ACTIVE))


@dataclass(frozen=True, slots=True)
class Holder:
    node: str
    revision: int  # the key's create revision: the term, the fencing token
    lease: int


@dataclass(frozen=True, slots=True)
class Observed:
    """The group as the watch shows it at etcd revision ``revision``."""

    holder: Holder | None
    members: Mapping[str, Member]
    successor: str | None = None  # a planned handover's target (``successor`` key)
    revision: int = 0


# --- events (besides Start, Tick, HealthChanged, Command, Shutdown, VipFailed, VipsLost) ----

@dataclass(frozen=True, slots=True)
class LeaseGranted:
    lease: int
    ttl: float  # what etcd granted (it may raise a TTL it finds too short)
    sent_at: float  # our clock when the grant request went out


@dataclass(frozen=True, slots=True)
class KeptAlive:
    sent_at: float  # our clock when this keep-alive went out
    ttl: float  # the TTL etcd reports from now on; <= 0: the lease is gone


@dataclass(frozen=True, slots=True)
class StoreFailed:
    detail: str  # an etcd call failed or timed out, the watch broke


@dataclass(frozen=True, slots=True)
class Claimed:
    """The answer to `Claim`: ``won`` or the key was held (``holder``)."""

    won: bool
    holder: Holder | None


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """A reload: the new settings (priority, preempt, ...); the record is republished."""

    cfg: GroupConfig


GroupEvent = (Start | Tick | HealthChanged | Command | Shutdown | VipFailed | VipsLost
              | LeaseGranted | KeptAlive | StoreFailed | Observed | Claimed | Reconfigured)


# --- actions (besides Transition, AcquireVips, ReleaseVips, CloseGate, RunHook,
# CommandResult) ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GrantLease:
    ttl: float


@dataclass(frozen=True, slots=True)
class KeepAlive:
    lease: int


@dataclass(frozen=True, slots=True)
class Publish:
    """Put our record (under our lease). The runtime keeps one put in flight and sends
    the newest record next, and again after a failure: puts that overtook each other
    would leave an older record in etcd."""

    member: Member


@dataclass(frozen=True, slots=True)
class Claim:
    """Create ``holder`` under ``lease`` if absent (and drop the successor hint)."""

    lease: int


@dataclass(frozen=True, slots=True)
class Resign:
    """Delete ``holder`` if its create revision is still ``revision``; with ``successor``,
    name who should claim it next (a planned handover)."""

    revision: int
    successor: str | None = None


@dataclass(frozen=True, slots=True)
class Revoke:
    """Revoke our lease (a clean stop): etcd deletes our member record with it."""

    lease: int


GroupAction = (Action | GrantLease | KeepAlive | Publish | Claim | Resign | Revoke)


@dataclass(slots=True)
class _Timers:
    keepalive_due: float | None = None
    keepalive_sent: float | None = None  # the oldest unanswered keep-alive
    grant_sent: float | None = None
    preempt_since: float | None = None
    free_since: float | None = None  # nobody holds (as we see it) since, or since the
    # member we wait for became the best
    awaited: str | None = None  # the member that should claim (the best eligible)
    settling_since: float | None = None  # we saw the awaited member starting since
    first_view: float | None = None  # this process's first read of the group
    successor_since: float | None = None
    promote_until: float | None = None
    vip_fault_until: float | None = None
    resign_again: float | None = None  # a Resign not yet seen in the watch is sent again


@dataclass(slots=True)
class GroupElection:
    """One node of a group. Drive it with `handle(event, now)`; call again at
    `next_deadline()`."""

    cfg: GroupConfig
    maintenance: bool = False
    state: State = State.INIT
    term: int = 0
    health: bool | None = None
    health_detail: str = ""
    stopping: bool = False
    store: Store = Store.CONNECTING
    store_detail: str = "connecting to etcd"
    lease: int | None = None
    ttl: float = 0.0  # as granted
    lease_until: float = float("-inf")  # our lease is surely alive on etcd before this
    view: Observed = field(default_factory=lambda: Observed(None, {}))
    watching: bool = False  # a first `Observed` came: until then we know nothing of etcd
    holding: Holder | None = None  # our key, while ACTIVE
    preferred: bool = False
    timers: _Timers = field(default_factory=_Timers)
    damper: Damper = field(default_factory=Damper)  # recent failures (may be persisted ones)
    _claim_sent: bool = False
    _wants: bool = False
    _published: Member | None = None
    _pending: list[GroupAction] = field(default_factory=list)
    _vip_fault: str = ""
    _vips_lost: str = ""
    _finished: bool = False
    _last_holder: str | None = None  # another node we saw holding (for the takeover reason)
    _given_up: int = 0  # the revision of the key we last let go (never adopted again)
    _fenced: int = 0  # the revision of the key we self-fenced on but kept
    _resigning: Resign | None = None  # the last Resign, until the watch shows it done
    _now: float = float("-inf")

    # --- public interface ----------------------------------------------------------------

    def handle(self, event: GroupEvent, now: float) -> list[GroupAction]:
        self._now = now
        match event:
            case Start(crashed=crashed):
                self.state = State.INIT
                self._ask_lease(now)
                if crashed:
                    self._flap(Flap(now, Cause.RESTART,
                                    "the daemon started after an unclean exit"))
            case Tick():
                pass
            case LeaseGranted():
                self._on_lease(event, now)
            case KeptAlive():
                self._on_kept_alive(event, now)
            case StoreFailed(detail=detail):
                self.store, self.store_detail = Store.UNREACHABLE, detail
                self._claim_sent = False  # a claim in flight may or may not have landed:
                # the watch tells (our own name under our lease is ours)
            case Observed():
                self._on_observed(event)
            case Claimed():
                self._on_claimed(event, now)
            case HealthChanged(healthy=healthy, detail=detail):
                if healthy is False and self.health is True:
                    self._flap(Flap(now, Cause.HEALTH, f"health check failed: {detail}"))
                self.health, self.health_detail = healthy, detail
                if healthy:
                    self.damper.healthy(now)
            case Command():
                self._on_command(event, now)
            case Shutdown():
                self.stopping = True
            case VipFailed(detail=detail):
                self._vip_fault = detail
                self.timers.vip_fault_until = now + self.cfg.vip_retry
            case VipsLost(detail=detail):
                self._vips_lost = detail
            case Reconfigured(cfg=cfg):
                self.cfg = cfg
        self._keep_alive(now)
        self._evaluate(now)
        self._publish()
        if notice := self.damper.update(now, self.cfg.damping):
            self._pending.append(notice)
        actions, self._pending = self._pending, []
        return actions

    def next_deadline(self) -> float | None:
        t = self.timers
        times = [t.keepalive_due, t.promote_until, t.vip_fault_until, t.resign_again]
        if self.state is State.ACTIVE:
            times.append(self.lease_until)
        if t.grant_sent is not None:
            times.append(t.grant_sent + self._ttl())
        if t.free_since is not None:
            times.append(t.free_since + self._ttl())
        if t.first_view is not None:
            times.append(t.first_view + self._start_wait())
        if t.successor_since is not None:
            times.append(t.successor_since + self._ttl())
        if t.preempt_since is not None:
            times.append(t.preempt_since + self.cfg.preempt_delay)
        times.append(self.damper.deadline(self._now, self.cfg.damping))
        # A deadline already passed was acted on (or cannot be yet: the next event decides).
        return min((x for x in times if x is not None and x > self._now), default=None)

    @property
    def finished(self) -> bool:
        return self._finished

    def gate_limit(self, now: float) -> float | None:
        """Until when the kernel gate may stay open (None: shut it): while we hold the key,
        no later than our lease is surely alive."""
        if self.state is State.ACTIVE and self.holding is not None and now < self.lease_until:
            return self.lease_until
        return None

    def eligible(self, now: float) -> bool:
        vip_fault = self.timers.vip_fault_until is not None and now < self.timers.vip_fault_until
        return (self.health is True and not self.maintenance and not self.stopping
                and not vip_fault)

    def member(self) -> Member:
        """Our record as the others should see it."""
        return Member(self.cfg.node, self.cfg.priority, self.state, self.health is True,
                      self.maintenance, self._wants, self.timers.promote_until is not None,
                      self.preferred and self.state is State.ACTIVE, self.cfg.version,
                      self.cfg.digest, self._starting(self._now))

    # --- etcd's answers ------------------------------------------------------------------

    def _ttl(self) -> float:
        return self.ttl or self.cfg.ttl

    def _start_wait(self) -> float:
        wait = self.cfg.start_wait
        return self._ttl() if wait is None else wait

    def _starting(self, now: float) -> bool:
        first = self.timers.first_view
        return self._start_wait() > 0 and (first is None or now < first + self._start_wait())

    def _ask_lease(self, now: float) -> None:
        self.lease, self.timers.keepalive_due, self.timers.keepalive_sent = None, None, None
        self.timers.grant_sent = now
        self._published = None  # the new lease carries a fresh member record
        self._pending.append(GrantLease(self.cfg.ttl))

    def _on_lease(self, ev: LeaseGranted, now: float) -> None:
        self.lease, self.ttl = ev.lease, ev.ttl
        self.lease_until = ev.sent_at + counted_lease(ev.ttl)
        self.store, self.store_detail = Store.OK, f"lease {ev.lease:x} granted, TTL {ev.ttl:g} s"
        self.timers.grant_sent = None
        self.timers.keepalive_due = now + ev.ttl / KEEPALIVES_PER_TTL

    def _on_kept_alive(self, ev: KeptAlive, now: float) -> None:
        t = self.timers
        if t.keepalive_sent is not None and ev.sent_at >= t.keepalive_sent:
            t.keepalive_sent = None
        if self.lease is None:
            return  # an answer for a lease we already gave up
        if ev.ttl <= 0:
            self.store, self.store_detail = Store.LEASE_EXPIRED, (
                f"etcd says lease {self.lease:x} expired")
            self.lease_until = float("-inf")
            self._ask_lease(now)
            return
        self.store, self.store_detail = Store.OK, f"lease {self.lease:x} kept alive"
        self.lease_until = max(self.lease_until, ev.sent_at + counted_lease(ev.ttl))

    def _keep_alive(self, now: float) -> None:
        """One keep-alive every TTL/4; an unanswered one is sent again at the next slot."""
        t = self.timers
        if self.lease is not None and t.keepalive_due is not None and now >= t.keepalive_due:
            t.keepalive_sent = now if t.keepalive_sent is None else t.keepalive_sent
            t.keepalive_due = now + self._ttl() / KEEPALIVES_PER_TTL
            self._pending.append(KeepAlive(self.lease))
        elif self.lease is None and t.grant_sent is not None and now >= t.grant_sent + self._ttl():
            self._ask_lease(now)  # the grant got no answer

    def _outdated(self, holder: Holder) -> bool:
        """An answer about a key older than what we know: one we gave up, or one the
        watch has already shown replaced."""
        if holder.revision == self._given_up:
            return True
        return self.view.revision >= holder.revision and self.view.holder != holder

    def _on_observed(self, view: Observed) -> None:
        if view.revision < self.view.revision:
            return  # older than what we know (our own claim's answer came first)
        self.view, self.watching = view, True
        if self.timers.first_view is None:
            self.timers.first_view = self._now
        if view.holder is not None and view.holder.node != self.cfg.node:
            self._last_holder = view.holder.node

    def _on_claimed(self, ev: Claimed, now: float) -> None:
        self._claim_sent = False
        if ev.holder is not None and self._outdated(ev.holder):
            return  # a late answer: we let that key go, or etcd has shown a newer holder
        if ev.won and ev.holder is not None:
            self.holding = ev.holder
            self.view = replace(self.view, holder=ev.holder,
                                revision=max(self.view.revision, ev.holder.revision))
        elif ev.holder is not None:
            self.view = replace(self.view, holder=ev.holder)
            if ev.holder.node != self.cfg.node:
                self._last_holder = ev.holder.node

    # --- commands ------------------------------------------------------------------------

    def _on_command(self, cmd: Command, now: float) -> None:
        kind = cmd.kind
        if kind is CommandKind.MAINTENANCE_ON:
            self.maintenance = True
            self._result(kind, True, "maintenance on")
        elif kind is CommandKind.MAINTENANCE_OFF:
            self.maintenance = False
            self._result(kind, True, "maintenance off")
        elif kind is CommandKind.SWITCHOVER:
            if self.state is not State.ACTIVE or self.holding is None:
                self._result(kind, False, f"not the holder (the holder is {self._holder_name()})")
                return
            target = self._successor(cmd.target)
            if target is None:
                self._result(kind, False, "no eligible member to switch over to"
                             + (f" (asked for {cmd.target!r})" if cmd.target else ""))
                return
            self._result(kind, True, f"handing over to {target}")
            self._hand_over(target, State.STANDBY, f"switchover to {target}", now)
        elif kind is CommandKind.PROMOTE:
            if self.state is State.ACTIVE:
                self._result(kind, False, "already the holder")
            elif not self.eligible(now):
                self._result(kind, False, "not eligible (unhealthy or in maintenance)")
            else:
                self.timers.promote_until = now + PROMOTE_FOR * self._ttl()
                self._result(kind, True, f"asked {self._holder_name()} to hand over")

    def _result(self, kind: CommandKind, ok: bool, message: str) -> None:
        self._pending.append(CommandResult(kind, ok, message))

    def _holder_name(self) -> str:
        return self.view.holder.node if self.view.holder is not None else "nobody"

    # --- the rule ------------------------------------------------------------------------

    def _evaluate(self, now: float) -> None:
        t = self.timers
        if t.promote_until is not None and (now >= t.promote_until or self.state is State.ACTIVE):
            t.promote_until = None
        if t.vip_fault_until is not None and now >= t.vip_fault_until:
            t.vip_fault_until = None
        if self.state is State.ACTIVE:
            self._evaluate_active(now)
        if self.state is not State.ACTIVE:
            self._evaluate_other(now)

    def _evaluate_active(self, now: float) -> None:
        assert self.holding is not None
        held = self.holding
        if now >= self.lease_until:
            ago = "never" if self.timers.keepalive_sent is None else (
                f"unanswered for {round(1000 * (now - self.timers.keepalive_sent))} ms")
            self._step_down(State.STANDBY, (Why.LEASE_EXPIRED, (
                f"self-fence: etcd lease {self.lease or 0:x} may expire now (keep-alive "
                f"{ago}; {self.store_detail})")), now, resign=False)
        elif self.view.holder != held:
            who = self.view.holder.node if self.view.holder else "nobody"
            self._step_down(State.STANDBY, (Why.KEY_LOST, (
                f"the holder key (revision {held.revision}) is gone; etcd shows {who}")),
                now, resign=False)
        elif self.health is False:
            self._step_down(State.FAULT, (Why.HEALTH, (
                f"health check failing: {self.health_detail}")), now, resign=True)
        elif self.timers.vip_fault_until is not None:
            self._step_down(State.FAULT, (Why.VIP_ERROR, self._vip_fault), now, resign=True)
        elif self._vips_lost:
            self._step_down(State.STANDBY, (Why.VIP_LOST, self._vips_lost), now, resign=True)
        elif self.stopping or self.maintenance:
            target = State.STOPPED if self.stopping else State.MAINTENANCE
            why = Why.SHUTDOWN if self.stopping else Why.MAINTENANCE
            successor = self._successor("")
            text = target.name.lower() + (f": handing over to {successor}" if successor
                                          else ": no eligible member to hand over to")
            self._step_down(target, (why, text), now, resign=True, successor=successor)
        else:
            taker = self._preemptor()
            if taker is not None:
                self._hand_over(taker.node, State.STANDBY, (
                    f"{taker.node} " + ("was promoted" if taker.promote else
                                        f"has priority {taker.priority} over our "
                                        f"{self.cfg.priority} and preempts")), now)

    def _hand_over(self, target: str, new: State, text: str, now: float) -> None:
        """Break before make: our gate shuts and the VIPs go before the key does."""
        self._step_down(new, (Why.HANDED_OVER, f"handing over to {target}: {text}"
                              if not text.startswith("switchover") else text),
                        now, resign=True, successor=target)

    def _step_down(self, new: State, reason: Reason, now: float, *, resign: bool,
                   successor: str | None = None) -> None:
        held = self.holding
        if resign and successor is None:
            successor = self._successor("")  # saves the others sorting it out from stale views
        self._pending.append(CloseGate(reason[1]))
        self._transition(new, reason, now)
        if held is not None and resign:
            self._resign(Resign(held.revision, successor), now)
            self._given_up = held.revision
        elif held is not None:
            # Kept (a self-fence): etcd may answer again with the lease alive, the key
            # still ours, and then we hold again without the VIPs moving (`_take_over`).
            self._fenced = held.revision
        self.holding = None

    def _evaluate_other(self, now: float) -> None:
        target, reason = self._target_state(now)
        if target is not self.state and reason is not None:
            self._transition(target, reason, now)
        self._resign_again(now)
        mine = self.view.holder
        if (self.holding is None and mine is not None and mine.node == self.cfg.node
                and mine.lease == self.lease and mine.revision != self._given_up):
            # Ours: a claim whose answer was lost did land, or we self-fenced and kept
            # it. Take it up once our lease is surely alive for a while; meanwhile the
            # others wait for it, and if the lease does expire etcd deletes the key.
            waiting = (self.state is State.STANDBY and self.eligible(now)
                       and self.lease_until - now < MIN_CLAIM_LEASE * self._ttl())
            if not waiting:
                self.holding = mine
        if self.state is not State.STANDBY:
            self._wants, self.timers.preempt_since = False, None
            self.timers.free_since = self.timers.successor_since = None
            if self.holding is not None:  # a node that cannot hold never sits on the key
                self._resign(Resign(self.holding.revision, self._successor("")), now)
                self._given_up, self.holding = self.holding.revision, None
            if self.state is State.STOPPED and not self._finished:
                self._finished = True
                if self.lease is not None:
                    self._pending.append(Revoke(self.lease))
            return
        if self.holding is not None:
            self._take_over(now)
            return
        self._wants = self._wants_vips(now)
        self._maybe_claim(now)

    def _target_state(self, now: float) -> tuple[State, Reason | None]:
        if self.state is State.STOPPED:
            return State.STOPPED, None
        if self.stopping:
            return State.STOPPED, (Why.SHUTDOWN, "shutdown")
        if self.maintenance:
            return State.MAINTENANCE, (Why.MAINTENANCE, "maintenance on")
        if self.timers.vip_fault_until is not None:
            return State.FAULT, (Why.VIP_ERROR, self._vip_fault)
        if self.health is False:
            return State.FAULT, (Why.HEALTH, f"health check failing: {self.health_detail}")
        if self.state is State.INIT:
            return State.STANDBY, (Why.START, "started")
        if self.state is not State.STANDBY:
            why = "maintenance off" if self.state is State.MAINTENANCE else "healthy again"
            return State.STANDBY, (Why.RECOVERED, why)
        return State.STANDBY, None

    def _maybe_claim(self, now: float) -> None:
        """Nobody holds: the best eligible member claims; the others wait one TTL for it
        (etcd's transaction decides if two try)."""
        t, view = self.timers, self.view
        self._vips_lost = ""
        if not self.watching:
            return  # nothing is known of etcd's keys yet
        if view.holder is not None:
            t.free_since = t.successor_since = t.awaited = None
            return
        successor = view.successor if view.successor in view.members else None
        if successor is None:
            t.successor_since = None
            best = self._best_eligible()
            if t.free_since is None or best != t.awaited:
                # a better member came: wait for it
                t.free_since, t.awaited, t.settling_since = now, best, None
            record = view.members.get(best) if best is not None else None
            if record is not None and record.starting:
                # ... while it is starting, and one TTL after; never longer than one
                # start wait (a TTL) for a record that stays "starting" (a stuck watch)
                t.settling_since = now if t.settling_since is None else t.settling_since
                if now < t.settling_since + self._ttl():
                    t.free_since = now
        else:
            t.successor_since = now if t.successor_since is None else t.successor_since
        if not self.eligible(now) or self._claim_sent or self.lease is None:
            return
        if self.lease_until - now < MIN_CLAIM_LEASE * self._ttl():
            return  # our lease may be about to lapse: a claim now would hold for nothing
        waits_for = successor if successor is not None else t.awaited
        since = t.successor_since if successor is not None else t.free_since
        if waits_for != self.cfg.node and since is not None and now < since + self._ttl():
            return
        if successor != self.cfg.node and t.promote_until is None and self._starting(now):
            return  # just started: the others of a group started together show up first
        self._claim_sent = True
        self._pending.append(Claim(self.lease))

    def _take_over(self, now: float) -> None:
        """Our claim won: hold the VIPs if we still may; otherwise give the key back."""
        assert self.holding is not None
        if not self.eligible(now) or now >= self.lease_until:
            self._resign(Resign(self.holding.revision), now)
            self._given_up, self.holding = self.holding.revision, None
            return
        view, last = self.view, self._last_holder
        if self.holding.revision == self._fenced:
            reason = (Why.RECOVERED, f"etcd answers again and the holder key (revision "
                                     f"{self.holding.revision}) is still ours")
        elif view.successor == self.cfg.node:
            self.preferred = True
            reason = (Why.PEER_HANDOVER, f"{last or 'the holder'} handed over to us")
        elif self.timers.promote_until is not None:
            self.preferred = True
            reason = (Why.PROMOTE, "operator promote")
        elif last is not None:
            reason = (Why.PEER_DEAD, f"the holder key of {last} is gone (lease expired or "
                                     f"released)")
        else:
            reason = (Why.NO_PEER, "nobody holds the VIPs")
        self._transition(State.ACTIVE, reason, now)

    def _resign(self, resign: Resign, now: float) -> None:
        self._resigning = resign
        self.timers.resign_again = now + self._ttl() / KEEPALIVES_PER_TTL
        self._pending.append(resign)

    def _resign_again(self, now: float) -> None:
        """A key we let go that etcd still shows as ours (the call failed, etcd was down):
        ask again, at the keep-alive pace, until the watch shows it gone."""
        held, r = self.view.holder, self._resigning
        if r is None or held is None or held.revision != r.revision:
            self._resigning, self.timers.resign_again = None, None
            return
        due = self.timers.resign_again
        if due is not None and now >= due:
            self._resign(r, now)

    def _wants_vips(self, now: float) -> bool:
        """A standby asks the holder for the VIPs: promoted, or preempting after its delay."""
        t, holder = self.timers, self.view.holder
        if t.promote_until is not None:
            return True
        current = self.view.members.get(holder.node) if holder is not None else None
        better = (self.cfg.preempt and current is not None and self.eligible(now)
                  and not current.preferred and self.cfg.priority > current.priority
                  and self.damper.until(now, self.cfg.damping) is None)
        if not better:
            t.preempt_since = None
            return False
        t.preempt_since = now if t.preempt_since is None else t.preempt_since
        return now >= t.preempt_since + self.cfg.preempt_delay

    def _flap(self, flap: Flap) -> None:
        """Count a failure of our own for flap damping; the runtime logs and persists it."""
        if notice := self.damper.fail(flap, self.cfg.damping):
            self._pending.append(notice)

    def _preemptor(self) -> Member | None:
        """The member the holder should hand over to now: promoted, or of higher priority
        and asking (unless we got the VIPs by an operator's move)."""
        askers = [m for m in self.view.members.values()
                  if m.node != self.cfg.node and m.eligible and m.wants
                  and (m.promote or (not self.preferred and m.priority > self.cfg.priority))]
        return max(askers, key=lambda m: (m.promote, m.priority, _name_key(m.node)),
                   default=None)

    def _best_eligible(self) -> str | None:
        """By the pair's rule: priority, then the smaller name (the incumbent rule applies
        to a holder; here nobody holds)."""
        members = dict(self.view.members)
        members[self.cfg.node] = self.member()
        ranked = [m for m in members.values() if m.eligible and m.state is State.STANDBY]
        best = max(ranked, key=lambda m: (m.priority, _name_key(m.node)), default=None)
        return best.node if best is not None else None

    def _successor(self, wanted: str) -> str | None:
        others = {n: m for n, m in self.view.members.items()
                  if n != self.cfg.node and m.eligible and m.state is State.STANDBY}
        if wanted:
            return wanted if wanted in others else None
        best = max(others.values(), key=lambda m: (m.priority, _name_key(m.node)),
                   default=None)
        return best.node if best is not None else None

    def _transition(self, new: State, reason: Reason, now: float) -> None:
        old = self.state
        if new is State.ACTIVE:
            assert self.holding is not None
            self.term = self.holding.revision
        self.state = new
        if old is State.ACTIVE:
            self.preferred = False
        self._pending.append(Transition(old, new, *reason, self.term))
        for effect in TRANSITIONS[(old, new)]:
            match effect:
                case Effect.ACQUIRE:
                    self._pending.append(AcquireVips(self.term))
                case Effect.RELEASE:
                    self._pending.append(ReleaseVips())
                case Effect.HEARTBEAT:
                    pass  # the member record is republished when it changes
                case Hook():
                    self._pending.append(RunHook(effect, new, self.term))

    def _publish(self) -> None:
        if self.lease is None:
            return
        record = self.member()
        if record != self._published:
            self._published = record
            self._pending.append(Publish(record))
