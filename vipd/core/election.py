"""The election state machine: who holds the VIPs. Pure: events and `now` in, actions out.

Rule 1: everything that decides a state or a transition lives in this file.

               Start                 peer dead / resigning / ineligible,
    INIT ---------------> STANDBY ---- or we win the election --------> ACTIVE
                           ^  ^  <---- handover done / split brain lost ---  |
           health back     |  |                                            |
    FAULT -----------------+  +--------- maintenance off ---- MAINTENANCE  |
      ^  health fails (any state; ACTIVE releases first)           ^       |
      +------------------------------------------------------------+-------+
    every state --Shutdown--> STOPPED   (ACTIVE hands over first when it can)

Theory of operation
-------------------
Both nodes evaluate the same rule on the same facts (their own state and the peer's last
authenticated heartbeat), so they agree without a third party:

* A standby takes over when the peer is dead (no valid heartbeat for `dead_after`
  intervals), resigning, or ineligible (FAULT, MAINTENANCE, STOPPED, health unknown); and
  when both are healthy standbys, the higher effective priority (then the smaller node
  name) takes over. A freshly started node first waits one dead interval or until it
  hears the peer, so a restart never grabs the VIPs from a live active.
* Handover is make-before-break: the active sets RESIGNING; the peer takes over with a
  higher term and announces; the old active releases when it sees that. Switchover,
  promote, maintenance, preemption and graceful stop all use it, so none of them leaves
  a gap. Preemption is a request (WANT_ACTIVE) the active grants unless an operator
  chose it (PREFERRED); a switchover makes the new active PREFERRED.
* Terms are fencing tokens: every takeover uses max(own, peer) + 1. When both are
  ACTIVE and hear each other, the lower term (the incumbent) wins and the newcomer yields,
  so a false suspicion costs one brief double announcement, never a move. A node that
  hears an active peer which does not hear it (the peer's echo is stale: a one-way link)
  yields after one dead interval, because the peer can never learn it should yield.
  Whenever the peer may have announced the VIPs since our last announcement (we saw it
  ACTIVE, or its term rose), the holder announces again as soon as it alone claims them,
  so clients that followed the other node's gratuitous ARP come back at once.
* A node's own stall is never its peer's silence. When an event arrives more than
  STALL_INTERVALS intervals after the deadline we asked for (a paused VM, SIGSTOP, a
  starved loop), the node listens before it judges: no takeover until a heartbeat
  answers one it sent after the stall, or one dead interval has passed. A holder whose
  VIP lease lapsed meanwhile (VipsLost) steps down and re-validates the same way.
* A node that failed recently (its health, or a crash of the daemon) does not preempt
  until it has been healthy for a hold-down time (vipd/core/damping.py), so a flapping
  preferred node moves the VIPs at most twice, not twice per flap.
* FAULT and MAINTENANCE never hold VIPs: leaving ACTIVE always releases first. Two live
  nodes with the same name (DuplicateNode) are a configuration error: both go FAULT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vipd.core.damping import Cause, Damper, Flap
from vipd.core.events import (  # re-exported: callers use election.Start etc.
    AcquireVips,
    Action,
    Announce,
    AskVotes,
    CloseGate,
    Command,
    CommandKind,
    CommandResult,
    DampingChanged,
    DuplicateNode,
    Effect,
    ElectionConfig,
    Event,
    HealthChanged,
    HeartbeatReceived,
    Hook,
    Reconfigure,
    ReleaseVips,
    RunHook,
    SendHeartbeat,
    Shutdown,
    Start,
    Tick,
    Transition,
    VipFailed,
    VipsLost,
    VoteReplied,
    Warn,
    Why,
)
from vipd.core.protocol import Advert, Flag, Heartbeat, Received, State, Verdict, flag_of
from vipd.core.votes import Ballot, Tally

ELIGIBLE_STATES = (State.STANDBY, State.ACTIVE)
# Flag bits as plain ints: `Flag.X.value` and IntFlag arithmetic run Python code in the
# enum module, which counts on a path that runs for every heartbeat.
_HEALTHY, _HEALTH_PENDING, _PREEMPT = (int(f) for f in (
    Flag.HEALTHY, Flag.HEALTH_PENDING, Flag.PREEMPT))
_RESIGNING, _SWITCHOVER, _PREFERRED = (int(f) for f in (
    Flag.RESIGNING, Flag.SWITCHOVER, Flag.PREFERRED))
_WANT_ACTIVE, _SETTLED, _PROMOTE = (int(f) for f in (
    Flag.WANT_ACTIVE, Flag.SETTLED, Flag.PROMOTE))
_VOTE, _CANDIDATE = int(Flag.VOTE), int(Flag.CANDIDATE)


S = State
A, R, H = Effect.ACQUIRE, Effect.RELEASE, Effect.HEARTBEAT
# Side effects of each allowed transition, in order (a Transition action always comes
# first). A transition missing here is a bug and raises. HEARTBEAT does not emit at
# once: it marks the heartbeat due, and every step ends with at most one SendHeartbeat, so
# the peer always learns the final state of a step (FAULT -> STANDBY -> ACTIVE sends one
# ACTIVE heartbeat). ACQUIRE includes the announcement burst. The runtime starts hooks as
# background tasks, so they never delay it.
TRANSITIONS: dict[tuple[State, State], tuple[Effect | Hook, ...]] = {
    (S.INIT, S.STANDBY): (H,),
    (S.INIT, S.FAULT): (H, Hook.ON_FAULT),
    (S.INIT, S.MAINTENANCE): (H,),
    (S.INIT, S.STOPPED): (),
    (S.STANDBY, S.ACTIVE): (A, H, Hook.ON_ACTIVE),
    (S.STANDBY, S.FAULT): (H, Hook.ON_FAULT),
    (S.STANDBY, S.MAINTENANCE): (H,),
    (S.STANDBY, S.STOPPED): (H,),
    (S.ACTIVE, S.STANDBY): (R, H, Hook.ON_STANDBY),
    (S.ACTIVE, S.FAULT): (R, H, Hook.ON_FAULT),
    (S.ACTIVE, S.MAINTENANCE): (R, H, Hook.ON_STANDBY),
    (S.ACTIVE, S.STOPPED): (R, H, Hook.ON_STANDBY),
    (S.FAULT, S.STANDBY): (H, Hook.ON_STANDBY),
    (S.FAULT, S.MAINTENANCE): (H,),
    (S.FAULT, S.STOPPED): (H,),
    (S.MAINTENANCE, S.STANDBY): (H, Hook.ON_STANDBY),
    (S.MAINTENANCE, S.FAULT): (H, Hook.ON_FAULT),
    (S.MAINTENANCE, S.STOPPED): (H,),
}
Reason = tuple[Why, str]  # the code (metrics) and the text (logs) of a transition

PENDING_WAIT = 2.0  # how long a standby waits for a starting peer that would win
BURST = 2  # extra copies of a changed heartbeat, at interval / 8 spacing
ANSWER_WINDOW = 0.5  # a heartbeat due within this share of an interval goes out with a peer's
ANSWER_GRACE = 1.25  # ...and the next one is due this many intervals later, unless answered
ANSWER_HOLD = 0.25  # a peer heartbeat sent this soon after it heard our latest is an answer
STALL_INTERVALS = 2.0  # an event this many intervals past our deadline means we were stalled


@dataclass(slots=True)
class PeerView:
    heartbeat: Heartbeat
    received_at: float
    echo_sent_at: float | None


@dataclass(slots=True)
class Handover:
    target: State
    deadline: float
    switchover: bool


@dataclass(slots=True)
class WitnessView:
    """A witness's last answer to us (status, metrics)."""

    at: float
    verdict: Verdict
    wait: float


