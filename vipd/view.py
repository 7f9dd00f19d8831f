"""One read-only view of a node, made in one place, for everything that observes it:
the control API (`GET /v1/status`), `vipctl status` and the Prometheus gauges.

`snapshot()` reads the election, the session and the health checks once, at one loop
time, and returns a frozen `Status`. Observers never reach into the runtime: the API
serialises `Status.to_json()`, vipctl reads it back with `Status.from_json()`, and the
metrics collector builds its gauges from the same object, so "healthy" or "the peer is
reachable" mean the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vipd import __version__
from vipd.config import Config
from vipd.core.damping import Damper, DampingConfig
from vipd.core.election import Election
from vipd.core.group import GroupElection
from vipd.core.protocol import Flag, Heartbeat, KeyRing, Reject, State
from vipd.core.votes import PROBE_EVERY, REACHABLE_LEASES
from vipd.health import CheckStatus
from vipd.movers.remote import MoverStatus


@dataclass(frozen=True, slots=True)
class CheckView:
    name: str
    kind: str
    up: bool | None  # None: not yet risen or fallen
    detail: str | None  # of the last probe; None before the first
    duration_seconds: float | None
    last_change_seconds_ago: float | None


@dataclass(frozen=True, slots=True)
class PeerView:
    node: str
    state: str
    term: int
    priority: int
    effective_priority: int
    healthy: bool
    flags: list[str]
    last_heartbeat_seconds_ago: float
    reachable: bool  # a valid heartbeat within the dead interval
    hears_us: bool  # it echoes one of our heartbeats sent within the dead interval
    eligible: bool  # it could take over now
    rtt_ms: float | None
    settings_match: bool
    clock_offset_seconds: float | None  # its wall clock minus ours, through the echo

    @property
    def active(self) -> bool:
        return self.reachable and self.state == State.ACTIVE.name


@dataclass(frozen=True, slots=True)
class KeysView:
    """The heartbeat keys (docs/protocol.md, key rotation): a rotation's old key may go
    once both nodes sign with the new one."""

    loaded: list[int]  # the key ids this node holds
    signing: int  # the one it signs with now (its newest the peer also holds)
    peer_signing: int | None  # the peer's last accepted heartbeat was signed with
    peer_newest: int | None  # the newest key id the peer says it holds


@dataclass(frozen=True, slots=True)
class VipView:
    address: str
    held: bool


@dataclass(frozen=True, slots=True)
class VoteView:
    voter: str
    kind: str  # "self", "peer" or "witness"
    remaining_seconds: float  # until this vote runs out, as we count it
    age_seconds: float  # since we sent the request that won it


@dataclass(frozen=True, slots=True)
class WitnessView:
    address: str
    reachable: bool  # an authenticated reply within REACHABLE_FOR
    last_reply_seconds_ago: float | None
    verdict: str | None  # of its last reply: granted, held, restarting, released, stale


@dataclass(frozen=True, slots=True)
class ArbiterView:
    kind: str  # "witness", or "none": a partition of the heartbeat path makes both active
    lease_seconds: float
    voters: int
    majority: int
    votes: list[VoteView]  # the unexpired votes we hold
    majority_remaining_seconds: float | None  # how long we may hold the VIPs on them
    vote_for: str | None  # whom our own vote goes to now
    campaign: str | None  # a takeover waiting for a majority of votes, and why
    witnesses: list[WitnessView]


NO_ARBITER = ArbiterView("none", 0.0, 2, 2, [], None, None, None, [])


@dataclass(frozen=True, slots=True)
class MemberView:
    """A group member's published record (arbiter etcd)."""

    node: str
    state: str
    priority: int
    healthy: bool
    maintenance: bool
    eligible: bool
    wants: bool  # asking the holder for the VIPs (preempting or promoted)
    holder: bool
    version: str
    settings_match: bool
    starting: bool = False  # in its start wait: nobody claims before it is over


@dataclass(frozen=True, slots=True)
class GroupView:
    """This node's view of its group on etcd."""

    endpoints: list[str]
    prefix: str
    etcd: str  # connecting, ok, unreachable, lease_expired
    etcd_detail: str
    ttl_seconds: float  # asked
    granted_ttl_seconds: float | None  # what etcd granted (it may raise a short TTL)
    lease: str | None  # hex id
    lease_remaining_seconds: float | None  # how long our lease is surely alive on etcd
    holder: str | None
    holder_term: int  # the holder key's create revision
    successor: str | None
    revision: int  # of the last change the watch showed
    members: list[MemberView]


@dataclass(frozen=True, slots=True)
class DampingView:
    """Flap damping of preemption (vipd/core/damping.py, docs/election.md)."""

    enabled: bool
    damped: bool  # this node does not preempt now
    remaining_seconds: float | None  # damped: left of the hold-down (None: not healthy yet)
    failures: int  # counted within the window
    failures_to_damp: int
    window_seconds: float
    hold_down_seconds: float
    last_failure: str | None  # its cause and detail
    last_failure_seconds_ago: float | None


