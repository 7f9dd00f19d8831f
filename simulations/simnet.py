"""A deterministic pair of vipd nodes on a simulated network, driven by the real core.

Each `SimNode` runs the real `Election` and `Session` (the same code as the daemon) under a
virtual clock; the `SimNet` delivers sealed datagrams with per-direction loss, delay,
jitter, reordering, duplication and partitions; an attacker can replay captured datagrams
and inject forged ones. `Checker` evaluates the invariants after every event.

A node can also be frozen (SIGSTOP, a paused VM): the clock runs on, the node processes
nothing, datagrams queue in its socket (up to SOCKET_BACKLOG, then they are dropped, as
the kernel does), and its VIPs stay until the kernel lease removes them. On thaw the
runtime sees what the daemon sees: the queued datagrams first (the reader callback and
the timer's drain), then, in either order, the overdue election timer and the VIP
upkeep, which finds a lapsed lease and reports VipsLost. Wall clocks can be stepped per
node (`skew_ns`). Announcements are modelled as bursts of rounds, so the checker can
tell who announced last.

With an arbiter (`Sim(..., witness=True)`) a third process, the witness, votes through
the same vipd.core.witness code as `vipd witness`, reached over its own links; each
node's kernel gate is modelled (opened up to the election's `gate_limit`, shut by
CloseGate, and expiring by itself while the process is frozen or dead), and the checker
asserts that no two gates are ever open at the same instant. Each process may run its
monotonic clock at its own rate (`rate`: 0.001 is 0.1 % fast).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vipd.arbiter.witness_client import WitnessClient
from vipd.core import election as el
from vipd.core.damping import Damper, Flap
from vipd.core.protocol import (
    Flag,
    KeyRing,
    Reject,
    Rejected,
    Session,
    State,
    Verdict,
    decode,
    settings_digest,
)
from vipd.core.votes import majority
from vipd.core.witness import ClusterSpec, Witness

WALL_EPOCH_NS = 1_800_000_000 * 10**9
CLUSTER = "web"
WITNESS = "witness"  # the witness's name and its address in the simulated network
SOCKET_BACKLOG = 256  # datagrams a default socket buffer holds (measured: 256 of 150 bytes)
LEASE = 3.0  # vip_lease; the kernel removes the address a little early:
KERNEL_EARLY = 0.3  # measured 2.6-2.9 s for 3 s
LAPSE_MARGIN = 0.5  # the daemon's renewal check (vipd.daemon.LAPSE_MARGIN)
ANNOUNCE_ROUNDS, ANNOUNCE_GAP = 3, 0.1  # the default burst: 3 rounds 100 ms apart
# With an arbiter a takeover needs a vote round trip, retried with the next heartbeat when
# the request or the answer is lost or held back by reordering. The liveness bound allows
# as many such misses in a row as happen with this probability on the scenario's links.
RETRY_ODDS = 1e-6


def missed_in_a_row(links: list[LinkSpec]) -> int:
    """Round trips that may miss in a row (RETRY_ODDS) on the worst of ``links``."""
    miss = max(link.loss + (1.0 - link.loss) * link.reorder for link in links)
    fail = 1.0 - (1.0 - miss) ** 2
    return 0 if fail <= 0.0 else math.ceil(math.log(RETRY_ODDS) / math.log(fail))


@dataclass
class LinkSpec:
    loss: float = 0.0
    delay: float = 0.0005
    jitter: float = 0.0002
    dup: float = 0.0
    reorder: float = 0.0  # probability of an extra delay of up to 2 intervals
    blocked: bool = False


@dataclass
class Attack:
    """Injected datagram whose fate the checker verifies."""

    kind: str  # "replay" | "forged"
    data: bytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self._queue, (max(when, self.now), self._n, fn))

    def run_until(self, end: float, after_step: Callable[[], None]) -> None:
        while self._queue and self._queue[0][0] <= end:
            self.now, _, fn = heapq.heappop(self._queue)
            fn()
            after_step()
        self.now = max(self.now, end)


@dataclass
class SimNode:
    name: str
    cfg: el.ElectionConfig
    sim: Sim
    skew_ns: int = 0
    up: bool = False
    held: bool = False
    health: bool = True
    persisted_term: int = 0
    persisted_maintenance: bool = False
    persisted_flaps: list[Flap] = field(default_factory=list)  # flap damping's failures
    running: bool = False  # the state file's mark: still set at a start after a crash
    election: el.Election | None = None
    session: Session | None = None
    timer_gen: int = 0
    boots: int = 0
    eligible_since: float | None = None
    frozen: bool = False
    backlog: list[tuple[bytes, str | None]] = field(default_factory=list)
    timer_due: bool = False  # the election timer came due while frozen
    last_renew: float = 0.0
    lease_gen: int = 0
    burst_gen: int = 0
    last_round: float | None = None  # when this node last announced (a burst round)
    rejects: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    results: list[el.CommandResult] = field(default_factory=list)
    rate: float = 0.0  # this host's monotonic clock runs (1 + rate) times real time
    witness_client: WitnessClient | None = None
    gate_until: float = float("-inf")  # real time at which the kernel gate shuts

    @property
    def state(self) -> State | None:
        return self.election.state if self.up and self.election else None

    def local(self, now: float) -> float:
        """This host's monotonic clock at real time ``now``."""
        return now * (1.0 + self.rate)

    def real(self, local: float) -> float:
        return local / (1.0 + self.rate)

    def real_at_or_after(self, local: float) -> float:
        """The first real time at which this clock reads ``local`` or more: a timer set a
        rounding step early would find its deadline not yet due and be set again for the
        same instant, forever."""
        when = self.real(local)
        while self.local(when) < local:
            when = math.nextafter(when, math.inf)
        return when

    def gate_open(self, now: float) -> bool:
        return now < self.gate_until

    def wall_ns(self, now: float) -> int:
        return WALL_EPOCH_NS + int(now * 1e9) + self.skew_ns

    def start(self) -> None:
        self.up, self.boots = True, self.boots + 1
        self.held = False  # the daemon removes stale VIPs of a previous run at start
        self.gate_until = float("-inf")  # ... and installs its gate shut
        self.sim.checker.on_start(self)
        self.election = el.Election(self.cfg, term=self.persisted_term,
                                    maintenance=self.persisted_maintenance,
                                    damper=Damper(list(self.persisted_flaps)))
        crashed, self.running = self.running, True
        boot = self.sim.rng.getrandbits(64)
        self.session = Session(cluster=CLUSTER, node=self.name, keys=self.sim.keys,
                               boot_id=boot, digest=self.cfg.digest)
        if self.cfg.arbiter:
            self.witness_client = WitnessClient(
                cluster=CLUSTER, node=self.name, keys=self.sim.keys, boot_id=boot,
                digest=self.cfg.digest, witnesses=[(WITNESS, (WITNESS, 0))],
                lease=self.cfg.vote_lease, max_skew=1.0)
        self.handle(el.Start(crashed=crashed))
        self.handle(el.HealthChanged(self.health, "" if self.health else "sim: down"))

    def crash(self) -> None:
        """Process dies: no more sends or receipts. Its VIPs stay until the lease."""
        self.up = False
        self.timer_gen += 1
        self.burst_gen += 1

    def freeze(self) -> None:
        """SIGSTOP: nothing runs, the kernel keeps the VIPs until the lease runs out."""
        self.frozen = True
        now = self.sim.clock.now
        if self.held:
            self.last_renew = now  # the upkeep renewed it just before the stop, at best
            self.lease_gen += 1
            gen = self.lease_gen
            self.sim.clock.at(now + LEASE - KERNEL_EARLY, lambda: self._kernel_expiry(gen))

    def _kernel_expiry(self, gen: int) -> None:
        if gen == self.lease_gen and self.frozen:
            self.held = False

    def thaw(self, upkeep_first: bool) -> None:
        """SIGCONT: the queued datagrams, then the overdue timer and the VIP upkeep."""
        self.frozen = False
        self.lease_gen += 1
        backlog, self.backlog = self.backlog, []
        self.deliver_batch(backlog)
        if upkeep_first:
            self.upkeep()
        if self.timer_due:
            self.timer_due = False
            self.handle(el.Tick())
        if not upkeep_first:
            self.upkeep()

    def upkeep(self) -> None:
        """The VIP worker's wake-up after a stall: a lease that may have lapsed (or a VIP
        the kernel removed) is reported, never renewed."""
        if not self.up or self.election is None or self.election.state is not State.ACTIVE:
            return
        now = self.sim.clock.now
        if now - self.last_renew >= LEASE - LAPSE_MARGIN or not self.held:
            self.held = False
            self.burst_gen += 1
            self.handle(el.VipsLost(f"lease lapsed: last renewal "
                                    f"{round(1000 * (now - self.last_renew))} ms ago"))
        else:
            self.last_renew = now

    def announce(self) -> None:
        """A burst of rounds; a newer burst or a release ends the older one."""
        self.burst_gen += 1
        gen, now = self.burst_gen, self.sim.clock.now
        for i in range(ANNOUNCE_ROUNDS):
            self.sim.clock.at(now + i * ANNOUNCE_GAP, functools.partial(self._round, gen))

    def _round(self, gen: int) -> None:
        # A round due while frozen is dropped: the daemon's burst stops when it wakes late.
        if gen == self.burst_gen and self.up and self.held and not self.frozen:
            self.last_round = self.sim.clock.now

    def handle(self, event: el.Event) -> None:
        if not self.up or self.election is None:
            return
        now = self.sim.clock.now
        for action in self.election.handle(event, self.local(now)):
            self.apply(action, now)
        self.renew_gate()
        self.rearm()
        if self.election.finished:
            assert not self.held, f"{self.name} stopped while holding VIPs"
            self.up = self.running = False  # a clean stop

    def rearm(self) -> None:
        assert self.election is not None
        self.timer_gen += 1
        deadline = self.election.next_deadline()
        if deadline is not None:
            gen = self.timer_gen
            self.sim.clock.at(self.real_at_or_after(deadline), lambda: self._fire(gen))

    def _fire(self, gen: int) -> None:
        if gen == self.timer_gen:
            if self.frozen:
                self.timer_due = True
            else:
                self.handle(el.Tick())

    def apply(self, action: el.Action, now: float) -> None:
        match action:
            case el.SendHeartbeat(advert=advert):
                assert self.session is not None
                data = self.session.seal(advert, self.local(now), self.wall_ns(now))
                self.sim.transmit(self.name, data)
            case el.AskVotes(release=release):
                assert self.witness_client is not None and self.election is not None
                for data, _ in self.witness_client.requests(
                        self.election.advert(), release, self.local(now), self.wall_ns(now)):
                    self.sim.transmit(self.name, data, WITNESS)
            case el.CloseGate():
                self.gate_until = float("-inf")
            case el.AcquireVips(term=term):
                self.held = True
                self.last_renew = now
                self.persisted_term = term
                self.sim.checker.on_acquire(self, now)
                self.announce()
            case el.ReleaseVips():
                self.held = False
                self.burst_gen += 1
                self.gate_until = min(self.gate_until, now)  # the release shuts the gate
            case el.Transition():
                self.sim.checker.on_transition(self, action, now)
            case el.CommandResult():
                self.results.append(action)
            case el.Warn(message=message):
                self.warnings.append(message)
            case el.Announce():
                self.announce()
            case el.RunHook():
                pass
            case el.DampingChanged(flap=flap):
                if flap is not None and self.election is not None:
                    self.persisted_flaps = list(self.election.damper.flaps)

    def renew_gate(self) -> None:
        """The VIP worker keeps the gate open while holding, never past the votes (the
        daemon renews it every dead/4; renewing at every event only keeps it open longer,
        which makes the two-gates invariant stricter, not looser)."""
        e = self.election
        if (e is None or not self.cfg.arbiter or not self.up or self.frozen or not self.held
                or e.state is not State.ACTIVE):
            return
        now = self.sim.clock.now
        limit = e.gate_limit(self.local(now))
        if limit is None or limit <= self.local(now):
            return
        until = self.real(min(self.local(now) + self.cfg.dead_interval, limit))
        if until > self.gate_until:
            if self.gate_until <= now:
                self.sim.checker.on_gate_open(self, now)
            self.gate_until = until

    def deliver(self, data: bytes, attack: Attack | None = None,
                source: str | None = None) -> None:
        if not self.up or self.session is None or self.election is None:
            return
        if self.frozen:
            if len(self.backlog) < SOCKET_BACKLOG:
                self.backlog.append((data, source))
            return
        event = self._open(data, attack, source)
        if event is None:
            return
        before = self.election.state
        self.handle(event)
        # A replayed vote reply that was lost on its way is a late grant, which may
        # legitimately elect a candidate: only a heartbeat attack must change nothing.
        if (attack is not None and source != WITNESS and self.election is not None
                and self.election.state != before):
            self.sim.checker.violation(f"{attack.kind} datagram changed {self.name}'s state")

    def deliver_batch(self, batch: list[tuple[bytes, str | None]]) -> None:
        """Queued datagrams as the daemon reads them: all authenticated first, then the
        election acts on each in order."""
        if not self.up or self.session is None or self.election is None:
            return
        events = [event for data, source in batch
                  if (event := self._open(data, None, source)) is not None]
        for event in events:
            self.handle(event)

    def _open(self, data: bytes, attack: Attack | None, source: str | None = None
              ) -> el.HeartbeatReceived | el.DuplicateNode | el.VoteReplied | None:
        assert self.session is not None
        now = self.sim.clock.now
        try:
            if source == WITNESS and self.witness_client is not None:
                reply = self.witness_client.open(data, WITNESS, self.local(now),
                                                 self.wall_ns(now))
                self.sim.checker.on_vote_accept(self.name, data, attack)
                return reply
            rx = self.session.open(data, self.local(now), self.wall_ns(now))
        except Rejected as exc:
            self.rejects[exc.reason.value] += 1
            if exc.reason is Reject.DUPLICATE_NODE:  # as the daemon does
                return el.DuplicateNode(f"duplicate node name {self.name!r}: {exc.detail}")
            return None
        self.sim.checker.on_accept(self, rx, data, attack, now)
        return el.HeartbeatReceived(rx)


