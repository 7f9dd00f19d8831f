"""A group of vipd nodes arbitrated by a simulated etcd, driven by the real core.

Each `GroupNode` runs `vipd.core.group.GroupElection` (what the daemon runs with
`arbiter: {etcd: ...}`) on its own monotonic clock (`rate`), with its kernel gate
modelled as in simnet: opened up to the election's `gate_limit`, shut by CloseGate or a
release, and shutting by itself when a frozen or dead process stops renewing it.

`SimEtcd` is a linearizable lease store with etcd's timing as measured on this machine
(simulations/README.md): a lease expires no earlier than its TTL after the last
keep-alive the leader processed, and the leader's expiry loop runs every EXPIRY_TICK, so
keys go up to that much later; a leader change extends every lease by a full TTL. Calls
travel over per-node links (loss shows as a TCP retransmission delay, a cut link as a
call that times out) and each node's watch delivers the newest snapshot when its link
lets it. `GroupChecker` asserts after every event that no two gates are open at the same
instant, and measures takeovers.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simulations.simnet import Clock
from vipd.core import group as g
from vipd.core.events import (
    AcquireVips,
    CloseGate,
    CommandResult,
    HealthChanged,
    ReleaseVips,
    Start,
    Tick,
    Transition,
    Why,
)
from vipd.core.protocol import State

EXPIRY_TICK = 0.5  # etcd's lessor checks expiries every 500 ms (measured: keys go 1.0-1.5 s
# after the last keep-alive at TTL 1 s)
CALL_TIMEOUT = 0.3  # the runtime gives up on a call after this and reports StoreFailed
RETRANSMIT = (0.2, 0.4)  # a lost segment costs a TCP retransmission timeout
WATCH_PUMP = 0.005  # how often a watch stream may deliver


@dataclass
class Link:
    """One node's path to etcd (both directions)."""

    delay: float = 0.0005
    jitter: float = 0.0005
    loss: float = 0.0
    to_etcd_blocked: bool = False
    from_etcd_blocked: bool = False


@dataclass
class _Lease:
    ttl: float
    expires_at: float


@dataclass
class SimEtcd:
    """The store: leases, the holder key, the successor hint, member records."""

    sim: GroupSim
    up: bool = True
    revision: int = 1
    next_lease: int = 0x100
    leases: dict[int, _Lease] = field(default_factory=dict)
    holder: g.Holder | None = None
    successor: str | None = None
    members: dict[str, tuple[g.Member, int]] = field(default_factory=dict)  # record, lease

    def start_expiry_loop(self) -> None:
        self.sim.clock.at(self.sim.clock.now + EXPIRY_TICK, self._expire)

    def _expire(self) -> None:
        now = self.sim.clock.now
        if self.up:
            for lease_id in [i for i, lease in self.leases.items() if lease.expires_at <= now]:
                self._revoke(lease_id)
        self.sim.clock.at(now + EXPIRY_TICK, self._expire)

    def leader_change(self) -> None:
        """A new leader renews every lease by its full TTL (etcd's lessor Promote)."""
        now = self.sim.clock.now
        for lease in self.leases.values():
            lease.expires_at = max(lease.expires_at, now + lease.ttl)

    def _revoke(self, lease_id: int) -> None:
        self.leases.pop(lease_id, None)
        if self.holder is not None and self.holder.lease == lease_id:
            self.holder = None
            self._changed()
        for name in [n for n, (_, lease) in self.members.items() if lease == lease_id]:
            del self.members[name]
            self._changed()

    def _changed(self) -> None:
        self.revision += 1
        for node in self.sim.nodes.values():
            node.watch_dirty = True

    def snapshot(self) -> g.Observed:
        return g.Observed(self.holder, {n: m for n, (m, _) in self.members.items()},
                          self.successor, self.revision)

    def call(self, action: Any) -> Any:
        """Carry out one request; returns the event the caller gets back (or None)."""
        now = self.sim.clock.now
        match action:
            case g.GrantLease(ttl=ttl):
                lease_id, self.next_lease = self.next_lease, self.next_lease + 1
                self.leases[lease_id] = _Lease(ttl, now + ttl)
                return ("granted", lease_id, ttl)
            case g.KeepAlive(lease=lease_id):
                lease = self.leases.get(lease_id)
                if lease is None:
                    return ("kept", 0.0)
                lease.expires_at = max(lease.expires_at, now + lease.ttl)
                return ("kept", lease.ttl)
            case g.Claim(lease=lease_id):
                if lease_id not in self.leases:
                    return g.StoreFailed(f"lease {lease_id:x} not found")
                if self.holder is not None:
                    return g.Claimed(False, self.holder)
                self.revision += 1
                self.holder = g.Holder(self._owner(lease_id), self.revision, lease_id)
                self.successor = None
                self._changed()
                return g.Claimed(True, self.holder)
            case g.Resign(revision=revision, successor=successor):
                if self.holder is not None and self.holder.revision == revision:
                    self.holder = None
                    self.successor = successor
                    self._changed()
                return None
            case g.Publish(member=member):
                owner_lease = self._lease_of(member.node)
                if owner_lease is not None:
                    self.members[member.node] = (member, owner_lease)
                    self._changed()
                return None
            case g.Revoke(lease=lease_id):
                self._revoke(lease_id)
                return None
        raise AssertionError(f"unknown etcd call {action!r}")

    def _owner(self, lease_id: int) -> str:
        return next(n.name for n in self.sim.nodes.values() if n.lease_seen == lease_id)

    def _lease_of(self, name: str) -> int | None:
        lease = self.sim.nodes[name].lease_seen
        return lease if lease in self.leases else None