@dataclass(frozen=True, slots=True)
class Status:
    node: str
    cluster: str
    version: str
    uptime_seconds: float
    state: str
    term: int
    pair_term: int
    priority: int
    effective_priority: int
    preempt: bool
    preferred: bool
    maintenance: bool
    healthy: bool | None  # the checks' verdict (None: not known yet)
    health_override: bool  # a forced promote acts as healthy until the checks recover
    handover: str | None  # the state a handover in progress leads to
    ready: bool
    checks: list[CheckView]
    interface: str
    vips: list[VipView]
    vip_error: str | None
    peer: PeerView | None
    config_digest: str
    rejected_heartbeats: dict[str, int]
    socket_errors: dict[str, int]  # heartbeat socket: "send", "receive"
    fence: str  # the kernel gate (config `fence`): "none", "open" or "shut"
    arbiter: ArbiterView = NO_ARBITER
    group: GroupView | None = None  # arbiter etcd: the group (then `peer` is None)
    movers: list[MoverStatus] = dataclasses.field(default_factory=list)  # remote movers
    damping: DampingView | None = None  # None: an older vipd
    # heartbeats the kernel dropped (fence: kernel, a pair's filter); None: no filter
    heartbeat_filtered: int | None = None
    keys: KeysView | None = None  # a pair's heartbeat keys (None: a group, an older vipd)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Status:
        """The status document an API returned (vipctl); raises KeyError or TypeError
        when it is not one."""
        peer, arb = doc["peer"], doc.get("arbiter")  # absent: an older vipd
        arbiter = NO_ARBITER if arb is None else ArbiterView(**{
            **arb, "votes": [VoteView(**v) for v in arb["votes"]],
            "witnesses": [WitnessView(**w) for w in arb["witnesses"]]})
        damping, keys = doc.get("damping"), doc.get("keys")
        grp = doc.get("group")
        group = None if grp is None else GroupView(**{
            **grp, "members": [MemberView(**m) for m in grp["members"]]})
        return cls(**{**doc, "checks": [CheckView(**c) for c in doc["checks"]],
                      "vips": [VipView(**v) for v in doc["vips"]],
                      "peer": None if peer is None else PeerView(**peer),
                      "arbiter": arbiter, "group": group,
                      "damping": None if damping is None else DampingView(**damping),
                      "keys": None if keys is None else KeysView(**keys),
                      "movers": [MoverStatus(**m) for m in doc.get("movers", [])]})


def snapshot(config: Config, election: Election, checks: list[CheckStatus], *,
             now: float, mono: float, started: float, held: set[str], vip_error: str | None,
             last_rtt: float | None, clock_offset: float | None,
             rejected: dict[str, int], socket_errors: dict[str, int],
             fence: str = "none", witness_replies: dict[str, float | None] | None = None,
             keys: KeysView | None = None) -> Status:
    """The node at loop time ``now`` (``mono``: time.monotonic(), for check ages)."""
    e = election
    peer = None
    if e.peer is not None:
        hb = e.peer.heartbeat
        peer = PeerView(
            node=hb.node, state=hb.state.name, term=hb.term, priority=hb.priority,
            effective_priority=hb.effective_priority, healthy=Flag.HEALTHY in hb.flags,
            flags=[f.name for f in Flag if f and f.name and f in hb.flags],
            last_heartbeat_seconds_ago=round(now - e.peer.received_at, 3),
            reachable=e.peer_alive(now), hears_us=e.peer_hears_us(now),
            eligible=e.peer_eligible(now),
            rtt_ms=None if last_rtt is None else round(last_rtt * 1000, 3),
            settings_match=hb.settings_digest == e.cfg.digest,
            clock_offset_seconds=clock_offset)
    return Status(
        node=config.node, cluster=config.cluster, version=__version__,
        uptime_seconds=round(mono - started, 3), state=e.state.name, term=e.term,
        pair_term=max(e.term, e.peer_term_seen), priority=e.cfg.priority,
        effective_priority=e.cfg.priority, preempt=e.cfg.preempt, preferred=e.preferred,
        maintenance=e.maintenance, healthy=e.health, health_override=e.health_override,
        handover=None if e.handover is None else e.handover.target.name,
        ready=e.ready(now),
        checks=_checks(checks, mono),
        interface=config.interface,
        vips=[VipView(str(v), str(v) in held) for v in config.vips],
        vip_error=vip_error, peer=peer, config_digest=e.cfg.digest.hex(),
        rejected_heartbeats={r.value: n for r in Reject if (n := rejected.get(r.value, 0))},
        socket_errors=socket_errors, fence=fence,
        arbiter=arbiter_view(e, now, witness_replies or {}),
        damping=damping_view(e.damper, e.cfg.damping, now), keys=keys)