@dataclass
class SimWitness:
    """The witness process: `vipd.core.witness.Witness`, the decisions `vipd witness`
    runs, serving the one cluster."""

    sim: Sim
    nodes: list[str]
    up: bool = False
    rate: float = 0.0
    core: Witness | None = None
    frozen: bool = False
    backlog: list[tuple[bytes, str, Attack | None]] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)
    grants: list[tuple[float, str]] = field(default_factory=list)  # (real time, node)

    def local(self, now: float) -> float:
        return now * (1.0 + self.rate)

    def start(self) -> None:
        """A (re)start forgets every grant: it grants nothing for one lease."""
        self.up, self.frozen, self.backlog = True, False, []
        self.sim.checker.on_witness_start()
        self.core = Witness(WITNESS, self.sim.rng.getrandbits(64))
        self.core.configure({CLUSTER: ClusterSpec(self.sim.keys, frozenset(self.nodes))},
                            self.local(self.sim.clock.now))

    def crash(self) -> None:
        self.up = False

    def freeze(self) -> None:
        """SIGSTOP: the clock runs on, requests queue in the socket; the grants made
        before keep running out on the witness's clock."""
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT: the queued requests in order, answered now (their echoes tell the
        nodes how old they are)."""
        self.frozen = False
        backlog, self.backlog = self.backlog, []
        for data, source, attack in backlog:
            self.deliver(data, source, attack)

    def deliver(self, data: bytes, source: str, attack: Attack | None = None) -> None:
        if not self.up or self.core is None:
            return
        if self.frozen:
            if len(self.backlog) < SOCKET_BACKLOG:
                self.backlog.append((data, source, attack))
            return
        now = self.sim.clock.now
        local, wall = self.local(now), WALL_EPOCH_NS + int(now * 1e9)
        refused = sum(self.core.rejected.values())
        replies = self.core.receive(data, source, local, wall)
        if sum(self.core.rejected.values()) == refused:
            self.sim.checker.on_vote_accept(WITNESS, data, attack)
        for reply, address in replies:
            vote = decode(reply, self.sim.keys).vote
            assert vote is not None
            self.verdicts[vote.verdict.name] += 1
            if vote.verdict is Verdict.GRANTED:
                self.grants.append((now, source))
            self.sim.transmit(WITNESS, reply, str(address))
        self.core.take_notices()


class Sim:
    """Two nodes (and, with an arbiter, a witness), directed links, a virtual clock, a
    checker."""

    def __init__(self, seed: int, cfgs: list[el.ElectionConfig], vips: list[str],
                 witness: bool = False) -> None:
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.keys = KeyRing({7: self.rng.randbytes(32)})
        self.nodes: dict[str, SimNode] = {}
        for cfg in cfgs:
            if witness and not cfg.arbiter:
                cfg = dataclasses.replace(cfg, witnesses=(WITNESS,))
            digest = settings_digest(CLUSTER, vips, cfg.interval, cfg.dead_after,
                                     cfg.vote_lease if cfg.arbiter else 0.0)
            node = SimNode(cfg.node, dataclasses.replace(cfg, digest=digest), self)
            self.nodes[cfg.node] = node
        a, b = self.nodes
        self.links = {(a, b): LinkSpec(), (b, a): LinkSpec()}
        self.witness: SimWitness | None = None
        if witness:
            self.witness = SimWitness(self, [a, b])
            for n in (a, b):
                self.links[(n, WITNESS)] = LinkSpec()
                self.links[(WITNESS, n)] = LinkSpec()
        self.captured: list[bytes] = []
        self.captured_votes: list[tuple[bytes, str, str]] = []  # (data, src, dst)
        self.checker = Checker(self)

    def peer_of(self, name: str) -> SimNode:
        return next(n for n in self.nodes.values() if n.name != name)

    def transmit(self, src: str, data: bytes, dst_name: str | None = None) -> None:
        """Send ``data`` from ``src`` to its peer node (or to ``dst_name``)."""
        if dst_name is None:
            dst_name = self.peer_of(src).name
        link = self.links[(src, dst_name)]
        if dst_name == WITNESS:
            assert self.witness is not None
            deliver = functools.partial(self.witness.deliver, data, src)
            interval = self.nodes[src].cfg.interval
        else:
            dst = self.nodes[dst_name]
            deliver = functools.partial(dst.deliver, data, None, src)
            interval = dst.cfg.interval
            if src != WITNESS:
                self.captured.append(data)
                if len(self.captured) > 4000:
                    del self.captured[:2000]
        if WITNESS in (src, dst_name):
            self.captured_votes.append((data, src, dst_name))
            if len(self.captured_votes) > 4000:
                del self.captured_votes[:2000]
        if link.blocked or self.rng.random() < link.loss:
            return
        copies = 2 if self.rng.random() < link.dup else 1
        for _ in range(copies):
            delay = link.delay + self.rng.uniform(0, link.jitter)
            if self.rng.random() < link.reorder:
                delay += self.rng.uniform(0, 2 * interval)
            self.clock.at(self.clock.now + delay, deliver)

    def inject(self, dst: str, attack: Attack, source: str | None = None) -> None:
        """Deliver an attacker's datagram to ``dst`` as if it came from ``source`` (a
        node's peer by default; the witness's address makes a node read a vote reply)."""
        if dst == WITNESS:
            assert self.witness is not None and source is not None
            self.witness.deliver(attack.data, source, attack)
        else:
            self.nodes[dst].deliver(attack.data, attack, source)

    def run_until(self, end: float) -> None:
        self.clock.run_until(end, self.checker.after_step)

    def call(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        self.clock.at(when, lambda: fn(*args))


@dataclass
class Checker:
    """Invariants, checked after every event; measurements for the report."""

    sim: Sim
    violations: list[str] = field(default_factory=list)
    last_disturbance: float = 0.0
    no_preempt_survivor: str | None = None
    takeovers: list[tuple[float, str, str]] = field(default_factory=list)
    accepts: dict[str, list[float]] = field(default_factory=dict)
    streak_start: dict[str, float] = field(default_factory=dict)
    dual_since: float | None = None
    seen: dict[str, set[bytes]] = field(default_factory=dict)
    newest: dict[str, tuple[int, int]] = field(default_factory=dict)
    boots_left: set[int] = field(default_factory=set)
    terms: dict[str, int] = field(default_factory=dict)
    no_holder_since: float | None = None
    gaps: list[tuple[float, float]] = field(default_factory=list)  # (start, length)
    releases: list[tuple[float, str, str]] = field(default_factory=list)
    # (when, node, whether the other node held the VIPs and was not handing them over)
    acquires: list[tuple[float, str, bool]] = field(default_factory=list)
    gate_opens: list[tuple[float, str]] = field(default_factory=list)
    votes_seen: dict[str, set[bytes]] = field(default_factory=dict)  # by receiver
    quorum_since: dict[str, float] = field(default_factory=dict)  # by eligible node

    def on_gate_open(self, node: SimNode, now: float) -> None:
        """A shut gate opens: the other node's gate must be shut at this instant (gates
        only open at events, so this finds every overlap)."""
        other = self.sim.peer_of(node.name)
        if other.gate_open(now):
            self.violation(f"{node.name} opened its gate while {other.name}'s is open "
                           f"until {other.gate_until:.4f}s: two nodes answer for the VIPs")
        self.gate_opens.append((now, node.name))

    def on_acquire(self, node: SimNode, now: float) -> None:
        other = self.sim.peer_of(node.name)
        claims = other.up and other.held and not (
            other.election is not None and other.election.handover is not None)
        self.acquires.append((now, node.name, claims))

    def violation(self, text: str) -> None:
        self.violations.append(f"t={self.sim.clock.now:.4f}s: {text}")

    def disturb(self) -> None:
        self.last_disturbance = self.sim.clock.now

    def on_start(self, node: SimNode) -> None:
        """A restarted receiver has forgotten what it accepted (by design, see protocol)."""
        self.seen.pop(node.name, None)
        self.newest.pop(node.name, None)
        self.votes_seen.pop(node.name, None)

    def on_witness_start(self) -> None:
        self.votes_seen.pop(WITNESS, None)

    def on_vote_accept(self, receiver: str, data: bytes, attack: Attack | None) -> None:
        """A vote request (at the witness) or reply (at a node) got past authentication:
        never twice (the links duplicate, the attacker replays), never a forgery."""
        seen = self.votes_seen.setdefault(receiver, set())
        if data in seen:
            self.violation(f"{receiver} accepted the same vote datagram twice")
        seen.add(data)
        if len(seen) > 5000:
            seen.clear()
        if attack is not None and attack.kind == "forged":
            self.violation(f"{receiver} accepted a forged vote datagram")

    def on_transition(self, node: SimNode, tr: el.Transition, now: float) -> None:
        if tr.term < self.terms.get(node.name, 0):
            self.violation(f"{node.name} term went back from {self.terms[node.name]} to {tr.term}")
        self.terms[node.name] = tr.term
        if tr.new is State.ACTIVE:
            self.takeovers.append((now, node.name, tr.reason))
        if tr.old is State.ACTIVE:
            self.releases.append((now, node.name, tr.reason))

    def on_accept(self, node: SimNode, rx: Any, data: bytes, attack: Attack | None,
                  now: float) -> None:
        hb = rx.heartbeat
        seen = self.seen.setdefault(node.name, set())
        if data in seen:
            self.violation(f"{node.name} accepted the same datagram twice")
        seen.add(data)
        if len(seen) > 5000:
            seen.clear()
        # Within a boot the sequence orders heartbeats (wall clocks may be stepped); a boot
        # once left is never heard again.
        boot, seq = hb.boot_id, hb.seq
        newest = self.newest.get(node.name)
        if newest is not None:
            same_boot = boot == newest[0]
            if (same_boot and seq <= newest[1]) or (not same_boot and boot in self.boots_left):
                self.violation(f"{node.name} accepted an older heartbeat (seq {seq})")
            if not same_boot:
                self.boots_left.add(newest[0])
        self.newest[node.name] = (boot, seq)
        if attack is not None and attack.kind == "forged":
            self.violation(f"{node.name} accepted a forged datagram")
        interval = node.cfg.interval
        last = self.accepts.get(node.name)
        if not last or now - last[-1] > interval + 0.003:
            self.streak_start[node.name] = now
        self.accepts[node.name] = [now]

    def after_step(self) -> None:
        now = self.sim.clock.now
        nodes = list(self.sim.nodes.values())
        for n in nodes:
            if n.up and n.election is not None and not n.frozen:
                state = n.election.state
                if n.held != (state is State.ACTIVE):
                    self.violation(f"{n.name} is {state.name} but holds VIPs={n.held}")
                ok = (n.health and not n.election.maintenance and not n.election.stopping)
                if ok and n.eligible_since is None:
                    n.eligible_since = now
                elif not ok:
                    n.eligible_since = None
            else:
                n.eligible_since = None
        if self.sim.witness is not None:
            self._check_gates_follow_state(nodes, now)
        claiming = [n for n in nodes if n.state is State.ACTIVE and n.election is not None
                    and n.election.handover is None and n.held]
        if len(claiming) == 2:
            self.dual_since = now if self.dual_since is None else self.dual_since
            self._check_dual(nodes, now)
        else:
            self.dual_since = None
        holders = [n for n in nodes if n.state is State.ACTIVE and n.held]
        if holders:
            if self.no_holder_since is not None:
                self.gaps.append((self.no_holder_since, now - self.no_holder_since))
                self.no_holder_since = None
            return
        self.no_holder_since = now if self.no_holder_since is None else self.no_holder_since
        cfg = nodes[0].cfg
        if self.sim.witness is None:
            bound, why = cfg.dead_interval + 2 * cfg.interval, ""
        else:
            misses = missed_in_a_row(list(self.sim.links.values()))
            bound = cfg.vote_lease + (2 + misses) * cfg.interval
            why = " with a majority in reach"
            self._track_quorum(nodes, now)
        for n in nodes:
            if n.eligible_since is not None:
                since = max(n.eligible_since, self.last_disturbance, self.no_holder_since)
                if self.sim.witness is not None:
                    if n.name not in self.quorum_since:
                        continue  # no majority to be elected by: waiting is right
                    since = max(since, self.quorum_since[n.name])
                if now - since > bound + 1e-9:
                    self.violation(f"no node ACTIVE for {1000 * (now - since):.0f} ms although "
                                   f"{n.name} is eligible{why} (bound {1000 * bound:.0f} ms)")
                    self.last_disturbance = now  # report once per episode

    def _track_quorum(self, nodes: list[SimNode], now: float) -> None:
        """Since when each eligible node could be elected: it and enough other voters are
        up, not frozen, and connected to it in both directions (a vote needs the request
        and the answer)."""
        w = self.sim.witness
        assert w is not None
        voters = {n.name: n.up and not n.frozen for n in nodes}
        voters[WITNESS] = w.up and not w.frozen
        need = majority(nodes[0].cfg.voters)
        for n in nodes:
            links = self.sim.links
            reach = 1 + sum(1 for v, alive in voters.items() if v != n.name and alive
                            and not links[(n.name, v)].blocked
                            and not links[(v, n.name)].blocked)
            if n.eligible_since is not None and reach >= need:
                self.quorum_since.setdefault(n.name, now)
            else:
                self.quorum_since.pop(n.name, None)

    def _check_gates_follow_state(self, nodes: list[SimNode], now: float) -> None:
        """A running holder (ACTIVE, VIPs added, not handing over) has its gate open: it
        steps down (NO_QUORUM) the moment its majority, and so its gate, runs out. A shut
        gate under an ACTIVE node would be an outage no state check sees."""
        for n in nodes:
            e = n.election
            if (n.up and not n.frozen and e is not None and e.state is State.ACTIVE
                    and e.handover is None and n.held and n.gate_until < now - 1e-9):
                self.violation(f"{n.name} is ACTIVE with the VIPs but its gate has been shut "
                               f"since {n.gate_until:.4f}s")
    def _check_dual(self, nodes: list[SimNode], now: float) -> None:
        assert self.dual_since is not None
        cfg = nodes[0].cfg
        slack = max(link.delay + link.jitter for link in self.sim.links.values()) + 0.001
        ages = []
        for n in nodes:
            last = self.accepts.get(n.name)
            if last and now - last[-1] <= cfg.interval + 0.003:
                ages.append(now - max(self.streak_start[n.name], self.dual_since))
        if len(ages) == 2 and min(ages) > cfg.interval + slack:
            self.violation("both nodes ACTIVE although they have heard each other for more "
                           "than one interval")
            self.dual_since = now
        elif len(ages) == 1 and ages[0] > 2 * cfg.dead_interval + slack:
            # One-way link: the node that hears must concede, the other never learns.
            self.violation("both nodes ACTIVE over a one-way link for more than two dead "
                           "intervals")
            self.dual_since = now

    def peer_flags(self, node: SimNode) -> Flag:
        e = node.election
        return e.peer.heartbeat.flags if e is not None and e.peer is not None else Flag.NONE