@dataclass
class GroupNode:
    name: str
    cfg: g.GroupConfig
    sim: GroupSim
    rate: float = 0.0  # this host's monotonic clock runs (1 + rate) times real time
    up: bool = False
    frozen: bool = False
    health: bool = True
    election: g.GroupElection | None = None
    link: Link = field(default_factory=Link)
    gate_until: float = float("-inf")  # real time at which the kernel gate shuts
    held: bool = False
    timer_gen: int = 0
    boot: int = 0
    lease_seen: int | None = None  # the lease the store granted this node last
    watch_dirty: bool = True
    watch_at: float = 0.0  # when the watch stream delivers its latest event
    record: g.Member | None = None  # the newest member record to publish
    publishing: bool = False  # a put of it is in flight
    backlog: list[Callable[[], None]] = field(default_factory=list)
    results: list[CommandResult] = field(default_factory=list)

    @property
    def state(self) -> State | None:
        return self.election.state if self.up and self.election is not None else None

    def local(self, now: float) -> float:
        return now * (1.0 + self.rate)

    def real(self, local: float) -> float:
        return local / (1.0 + self.rate)

    def gate_open(self, now: float) -> bool:
        return now < self.gate_until

    def start(self) -> None:
        self.up, self.frozen, self.boot = True, False, self.boot + 1
        self.held = False  # the daemon removes stale VIPs at start and installs a shut gate
        self.gate_until = float("-inf")
        self.election = g.GroupElection(self.cfg)
        self.watch_dirty, self.record, self.publishing = True, None, False
        self.handle(Start())
        self.handle(HealthChanged(self.health, "" if self.health else "sim: down"))

    def crash(self) -> None:
        self.up = False
        self.timer_gen += 1

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False
        backlog, self.backlog = self.backlog, []
        for deliver in backlog:
            deliver()
        self.handle(Tick())

    def handle(self, event: Any) -> None:
        if not self.up or self.election is None:
            return
        if self.frozen:
            self.backlog.append(functools.partial(self.handle, event))
            return
        now = self.sim.clock.now
        for action in self.election.handle(event, self.local(now)):
            self.apply(action, now)
        self.renew_gate()
        self.rearm()
        if self.election.finished:
            self.up = False

    def rearm(self) -> None:
        assert self.election is not None
        self.timer_gen += 1
        deadline = self.election.next_deadline()
        if deadline is not None:
            gen = self.timer_gen
            # a nanosecond late: back on the local clock, real(deadline) may round to just
            # before the deadline, which would fire the same timer forever
            self.sim.clock.at(self.real(deadline) + 1e-9, lambda: self._fire(gen))

    def _fire(self, gen: int) -> None:
        if gen == self.timer_gen and self.up:
            self.handle(Tick())

    def apply(self, action: Any, now: float) -> None:
        match action:
            case g.Publish(member=member):
                self.publish(member)
            case g.GrantLease() | g.KeepAlive() | g.Claim() | g.Resign() | g.Revoke():
                self.sim.request(self, action, self.local(now))
            case CloseGate():
                self.gate_until = min(self.gate_until, now)
            case ReleaseVips():
                self.held = False
                self.gate_until = min(self.gate_until, now)
            case AcquireVips():
                self.held = True
            case Transition():
                self.sim.checker.on_transition(self, action, now)
            case CommandResult():
                self.results.append(action)

    def publish(self, member: g.Member | None = None) -> None:
        """As the runtime does: one put of our record in flight; the newest record goes
        next, and again after a failure (puts that overtook each other would leave an
        older record in etcd)."""
        if member is not None:
            self.record = member
        if self.publishing or self.record is None or not self.up:
            return
        self.publishing, record, boot = True, self.record, self.boot

        def done(ok: bool) -> None:
            if self.boot != boot:
                return
            self.publishing = False
            if not ok or self.record != record:
                self.publish()

        self.sim.request(self, g.Publish(record), self.local(self.sim.clock.now), done)

    def renew_gate(self) -> None:
        """The VIP worker keeps the gate open while holding, never past the lease
        (renewing at every event only keeps it open longer: a stricter check)."""
        e = self.election
        if e is None or not self.up or self.frozen or not self.held:
            return
        now = self.sim.clock.now
        limit = e.gate_limit(self.local(now))
        if limit is None or limit <= self.local(now):
            return
        until = self.real(limit)
        if until > self.gate_until:
            if self.gate_until <= now:
                self.sim.checker.on_gate_open(self, now)
            self.gate_until = until