def keys_view(ring: KeyRing, peer_newest: int | None, peer: Heartbeat | None) -> KeysView:
    return KeysView(loaded=ring.ids, signing=ring.signing_id(peer_newest),
                    peer_signing=None if peer is None else peer.key_id,
                    peer_newest=peer_newest)


def damping_view(damper: Damper, cfg: DampingConfig, now: float) -> DampingView:
    until = damper.until(now, cfg)
    recent = damper.recent(now, cfg)
    last = damper.flaps[-1] if damper.flaps else None
    return DampingView(
        enabled=cfg.enabled, damped=until is not None,
        remaining_seconds=None if until is None or until == float("inf")
        else round(until - now, 3),
        failures=len(recent), failures_to_damp=cfg.failures, window_seconds=cfg.window,
        hold_down_seconds=cfg.hold_down,
        last_failure=None if last is None else f"{last.cause}: {last.detail}",
        last_failure_seconds_ago=None if last is None else round(now - last.at, 3))


def arbiter_view(e: Election, now: float, replies: dict[str, float | None]) -> ArbiterView:
    """The votes as this node counts them (docs/election.md)."""
    cfg = e.cfg
    if e.tally is None or e.ballot is None:
        return NO_ARBITER
    lease = cfg.vote_lease
    reachable_for = max(REACHABLE_LEASES * lease, 2 * PROBE_EVERY)
    peer = e.peer.heartbeat.node if e.peer is not None else None
    votes = [VoteView(voter, "self" if voter == cfg.node else
                      "peer" if voter == peer else "witness",
                      round(e.tally.expiries[voter] - now, 3),
                      round(now - e.tally.counted_from[voter], 3))
             for voter in e.tally.held(now)]
    until = e.tally.majority_until(now)
    witnesses = []
    for address in cfg.witnesses:
        at = replies.get(address)
        seen = e.witnesses.get(address)
        witnesses.append(WitnessView(
            address, at is not None and now - at <= reachable_for,
            None if at is None else round(now - at, 3),
            None if seen is None else seen.verdict.name.lower()))
    return ArbiterView(
        "witness", lease, cfg.voters, cfg.voters // 2 + 1, votes,
        None if until is None else round(until - now, 3), e.ballot.holder(now),
        None if e.campaign is None else e.campaign[1], witnesses)


def _checks(checks: list[CheckStatus], mono: float) -> list[CheckView]:
    return [CheckView(c.name, c.kind, c.up, c.detail, c.duration,
                      None if c.changed_at is None else round(mono - c.changed_at, 3))
            for c in checks]


def group_snapshot(config: Config, e: GroupElection, checks: list[CheckStatus], *,
                   now: float, mono: float, started: float, held: set[str],
                   vip_error: str | None, fence: str, ready: bool,
                   granted_ttl: float | None) -> Status:
    """A group node (arbiter etcd) at loop time ``now``: the same `Status`, with the group
    in place of the peer."""
    assert config.etcd is not None
    etcd, view = config.etcd, e.view
    holder = view.holder
    members = [MemberView(
        m.node, m.state.name, m.priority, m.healthy, m.maintenance, m.eligible, m.wants,
        holder is not None and holder.node == m.node, m.version,
        m.digest == e.cfg.digest, m.starting)
        for m in sorted(view.members.values(), key=lambda m: m.node)]
    left = e.lease_until - now if e.lease is not None else None
    group = GroupView(
        endpoints=[str(x) for x in etcd.endpoints], prefix=etcd.prefix, etcd=e.store.value,
        etcd_detail=e.store_detail, ttl_seconds=etcd.ttl, granted_ttl_seconds=granted_ttl,
        lease=None if e.lease is None else f"{e.lease:x}",
        lease_remaining_seconds=None if left is None else round(max(left, 0.0), 3),
        holder=None if holder is None else holder.node,
        holder_term=0 if holder is None else holder.revision, successor=view.successor,
        revision=view.revision, members=members)
    return Status(
        node=config.node, cluster=config.cluster, version=__version__,
        uptime_seconds=round(mono - started, 3), state=e.state.name, term=e.term,
        pair_term=max(e.term, group.holder_term), priority=e.cfg.priority,
        effective_priority=e.cfg.priority, preempt=e.cfg.preempt, preferred=e.preferred,
        maintenance=e.maintenance, healthy=e.health, health_override=False, handover=None,
        ready=ready, checks=_checks(checks, mono), interface=config.interface,
        vips=[VipView(str(v), str(v) in held) for v in config.vips], vip_error=vip_error,
        peer=None, config_digest=e.cfg.digest, rejected_heartbeats={}, socket_errors={},
        fence=fence,
        arbiter=ArbiterView("etcd", granted_ttl or etcd.ttl, 0, 0, [], None, None, None, []),
        group=group, damping=damping_view(e.damper, e.cfg.damping, now))