@dataclass(slots=True)
class _Timers:
    holddown_until: float = 0.0
    preempt_since: float | None = None
    concede_at: float | None = None
    promote_until: float | None = None
    vip_fault_until: float | None = None
    winner_idle_since: float | None = None
    winner_idle_limit: float = 0.0
    active_since: float | None = None
    listen_until: float | None = None  # after a stall: no takeover before this ...
    listen_from: float = 0.0  # ... unless a heartbeat echoes one we sent since this
    duplicate_until: float | None = None  # FAULT: another node uses our name
    ask_at: float | None = None  # arbiter: ask the witnesses again (a HELD vote frees then)


@dataclass(slots=True)
class Election:
    """One node's view. Drive it with `handle(event, now)`; call again at `next_deadline()`."""

    cfg: ElectionConfig
    term: int = 0
    maintenance: bool = False
    state: State = State.INIT
    health: bool | None = None
    health_detail: str = ""
    health_override: bool = False  # forced promote: act as healthy until the checks recover
    preferred: bool = False
    stopping: bool = False
    want_active: bool = False
    peer: PeerView | None = None
    peer_term_seen: int = 0
    handover: Handover | None = None
    timers: _Timers = field(default_factory=_Timers)
    # Arbiter (cfg.arbiter): our own vote, the votes we hold, why we ask for them.
    ballot: Ballot | None = None
    tally: Tally | None = None
    campaign: Reason | None = None  # a takeover waiting for a majority of votes
    witnesses: dict[str, WitnessView] = field(default_factory=dict)
    damper: Damper = field(default_factory=Damper)  # recent failures (may be persisted ones)
    _pending: list[Action] = field(default_factory=list)  # from helpers, flushed by handle()
    _heard_peer: bool = False
    _dual_announced: bool = False
    _peer_announced: bool = False  # the peer may have announced since our last announcement
    _vips_lost: str = ""  # why the holder's VIPs may be gone (VipsLost), until acted on
    _fault_detail: str = ""
    _duplicate_detail: str = ""
    _next_send: float | None = None
    _burst_left: int = 0
    _digest_warned: bytes | None = None
    _promote_now: bool = False
    _settled_sent: bool = False  # the SETTLED flag of our last heartbeat
    _advert: Advert | None = None  # the last one made, reused while nothing changes
    _last_sent: float | None = None
    _now: float = float("-inf")

    # --- public interface ----------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        actions: list[Action] = []
        if now - self._now > self.cfg.interval * STALL_INTERVALS and self.state is not State.INIT:
            actions += self._check_stall(now)
        self._now = max(self._now, now)
        answering = False
        match event:
            case Start(crashed=crashed):
                if self.state is State.INIT:
                    if crashed:
                        self._flap(Flap(now, Cause.RESTART,
                                        "the daemon started after an unclean exit"))
                    self.timers.holddown_until = now + self.cfg.dead_interval
                    if self.cfg.arbiter:
                        self.ballot = Ballot.started(self.cfg.vote_lease, now)
                        self.tally = Tally(self.cfg.voters)
                    self._next_send = now
                    target = State.MAINTENANCE if self.maintenance else State.STANDBY
                    actions += self._transition(target, (Why.START, "started"), now)
            case Tick():
                pass
            case HeartbeatReceived(received=rx):
                actions += self._on_heartbeat(rx)
                answering = not self._is_answer(rx)
            case HealthChanged(healthy=healthy, detail=detail):
                if healthy is False and self.health is True:
                    self._flap(Flap(now, Cause.HEALTH, f"health check failed: {detail}"))
                self.health, self.health_detail = healthy, detail
                if healthy:
                    self.health_override = False
                    self.damper.healthy(now)
            case Command():
                actions += self._on_command(event, now)
            case Shutdown():
                self.stopping = True
            case VipFailed(detail=detail):
                self._fault_detail = f"VIP operation failed: {detail}"
                self.timers.vip_fault_until = now + self.cfg.vip_retry
            case VipsLost(detail=detail):
                if self.state is State.ACTIVE:
                    self._vips_lost = detail
                    self._listen(now)
            case DuplicateNode(detail=detail):
                self._duplicate_detail = detail
                self.timers.duplicate_until = now + self.cfg.dead_interval
            case Reconfigure(cfg=cfg):
                self.cfg = cfg
            case VoteReplied():
                self._on_vote_reply(event, now)
        if self.state is not State.INIT:
            actions += self._evaluate(now)
            actions += self._pending
            self._pending = []
            actions += self._maybe_send(now, answering=answering)
            if notice := self.damper.update(now, self.cfg.damping):
                actions.append(notice)
        if self._promote_now:  # one-shot: a promote that could not act now does not linger
            self._promote_now = False
            if self.state is not State.ACTIVE:
                self.health_override = False
        return actions

    def next_deadline(self) -> float | None:
        if self.state is State.INIT or self.finished:
            return None
        t, dead = self.timers, self.cfg.dead_interval
        candidates = [self._next_send]
        if self.state is not State.STOPPED:
            if self.peer is not None:
                candidates.append(self.peer.received_at + dead)
            if not self._heard_peer:
                candidates.append(t.holddown_until)
            if t.preempt_since is not None and not self.want_active:
                candidates.append(t.preempt_since + self.cfg.preempt_delay)
            candidates.append(self.damper.deadline(self._now, self.cfg.damping))
            candidates += [t.listen_until, t.duplicate_until]
            if t.winner_idle_since is not None:
                candidates.append(t.winner_idle_since + t.winner_idle_limit)
            if self.handover is not None:
                candidates.append(self.handover.deadline)
            candidates += [t.concede_at, t.promote_until, t.vip_fault_until]
            if self.tally is not None and self.state is State.ACTIVE:
                candidates.append(self.tally.majority_until(self._now))  # self-fence
            if self.campaign is not None:
                candidates.append(t.ask_at)
                if self.ballot is not None:  # our own vote frees (start-up, peer's lease)
                    candidates.append(self._now + self.ballot.wait(self._now))
        # Everything at or before the last handled time has been acted on already.
        return min((c for c in candidates if c is not None and c > self._now), default=None)

    @property
    def finished(self) -> bool:
        """Stopped and the final heartbeats are out: the runtime may exit."""
        return self.state is State.STOPPED and self._burst_left == 0

    def ready(self, now: float) -> bool:
        """The first election decision is made (systemd READY=1, /readyz)."""
        if self.state in (State.INIT, State.STOPPED):
            return False
        known = self._health is not None or self.maintenance
        return known and (self._heard_peer or now >= self.timers.holddown_until)

    def peer_alive(self, now: float) -> bool:
        return self.peer is not None and now < self.peer.received_at + self.cfg.dead_interval

    def peer_hears_us(self, now: float) -> bool:
        """The peer's last heartbeat echoes one of ours sent within the dead interval."""
        sent = self.peer.echo_sent_at if self.peer is not None else None
        return sent is not None and now <= sent + self.cfg.dead_interval

    def peer_eligible(self, now: float) -> bool:
        if not self.peer_alive(now):
            return False
        assert self.peer is not None
        hb = self.peer.heartbeat
        return (hb.state in ELIGIBLE_STATES and Flag.HEALTHY in hb.flags
                and Flag.RESIGNING not in hb.flags)

    def damped_until(self, now: float) -> float | None:
        """Until when flap damping keeps this node from preempting (inf: until it has
        been healthy for the hold-down; None: not damped)."""
        return self.damper.until(now, self.cfg.damping)

    @property
    def _health(self) -> bool | None:
        """The health the election acts on: the checks' verdict, or True while a forced
        promote overrides it (until the checks recover)."""
        return True if self.health_override else self.health

    def advert(self) -> Advert:
        active = self.state is State.ACTIVE
        flags = 0
        if self._health:
            flags |= _HEALTHY
        elif self._health is None and self.state is State.STANDBY:
            flags |= _HEALTH_PENDING
        if self.cfg.preempt:
            flags |= _PREEMPT
        if self.handover is not None:
            flags |= _RESIGNING
            if self.handover.switchover:
                flags |= _SWITCHOVER
        if self.preferred and active:
            flags |= _PREFERRED
        if self.want_active:
            flags |= _WANT_ACTIVE
        if self._settled_sent and active:
            flags |= _SETTLED
        if self.timers.promote_until is not None:
            flags |= _PROMOTE
        if self.campaign is not None:
            flags |= _CANDIDATE
        if self._votes_for_peer():
            flags |= _VOTE
        last = self._advert
        if (last is not None and last.state is self.state and last.flags == flags
                and last.term == self.term and last.priority == self.cfg.priority):
            return last  # a reload may change the priority: cfg is replaced then
        self._advert = Advert(state=self.state, flags=flag_of(flags), term=self.term,
                              priority=self.cfg.priority,
                              effective_priority=self.cfg.priority)
        return self._advert

    # --- events --------------------------------------------------------------------------

    def _on_heartbeat(self, rx: Received) -> list[Action]:
        hb = rx.heartbeat
        t = self.timers
        if hb.state is State.ACTIVE and not (
                Flag.RESIGNING in hb.flags and hb.term < self.term):  # not handing over to us
            self._peer_announced = True
        elif self.peer is not None and hb.term > self.peer_term_seen:
            self._peer_announced = True  # it took over (and announced) since we last heard it
        self.peer = PeerView(hb, rx.received_at, rx.echo_sent_at)
        # Only a heartbeat that echoes our own boot ends the start-up hold-down: a
        # datagram replayed from before we started cannot.
        self._heard_peer = self._heard_peer or rx.confirmed
        self.peer_term_seen = max(self.peer_term_seen, hb.term)
        if (t.listen_until is not None and rx.echo_sent_at is not None
                and rx.echo_sent_at >= t.listen_from):
            t.listen_until = None  # the peer answered us after the stall: judge again
        if self.tally is not None:
            self._peer_votes(rx)
        if self.cfg.digest and hb.settings_digest != self.cfg.digest:
            if self._digest_warned != hb.settings_digest:
                self._digest_warned = hb.settings_digest
                return [Warn(f"peer {hb.node} has different pair settings (cluster, VIPs, "
                             f"interval, dead_after): digest {hb.settings_digest.hex()} vs "
                             f"ours {self.cfg.digest.hex()}")]
        elif self._digest_warned is not None:
            self._digest_warned = None
            return [Warn(f"peer {hb.node} pair settings match again")]
        return []

    # --- votes (arbiter) -------------------------------------------------------------------

    def _peer_votes(self, rx: Received) -> None:
        """The peer's heartbeat as a voter (its vote for us) and as a candidate (asking
        for ours). Its VOTE counts from when we sent the heartbeat it echoes."""
        assert self.tally is not None and self.ballot is not None
        hb, now = rx.heartbeat, rx.received_at
        # A heartbeat without VOTE withdraws nothing: a grant holds until its lease ends
        # (or we give it back), and we count it for less than that.
        if Flag.VOTE in hb.flags and rx.echo_sent_at is not None:
            self.tally.record(hb.node, rx.echo_sent_at, self.cfg.vote_lease)
        asks = hb.state is State.ACTIVE or Flag.CANDIDATE in hb.flags
        if Flag.RESIGNING in hb.flags or not asks:
            # Break-before-make (RESIGNING), or it asks no more (it left ACTIVE, its
            # campaign ended): its gate is shut, it cleared its count before sending
            # this, and it never counts an answer to an earlier request (Tally.floor).
            self.ballot.release(hb.node)
            return
        mine = (self.state is State.ACTIVE and self.handover is None) or (
            self.campaign is not None)
        # Our vote travels only in our heartbeats: granted to a peer that does not hear
        # them, it would reach nobody and only keep us from using it ourselves.
        if asks and not mine and rx.confirmed and self.peer_hears_us(now):
            self.ballot.grant(hb.node, now)

    def _votes_for_peer(self) -> bool:
        """Our heartbeat may say VOTE: the vote is the peer's, granted at or after we
        received the heartbeat of its that ours will echo (the newest one)."""
        ballot, peer = self.ballot, self.peer
        return (ballot is not None and peer is not None
                and ballot.holder(self._now) == peer.heartbeat.node
                and ballot.granted_at >= peer.received_at)

    def _on_vote_reply(self, reply: VoteReplied, now: float) -> None:
        if self.tally is None:
            return
        self.witnesses[reply.voter] = WitnessView(now, reply.verdict, reply.wait)
        if reply.verdict is Verdict.GRANTED and reply.request_sent_at is not None:
            self.tally.record(reply.voter, reply.request_sent_at, reply.lease)
            return
        self.tally.drop(reply.voter)
        if reply.verdict in (Verdict.HELD, Verdict.RESTARTING, Verdict.STALE):
            # Ask again the moment the vote may be free (a crashed holder's lease ends).
            again = now + min(reply.wait + 0.001, self.cfg.interval)
            t = self.timers
            t.ask_at = again if t.ask_at is None else min(t.ask_at, again)

    def _self_vote(self, now: float) -> None:
        """Holding or campaigning: our own vote is ours, renewed at every step."""
        assert self.ballot is not None and self.tally is not None
        if self.ballot.grant(self.cfg.node, now) is Verdict.GRANTED:
            self.tally.record(self.cfg.node, now, self.cfg.vote_lease)

    def _elected(self, reason: Reason, now: float) -> bool:
        """A standby that should take over asks for votes first: True once it holds a
        majority of them."""
        assert self.tally is not None
        first = self.campaign is None
        self.campaign = reason
        self._self_vote(now)
        until = self.tally.majority_until(now)
        if until is not None:
            return True
        t = self.timers
        if first or (t.ask_at is not None and now >= t.ask_at):
            t.ask_at = None
            self._pending.append(AskVotes())
        if first:
            self._send_now(now)  # the CANDIDATE heartbeat asks the peer
        return False

    def _end_campaign(self) -> None:
        """No longer a candidate: our vote is free again (we never opened the gate)."""
        if self.campaign is None:
            return
        self.campaign = None
        self.timers.ask_at = None
        assert self.ballot is not None and self.tally is not None
        self.ballot.release(self.cfg.node)
        self.tally.clear(self._now)

    def _give_up_votes(self, reason: str) -> None:
        """Leaving the holder's role: shut the gate first, then count nothing and free our
        vote; the witnesses get theirs back. Later actions of this step may vote for the
        peer, so the CloseGate goes ahead of them."""
        assert self.ballot is not None and self.tally is not None
        self._pending.append(CloseGate(reason))
        self._pending.append(AskVotes(release=True))
        self.tally.clear(self._now)
        self.ballot.release(self.cfg.node)

    def gate_limit(self, now: float) -> float | None:
        """Until when the kernel gate may stay open: None without an arbiter (the fence
        has its own timeout); with one, only while we hold a majority of votes."""
        if self.tally is None:
            return None
        if self.state is not State.ACTIVE or self.handover is not None:
            return float("-inf")
        until = self.tally.majority_until(now)
        return float("-inf") if until is None else until

    def votes_text(self, now: float) -> str:
        """The votes we hold, for logs and refusals: 'vm-a, vm-b of 3 (majority 2)'."""
        if self.tally is None:
            return "no arbiter"
        held = self.tally.held(now)
        need = self.tally.voters // 2 + 1
        parts = [f"{', '.join(held) or 'none'} of {self.tally.voters} (need {need})"]
        for voter, view in sorted(self.witnesses.items()):
            if voter not in held:
                age = round((now - view.at) * 1000)
                parts.append(f"witness {voter}: {view.verdict.name.lower()} {age} ms ago")
        missing = [w for w in self.cfg.witnesses if w not in self.witnesses]
        parts += [f"witness {w}: no answer" for w in missing]
        return "; ".join(parts)

    def _on_command(self, cmd: Command, now: float) -> list[Action]:
        kind = cmd.kind
        if kind is CommandKind.MAINTENANCE_ON:
            self.maintenance = True
            return [CommandResult(kind, True, "maintenance on")]
        if kind is CommandKind.MAINTENANCE_OFF:
            self.maintenance = False
            if self.handover is not None and self.handover.target is State.MAINTENANCE:
                self.handover = None  # still ACTIVE: simply keep the VIPs
                self._send_now(now)
            return [CommandResult(kind, True, "maintenance off")]
        if self.stopping:
            return [CommandResult(kind, False, "node is shutting down")]
        if kind is CommandKind.SWITCHOVER:
            if self.state is not State.ACTIVE:
                return [CommandResult(kind, False, f"this node is {self.state.name}, not ACTIVE")]
            if self.handover is not None:
                return [CommandResult(kind, False, "a handover is already in progress")]
            peer_name = self.peer.heartbeat.node if self.peer is not None else None
            if cmd.target and cmd.target != peer_name:
                return [CommandResult(kind, False, (
                    f"{cmd.target!r} is not this pair's peer (the peer is "
                    f"{peer_name or 'not heard'}); a pair switches over to its peer"))]
            if not cmd.force and not (self.peer_eligible(now) and self.peer_hears_us(now)):
                return [CommandResult(kind, False, self._peer_problem(now))]
            self._start_handover(State.STANDBY, now, switchover=True)
            return [CommandResult(kind, True, "handover to peer started")]
        # PROMOTE
        if self.state is State.ACTIVE:
            self.preferred = True
            return [CommandResult(kind, True, "already ACTIVE")]
        if self.maintenance:
            return [CommandResult(kind, False, "this node is in maintenance")]
        if self.timers.vip_fault_until is not None and now < self.timers.vip_fault_until:
            return [CommandResult(kind, False, f"this node cannot hold VIPs now: "
                                               f"{self._fault_detail}")]
        if self._duplicated(now):
            return [CommandResult(kind, False, f"this node cannot hold VIPs now: "
                                               f"{self._duplicate_detail}")]
        if self._health is not True:
            if not cmd.force:
                return [CommandResult(kind, False, f"this node is not eligible: "
                                                   f"{self._why_not(now)}; use force")]
            self.health_override = True
            extra: list[Action] = [Warn(f"health override by forced promote: acting as "
                                        f"healthy until the checks recover ({self._why_not(now)})")]
        else:
            extra = []  # same annotated list type as above
        peer_active = self.peer_alive(now) and self.peer is not None and (
            self.peer.heartbeat.state is State.ACTIVE)
        if peer_active and self.peer_hears_us(now):
            self.timers.promote_until = now + 2 * self.cfg.dead_interval
            self._send_now(now)
            return [*extra, CommandResult(kind, True, "asked the active peer to hand over")]
        if peer_active and not cmd.force:
            self.health_override = False
            return [CommandResult(kind, False, "the active peer does not hear us; use force")]
        self._promote_now = True
        return [*extra, CommandResult(kind, True, "taking over")]

    # --- the rule ------------------------------------------------------------------------

    def _evaluate(self, now: float) -> list[Action]:
        t = self.timers
        if t.promote_until is not None and now >= t.promote_until:
            t.promote_until = None
            if self.state is not State.ACTIVE:
                self.health_override = False  # the forced promote did not happen
        if self.tally is not None and self.state is State.ACTIVE and self.handover is None:
            self._self_vote(now)
        actions: list[Action] = []
        for _ in range(3):  # at most e.g. FAULT -> STANDBY -> ACTIVE in one step
            target, reason, extra = self._decide(now)
            actions += extra
            if self.state is State.STANDBY and self.tally is not None:
                if target is not State.ACTIVE:
                    self._end_campaign()
                elif reason is not None and not self._elected(reason, now):
                    break  # a candidate: STANDBY until a majority votes for us
            if target is self.state:
                break
            if self.state is not State.STANDBY and target is State.ACTIVE:
                target, reason = State.STANDBY, (Why.RECOVERED, "eligible again")
            assert reason is not None, f"{self.state.name} -> {target.name} without a reason"
            actions += self._transition(target, reason, now)
        return actions

    def _decide(self, now: float) -> tuple[State, Reason | None, list[Action]]:
        """The state this node should be in now, and why (None: it stays)."""
        if self.state in (State.INIT, State.STOPPED):
            return self.state, None, []
        if self.state is State.ACTIVE:
            return self._decide_active(now)
        if self.stopping:
            return State.STOPPED, (Why.SHUTDOWN, "shutdown"), []
        if self.maintenance:
            return State.MAINTENANCE, (Why.MAINTENANCE, "maintenance on"), []
        if self._duplicated(now):
            return State.FAULT, (Why.DUPLICATE_NODE, self._duplicate_detail), []
        if self.timers.vip_fault_until is not None:
            if now < self.timers.vip_fault_until:
                return State.FAULT, (Why.VIP_ERROR, self._fault_detail), []
            self.timers.vip_fault_until = None
        if self._health is False:
            return State.FAULT, (Why.HEALTH, f"health check failing: {self.health_detail}"), []
        if self.state is not State.STANDBY:
            why = "maintenance off" if self.state is State.MAINTENANCE else "healthy again"
            return State.STANDBY, (Why.RECOVERED, why), []
        if self._health is None:
            return State.STANDBY, None, []
        reason = self._standby_rule(now)
        return (State.ACTIVE if reason else State.STANDBY), reason, []

    def _standby_rule(self, now: float) -> Reason | None:
        """Why a healthy standby should take over now (None: it should not)."""
        t, dead_ms = self.timers, round(self.cfg.dead_interval * 1000)
        winner_idle = preempting = False
        try:
            if self._promote_now:
                return Why.PROMOTE, "operator promote"
            if not self._heard_peer and now < t.holddown_until:
                return None
            if t.listen_until is not None:
                if now < t.listen_until:
                    return None  # stalled: listen to the peer before judging it
                t.listen_until = None
            if self.peer is None:
                return Why.NO_PEER, f"no peer heard within {dead_ms} ms of start"
            hb = self.peer.heartbeat
            if not self.peer_alive(now):
                silent = round((now - self.peer.received_at) * 1000)
                return Why.PEER_DEAD, f"peer {hb.node} silent for {silent} ms"
            if hb.state is State.ACTIVE:
                if Flag.RESIGNING in hb.flags:
                    return Why.PEER_HANDOVER, f"peer {hb.node} hands over"
                if Flag.HEALTHY not in hb.flags:
                    return Why.PEER_UNHEALTHY, f"peer {hb.node} active but unhealthy"
                preempting = (self.cfg.preempt and Flag.PREFERRED not in hb.flags
                              and self.cfg.priority > hb.effective_priority
                              and self.peer_hears_us(now) and self.damped_until(now) is None)
                if preempting:
                    t.preempt_since = now if t.preempt_since is None else t.preempt_since
                    if now >= t.preempt_since + self.cfg.preempt_delay and not self.want_active:
                        self.want_active = True
                        self._send_now(now)
                return None
            # A standby peer still learning its health is in the election, not failed.
            pending = hb.state is State.STANDBY and Flag.HEALTH_PENDING in hb.flags
            if not self.peer_eligible(now) and not pending:
                why = "unhealthy" if hb.state is State.STANDBY else hb.state.name
                return Why.PEER_INELIGIBLE, f"peer {hb.node} is {why}"
            if self._wins_fresh(hb):
                return Why.ELECTION, "election: we have priority over the standby peer"
            winner_idle = True
            t.winner_idle_since = now if t.winner_idle_since is None else t.winner_idle_since
            # A starting peer gets longer to learn its health than a healthy one to act.
            t.winner_idle_limit = max(self.cfg.dead_interval, PENDING_WAIT if pending else 0.0)
            if now >= t.winner_idle_since + t.winner_idle_limit:
                return Why.PEER_IDLE, f"peer {hb.node} won the election but did not take over"
            return None
        finally:
            if not winner_idle:
                t.winner_idle_since = None
            if not preempting:
                t.preempt_since = None
                self.want_active = False

    def _decide_active(self, now: float) -> tuple[State, Reason | None, list[Action]]:
        t = self.timers
        extra: list[Action] = []
        if self._health is False:
            return State.FAULT, (Why.HEALTH, f"health check failing: {self.health_detail}"), extra
        if t.vip_fault_until is not None and now < t.vip_fault_until:
            return State.FAULT, (Why.VIP_ERROR, self._fault_detail), extra
        if self._duplicated(now):
            return State.FAULT, (Why.DUPLICATE_NODE, self._duplicate_detail), extra
        if self._vips_lost:
            why = f"VIPs lost: {self._vips_lost}; re-validating with the peer"
            return State.STANDBY, (Why.VIP_LOST, why), extra
        if (self.tally is not None and self.handover is None
                and self.tally.majority_until(now) is None):
            why = f"self-fence: the majority of votes ran out (held: {self.votes_text(now)})"
            return State.STANDBY, (Why.NO_QUORUM, why), extra
        peer_alive = self.peer_alive(now)
        hb = self.peer.heartbeat if self.peer is not None else None
        if self.handover is not None:
            h = self.handover
            if peer_alive and hb is not None and hb.state is State.ACTIVE and hb.term > self.term:
                done = f"handed over to {hb.node} (term {hb.term})"
                return h.target, (Why.HANDED_OVER, done), extra
            if now >= h.deadline:
                self.handover = None
                if h.target is State.STANDBY and self.tally is not None:
                    return State.STANDBY, (Why.HANDOVER_TIMEOUT, (
                        "handover aborted: the peer did not take over within "
                        f"{round(self.cfg.dead_interval * 1000)} ms; the gate is shut and "
                        "our votes given away, so the election decides again")), extra
                if h.target is State.STANDBY:
                    extra.append(Warn("handover aborted: the peer did not take over within "
                                      f"{round(self.cfg.dead_interval * 1000)} ms"))
                    self._send_now(now)
                    return State.ACTIVE, None, extra
                late = "handover timed out, releasing anyway"
                return h.target, (Why.HANDOVER_TIMEOUT, late), extra
            return State.ACTIVE, None, extra
        leaving = State.STOPPED if self.stopping else (
            State.MAINTENANCE if self.maintenance else None)
        if leaving is not None:
            if self.peer_eligible(now):
                self._start_handover(leaving, now, switchover=False)
                return State.ACTIVE, None, extra
            why = Why.SHUTDOWN if leaving is State.STOPPED else Why.MAINTENANCE
            alone = f"{leaving.name.lower()} and no eligible peer to hand over to"
            return leaving, (why, alone), extra
        if not (peer_alive and hb is not None):
            t.concede_at = None
            self._reannounce(extra, now)
            return State.ACTIVE, None, extra
        if hb.state is State.ACTIVE and Flag.RESIGNING not in hb.flags:
            if not self.peer_hears_us(now):
                if t.concede_at is None:
                    t.concede_at = now + self.cfg.dead_interval
                if now >= t.concede_at:
                    return State.STANDBY, (Why.ONE_WAY_LINK, (
                        f"peer {hb.node} is active and has not heard us for "
                        f"{round(self.cfg.dead_interval * 1000)} ms")), extra
                return State.ACTIVE, None, extra
            t.concede_at = None
            if not self._wins_dual(hb):
                why = f"split brain: {hb.node} keeps the VIPs (term {hb.term})"
                return State.STANDBY, (Why.SPLIT_BRAIN, why), extra
            if not self._dual_announced:
                self._dual_announced = True
                extra.append(Announce(f"split brain with {hb.node} healed, we keep the VIPs"))
                self._send_now(now)
            return State.ACTIVE, None, extra
        t.concede_at, self._dual_announced = None, False
        if self.peer_eligible(now) and self.peer_hears_us(now):
            if Flag.PROMOTE in hb.flags:
                self._start_handover(State.STANDBY, now, switchover=True)
            elif Flag.WANT_ACTIVE in hb.flags and not self.preferred:
                self._start_handover(State.STANDBY, now, switchover=False)
        self._reannounce(extra, now)
        return State.ACTIVE, None, extra

    def _reannounce(self, extra: list[Action], now: float) -> None:
        """We alone claim the VIPs: announce again if the peer may have announced them
        since we last did."""
        if self._peer_announced and self.handover is None:
            self._peer_announced = False
            name = self.peer.heartbeat.node if self.peer is not None else "the peer"
            extra.append(Announce(f"{name} may have announced the VIPs since we last did "
                                  f"(it was ACTIVE or its term rose): we keep them"))
            self._send_now(now)

    def _wins_fresh(self, hb: Heartbeat) -> bool:
        """Both healthy standbys: higher effective priority, then the smaller name."""
        return (self.cfg.priority, _name_key(self.cfg.node)) > (
            hb.effective_priority, _name_key(hb.node))

    def _wins_dual(self, hb: Heartbeat) -> bool:
        """Both active and in contact: healthy beats unhealthy; a settled active beats a
        fresh takeover (a false suspicion never moves the VIPs); then the newer term wins
        (after a real partition clients followed it); then priority, then the smaller name.
        Our own SETTLED is the value we last sent, so both sides judge the same facts."""
        healthy = self._health is True
        return (healthy, self._settled_sent, self.term, self.cfg.priority,
                _name_key(self.cfg.node)) > (
            Flag.HEALTHY in hb.flags, Flag.SETTLED in hb.flags, hb.term,
            hb.effective_priority, _name_key(hb.node))

    # --- helpers -------------------------------------------------------------------------

    def _transition(self, new: State, reason: Reason, now: float) -> list[Action]:
        old = self.state
        effects = TRANSITIONS[(old, new)]
        if new is State.ACTIVE:
            peer_resign = self.peer is not None and self.peer_alive(now) and (
                Flag.RESIGNING | Flag.SWITCHOVER) in self.peer.heartbeat.flags
            self.preferred = peer_resign or self._promote_now
            self.term = max(self.term, self.peer_term_seen) + 1
            self.timers.active_since = now
            self.timers.promote_until = None
            self._promote_now = self.want_active = False
            self._dual_announced = self._peer_announced = False  # the takeover announces
        if old is State.STANDBY:
            self.want_active = False
            self.timers.preempt_since = self.timers.winner_idle_since = None
        if old is State.ACTIVE and self.tally is not None and self.handover is None:
            self._give_up_votes(f"{old.name} -> {new.name}: {reason[1]}")
        if new is State.ACTIVE:
            self.campaign = None
            self.timers.ask_at = None
        if old is State.ACTIVE:
            self._vips_lost = ""
            self.preferred = self.health_override = False
            self.timers.active_since = None
            self._settled_sent = False
            self.handover = None
            self.timers.concede_at = None
        self.state = new
        actions: list[Action] = [Transition(old, new, *reason, self.term)]
        for effect in effects:
            match effect:
                case Effect.ACQUIRE:
                    actions.append(AcquireVips(self.term))
                case Effect.RELEASE:
                    actions.append(ReleaseVips())
                case Effect.HEARTBEAT:
                    self._send_now(now)
                case Hook():
                    actions.append(RunHook(effect, new, self.term))
        return actions

    def _flap(self, flap: Flap) -> None:
        """Count a failure of our own for flap damping; the runtime logs and persists it."""
        notice: DampingChanged | None = self.damper.fail(flap, self.cfg.damping)
        if notice is not None:
            self._pending.append(notice)

    def _check_stall(self, now: float) -> list[Action]:
        """Called when `now` is far past the last event: were we stalled past our own
        deadline? Then what we know of the peer is old, through no fault of the peer."""
        due = self.next_deadline()
        late = now - due if due is not None else 0.0
        if late <= self.cfg.interval * STALL_INTERVALS:
            return []
        if not self.peer_alive(self._now):
            return []  # the peer was silent before the stall already: nothing to protect
        if self.state is State.ACTIVE and late >= self.cfg.dead_interval:
            # Long enough for the peer to take over: a failure of ours, like a crash.
            self._flap(Flap(now, Cause.STALL, f"the daemon stalled for "
                                              f"{round(late * 1000)} ms while active"))
        self._listen(now)
        return [Warn(f"this node stalled for {round(late * 1000)} ms (paused or starved): "
                     f"listening to the peer before judging it")]

    def _listen(self, now: float) -> None:
        self.timers.listen_until = now + self.cfg.dead_interval
        self.timers.listen_from = now
        self._send_now(now)  # the heartbeat whose echo ends the listening

    def _duplicated(self, now: float) -> bool:
        t = self.timers
        if t.duplicate_until is not None and now >= t.duplicate_until:
            t.duplicate_until = None
        return t.duplicate_until is not None

    def _start_handover(self, target: State, now: float, *, switchover: bool) -> None:
        self.handover = Handover(target, now + self.cfg.dead_interval, switchover)
        if self.tally is not None and self.ballot is not None and self.peer is not None:
            # Break-before-make: shut our gate, then give the peer our vote in the
            # RESIGNING heartbeat, so it takes over without waiting for a lease.
            self._give_up_votes(f"handing over to {self.peer.heartbeat.node}")
            self.ballot.grant(self.peer.heartbeat.node, now)
        self._send_now(now)

    def _send_now(self, now: float) -> None:
        self._next_send = now
        self._burst_left = BURST + 1

    def _maybe_send(self, now: float, *, answering: bool = False) -> list[Action]:
        """Send when due. A heartbeat that is due soon also goes out at once as the
        answer to a peer's: the pair settles into one node sending on its timer and the
        other answering, so the answering node wakes once per interval instead of twice
        (the idle CPU is mostly wakeups). The answerer's own timer then waits
        ANSWER_GRACE intervals and only fires if the peer's heartbeat is late, so its
        heartbeats are never further apart than that."""
        if self._next_send is None:
            return []
        answer = False
        if now < self._next_send:
            answer = (answering and self._burst_left == 0 and self.state is not State.STOPPED
                      and self._next_send - now <= self.cfg.interval * ANSWER_WINDOW)
            if not answer:
                return []
        if self._burst_left > 0:
            self._burst_left -= 1
        if self._burst_left > 0:
            self._next_send = now + self.cfg.interval / 8
        elif self.state is State.STOPPED:
            self._next_send = None
        elif answer:
            self._next_send = now + self.cfg.interval * ANSWER_GRACE
        else:
            # Keep the cadence, but a late call (stalled loop) never schedules into the past.
            self._next_send += self.cfg.interval
            if not now < self._next_send <= now + self.cfg.interval:
                self._next_send = now + self.cfg.interval
        self._last_sent = now
        start = self.timers.active_since
        self._settled_sent = (self.state is State.ACTIVE and start is not None
                              and now >= start + 2 * self.cfg.dead_interval)
        sent: list[Action] = [SendHeartbeat(self.advert())]
        if self.tally is not None and (self.campaign is not None or (
                self.state is State.ACTIVE and self.handover is None)):
            sent.append(AskVotes())  # the holder renews the witnesses' votes as well
        return sent

    def _is_answer(self, rx: Received) -> bool:
        """The peer sent this right after receiving our latest heartbeat: answering it
        would make the pair ping-pong at the round-trip time instead of the interval."""
        return (rx.echo_sent_at is not None and self._last_sent is not None
                and rx.echo_sent_at >= self._last_sent
                and rx.heartbeat.echo_hold_us < self.cfg.interval * ANSWER_HOLD * 1e6)

    def _peer_problem(self, now: float) -> str:
        if self.peer is None:
            return "no peer heard since start"
        hb = self.peer.heartbeat
        if not self.peer_alive(now):
            return f"peer {hb.node} not heard for {round((now - self.peer.received_at) * 1000)} ms"
        if not self.peer_eligible(now):
            return f"peer {hb.node} is {hb.state.name}" + (
                "" if Flag.HEALTHY in hb.flags else " and unhealthy")
        return f"peer {hb.node} does not hear us (one-way link)"

    def _why_not(self, now: float) -> str:
        if self.maintenance:
            return "in maintenance"
        if self.health is None:
            return "health not yet known"
        return f"health check failing: {self.health_detail}"


def _name_key(name: str) -> tuple[int, ...]:
    """Smaller names win ties; negate so that 'larger key' means 'smaller name'."""
    return (*(-b for b in name.encode()), 0)