class GroupSim:
    """N nodes, one etcd, a virtual clock, a checker."""

    def __init__(self, seed: int, cfgs: list[g.GroupConfig]) -> None:
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.etcd = SimEtcd(self)
        self.nodes = {c.node: GroupNode(c.node, c, self) for c in cfgs}
        self.checker = GroupChecker(self)
        self.etcd.start_expiry_loop()
        self.clock.at(WATCH_PUMP, self._pump_watches)

    def request(self, node: GroupNode, action: Any, sent_at: float,
                done: Callable[[bool], None] | None = None) -> None:
        """One call: to etcd over the node's link, the answer back, or a timeout (then
        the node hears StoreFailed). ``done`` learns which (puts answer nothing else)."""
        boot = node.boot
        answered = [False]

        def timeout() -> None:
            if not answered[0] and node.boot == boot:
                answered[0] = True
                node.handle(g.StoreFailed(f"{type(action).__name__}: deadline exceeded"))
                if done is not None:
                    done(False)

        self.clock.at(self.clock.now + CALL_TIMEOUT, timeout)
        if node.link.to_etcd_blocked or not self.etcd.up:
            return
        self.clock.at(self.clock.now + self._travel(node.link),
                      lambda: self._serve(node, boot, action, sent_at, answered, done))

    def _serve(self, node: GroupNode, boot: int, action: Any, sent_at: float,
               answered: list[bool], done: Callable[[bool], None] | None) -> None:
        if not self.etcd.up:
            return
        reply = self.etcd.call(action)
        if isinstance(action, g.GrantLease) and node.boot == boot:
            node.lease_seen = reply[1]  # whose lease it is, for the records put under it
        if node.link.from_etcd_blocked:
            return

        def deliver() -> None:
            if not answered[0] and node.boot == boot:
                answered[0] = True
                if reply is not None:
                    node.handle(_event(reply, sent_at))
                if done is not None:
                    done(True)

        self.clock.at(self.clock.now + self._travel(node.link), deliver)

    def _travel(self, link: Link) -> float:
        extra = self.rng.uniform(*RETRANSMIT) if self.rng.random() < link.loss else 0.0
        return link.delay + self.rng.uniform(0, link.jitter) + extra

    def _pump_watches(self) -> None:
        for node in self.nodes.values():
            if (node.watch_dirty and node.up and not node.link.from_etcd_blocked
                    and self.etcd.up):
                node.watch_dirty = False
                snap, boot = self.etcd.snapshot(), node.boot
                # a stream: a later event never arrives before an earlier one
                node.watch_at = max(node.watch_at, self.clock.now + self._travel(node.link))
                self.clock.at(node.watch_at,
                              functools.partial(self._watch_event, node, boot, snap))
        self.clock.at(self.clock.now + WATCH_PUMP, self._pump_watches)

    @staticmethod
    def _watch_event(node: GroupNode, boot: int, snap: g.Observed) -> None:
        if node.boot == boot:
            node.handle(snap)

    def run_until(self, end: float) -> None:
        self.clock.run_until(end, self.checker.after_step)

    def call(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        self.clock.at(when, lambda: fn(*args))


def _event(reply: Any, sent_at: float) -> Any:
    if isinstance(reply, tuple) and reply[0] == "granted":
        return g.LeaseGranted(reply[1], reply[2], sent_at)
    if isinstance(reply, tuple) and reply[0] == "kept":
        return g.KeptAlive(sent_at, reply[1])
    return reply


@dataclass
class GroupChecker:
    """Never two gates open at once; takeovers and releases for the report."""

    sim: GroupSim
    violations: list[str] = field(default_factory=list)
    takeovers: list[tuple[float, str, str]] = field(default_factory=list)
    releases: list[tuple[float, str, str]] = field(default_factory=list)
    terms: list[int] = field(default_factory=list)

    def violation(self, text: str) -> None:
        self.violations.append(f"t={self.sim.clock.now:.4f}s: {text}")

    def on_gate_open(self, node: GroupNode, now: float) -> None:
        for other in self.sim.nodes.values():
            if other is not node and other.gate_open(now):
                self.violation(f"{node.name} opened its gate while {other.name}'s is open "
                               f"until {other.gate_until:.4f}s: two nodes answer for the VIPs")

    def on_transition(self, node: GroupNode, tr: Transition, now: float) -> None:
        if tr.new is State.ACTIVE:
            # Each takeover has a term above the last, except the same node taking its
            # own key up again after a self-fence (the same key: nobody held between).
            again = (self.takeovers and self.takeovers[-1][1] == node.name
                     and tr.why is Why.RECOVERED and tr.term == self.terms[-1])
            if self.terms and tr.term <= self.terms[-1] and not again:
                self.violation(f"{node.name} took over with term {tr.term}, not above the "
                               f"last term {self.terms[-1]}")
            self.terms.append(tr.term)
            self.takeovers.append((now, node.name, tr.why.value))
        if tr.old is State.ACTIVE:
            self.releases.append((now, node.name, tr.why.value))

    def after_step(self) -> None:
        for n in self.sim.nodes.values():
            if (n.up and not n.frozen and n.election is not None
                    and n.held != (n.election.state is State.ACTIVE)):
                    self.violation(f"{n.name} is {n.election.state.name} but holds VIPs="
                                   f"{n.held}")

    def holders(self) -> list[str]:
        return [n.name for n in self.sim.nodes.values()
                if n.state is State.ACTIVE and n.held and not n.frozen]


def new_group(seed: int, priorities: list[int], *, ttl: float = 1.0, preempt: bool = False,
              preempt_delay: float = 0.0) -> GroupSim:
    cfgs = [g.GroupConfig(f"node{i + 1}", prio, preempt=preempt, preempt_delay=preempt_delay,
                          ttl=ttl) for i, prio in enumerate(priorities)]
    return GroupSim(seed, cfgs)


def with_rates(sim: GroupSim, rates: list[float]) -> None:
    for node, rate in zip(sim.nodes.values(), rates, strict=True):
        node.rate = rate

