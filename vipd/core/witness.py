"""The witness: one vote per cluster for many clusters, behind one UDP port. Pure: the
runtime (vipd/witness.py) passes every datagram in with the time, and sends the replies.

    datagram --peek_names--> cluster? --> node? --> Session.open --> Ballot --> reply
        |                       |           |            |              |
     malformed,           unknown_cluster  unknown_node  bad_mac, replay, GRANTED, HELD,
     oversize, ...        (no reply)       (no reply)    wrong_kind, ... RESTARTING,
     (no reply)                                          stale (*)      RELEASED

Theory of operation
-------------------
A pair of nodes and a witness are three voters (docs/election.md, "arbitration by lease
votes"). Each cluster has one `Ballot` here: the vote is granted to at most one node at a
time, for the lease the request asks, counted on our monotonic clock from when we grant;
no other node gets it before that lease has run out. What a request asks is said by the
node's advert in it:

    Flag.RESIGNING                   give the vote back (the node has shut its gate):
                                     freed if that node holds it; RELEASED
    State.ACTIVE or Flag.CANDIDATE   grant or renew it: GRANTED, HELD or RESTARTING
    anything else (a standby)        a probe, nothing changes: HELD (another node's),
                                     RESTARTING, or RELEASED (free)

Start-up: this process may have forgotten a grant of its previous incarnation, so a
cluster grants nothing before (when it was set up here + the lease the request asks):
RESTARTING, with the wait. A cluster set up by a reload counts from the reload, so a
cluster removed and added again cannot forget a grant either.

Each (cluster, node) has its own `Session` (replay and freshness filter, echo). The reply
echoes the request, which is how the node knows which of its requests won the vote and
counts the vote from that request's send time (vipd.core.votes.Tally).

(*) A datagram refused as stale gets no reply, except while that node's Session has
accepted nothing yet: then it gets a STALE verdict, whose echo lets the node's next
request prove itself fresh without the wall clocks agreeing (docs/protocol.md).

Refusals are counted by reason (`rejected`), answers by cluster and verdict
(`requests`). What an operator wants to read in the log comes out as `Notice`s
(`take_notices`), one per meaningful event, never one per request.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from vipd.core.protocol import (
    DEFAULT_MAX_SKEW,
    Advert,
    Flag,
    KeyRing,
    Kind,
    Reject,
    Rejected,
    Session,
    State,
    Verdict,
    Vote,
    decode,
    peek_names,
)
from vipd.core.votes import Ballot

Address = Hashable  # where a datagram came from, and where its reply goes
Reply = tuple[bytes, Address]

UNKNOWN_CLUSTER = "unknown_cluster"
UNKNOWN_NODE = "unknown_node"
# Every refusal reason: the label values of vipd_witness_rejected_total (bounded).
REFUSALS: tuple[str, ...] = (*(reason.value for reason in Reject), UNKNOWN_CLUSTER,
                             UNKNOWN_NODE)
VERDICTS: tuple[str, ...] = tuple(verdict.name.lower() for verdict in Verdict)
_LABEL = {verdict: verdict.name.lower() for verdict in Verdict}
_NO_DIGEST = b"\0" * 8  # a witness has no pair settings to compare


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One cluster as configured: its key ring and the names of its nodes."""

    keys: KeyRing
    nodes: frozenset[str]


# --- notices: what the runtime logs --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class VoteMoved:
    """The vote went to ``node``; before it was ``previous``'s (None: no grant since the
    cluster was set up here), whose grant ended ``ended_ago`` seconds before."""

    cluster: str
    node: str
    previous: str | None
    ended_ago: float | None
    released: bool  # the previous holder gave it back (else its lease ran out)


@dataclass(frozen=True, slots=True)
class VoteReleased:
    cluster: str
    node: str


@dataclass(frozen=True, slots=True)
class NodeBooted:
    """The first request of a new boot of ``node`` (``first``: the first boot we see)."""

    cluster: str
    node: str
    boot_id: int
    source: Address
    first: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """A datagram was refused; ``count``: refusals for this reason so far."""

    reason: str
    detail: str
    source: Address
    count: int


Notice = VoteMoved | VoteReleased | NodeBooted | Refused


# --- state ---------------------------------------------------------------------------------

@dataclass(slots=True)
class _Cluster:
    name: str
    spec: ClusterSpec
    since: float  # set up here at; nothing is granted before since + the lease asked
    ballot: Ballot = field(default_factory=lambda: Ballot(lease=0.0))
    sessions: dict[str, Session] = field(default_factory=dict)
    boots: dict[str, int] = field(default_factory=dict)
    last_request: dict[str, float] = field(default_factory=dict)  # accepted, by node
    released_by: str | None = None  # the last give-back, for the next grant's notice
    released_at: float = float("-inf")


class Witness:
    """The decisions of a witness for many clusters. Time (`now`, monotonic seconds, and
    `wall_ns`, epoch nanoseconds) is always an argument."""

    def __init__(self, name: str, boot_id: int, *, max_skew: float = DEFAULT_MAX_SKEW) -> None:
        self.name = name
        self.boot_id = boot_id
        self.max_skew = max_skew
        self._clusters: dict[str, _Cluster] = {}
        self.requests: dict[tuple[str, str], int] = {}  # (cluster, verdict) -> answers
        self.rejected: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self._notices: list[Notice] = []

    # --- configuration ---------------------------------------------------------------------

    def configure(self, clusters: Mapping[str, ClusterSpec], now: float, *,
                  name: str | None = None, max_skew: float | None = None) -> None:
        """Serve exactly ``clusters`` from now on (at start, and on every reload).

        A cluster that stays keeps its ballot; its sessions take the new keys, and those
        of nodes no longer listed go. A new cluster grants nothing for one lease from
        ``now``. A new name or skew rebuilds the sessions (they carry both)."""
        rebuild = (name is not None and name != self.name) or (
            max_skew is not None and max_skew != self.max_skew)
        self.name = self.name if name is None else name
        self.max_skew = self.max_skew if max_skew is None else max_skew
        kept: dict[str, _Cluster] = {}
        for cluster_name, spec in clusters.items():
            c = self._clusters.get(cluster_name)
            if c is None:
                c = _Cluster(cluster_name, spec, since=now)
                for verdict in VERDICTS:
                    self.requests.setdefault((cluster_name, verdict), 0)
            c.spec = spec
            for node in [n for n in c.sessions if rebuild or n not in spec.nodes]:
                del c.sessions[node]
            for node in [n for n in c.last_request if n not in spec.nodes]:
                c.last_request.pop(node, None)
                c.boots.pop(node, None)
            for session in c.sessions.values():
                session.rekey(spec.keys)
            kept[cluster_name] = c
        for gone in set(self._clusters) - set(kept):
            for verdict in VERDICTS:
                self.requests.pop((gone, verdict), None)
        self._clusters = kept

    @property
    def clusters(self) -> list[str]:
        return sorted(self._clusters)

    # --- what observers read ---------------------------------------------------------------

    def holders(self, now: float) -> dict[str, str | None]:
        """Each cluster's vote holder now (None: free)."""
        return {name: c.ballot.holder(now) for name, c in sorted(self._clusters.items())}

    def nodes(self) -> dict[str, list[str]]:
        """Each cluster's configured nodes, sorted."""
        return {name: sorted(c.spec.nodes) for name, c in sorted(self._clusters.items())}

    def last_requests(self) -> dict[tuple[str, str], float]:
        """(cluster, node) -> when its last request was accepted (monotonic seconds)."""
        return {(name, node): at for name, c in self._clusters.items()
                for node, at in c.last_request.items()}

    def take_notices(self) -> list[Notice]:
        notices, self._notices = self._notices, []
        return notices

    # --- datagrams -------------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float, wall_ns: int) -> list[Reply]:
        """One datagram in; the replies to send (none for a refused datagram, but see
        the stale rule in the module docstring)."""
        try:
            cluster_name, node = peek_names(data)
        except Rejected as exc:
            return self._refuse(exc.reason.value, exc.detail, source)
        c = self._clusters.get(cluster_name)
        if c is None:
            return self._refuse(UNKNOWN_CLUSTER, f"cluster {cluster_name!r} is not served "
                                                 f"by witness {self.name!r}", source)
        if node not in c.spec.nodes:
            return self._refuse(UNKNOWN_NODE, f"node {node!r} is not listed for cluster "
                                              f"{cluster_name!r}", source)
        session = c.sessions.get(node)
        if session is None:
            session = c.sessions[node] = Session(
                cluster=cluster_name, node=self.name, keys=c.spec.keys,
                boot_id=self.boot_id, digest=_NO_DIGEST, expect=Kind.VOTE_REQUEST,
                max_skew=self.max_skew)
        try:
            received = session.open(data, now, wall_ns, source)
        except Rejected as exc:
            self._refuse(exc.reason.value, f"cluster {cluster_name!r} node {node!r}: "
                                           f"{exc.detail}", source)
            if exc.reason is Reject.STALE and session.peer_node is None:
                # open() has set its echo to this datagram: our reply carries it.
                return self._stale_reply(c, session, data, source, now, wall_ns)
            return []
        hb = received.heartbeat
        assert hb.vote is not None  # the session accepts only VOTE_REQUEST, which has one
        c.last_request[node] = now
        known_boot = c.boots.get(node)
        if known_boot != hb.boot_id:
            c.boots[node] = hb.boot_id
            self._notices.append(NodeBooted(cluster_name, node, hb.boot_id, source,
                                            first=known_boot is None))
        lease_ms = hb.vote.lease_ms
        c.ballot.blocked_until = c.since + lease_ms / 1000  # the start-up block, this lease
        if Flag.RESIGNING in hb.flags:
            verdict, wait = self._release(c, node, now), 0.0
        elif hb.state is State.ACTIVE or Flag.CANDIDATE in hb.flags:
            verdict, wait = self._grant(c, node, lease_ms / 1000, now, received.echo_sent_at)
        else:
            verdict, wait = self._probe(c, node, now)
        return [(self._seal(c, session, verdict, lease_ms, wait, now, wall_ns), source)]

    def _probe(self, c: _Cluster, node: str, now: float) -> tuple[Verdict, float]:
        """A node that asks for nothing (a standby) asks whether the vote would be free:
        HELD (another node's), RESTARTING (our start-up block), else RELEASED (free).
        Nothing changes."""
        ballot = c.ballot
        if ballot.holder(now) not in (None, node):
            return Verdict.HELD, ballot.wait(now)
        if now < ballot.blocked_until:
            return Verdict.RESTARTING, ballot.wait(now)
        return Verdict.RELEASED, 0.0

    def _grant(self, c: _Cluster, node: str, lease: float, now: float,
               echo_sent_at: float | None) -> tuple[Verdict, float]:
        """Grant or renew, but not to a node that has stopped hearing us: its request
        echoes a reply of ours older than the lease. Such a grant counts for nobody and
        only keeps the vote from the other node, and a node whose replies are lost (a
        one-way path) would renew it for as long as the path stays broken. It gets
        STALE, as a request that proves nothing does: the reply is what its next
        request echoes, so it is granted again as soon as it hears us."""
        if echo_sent_at is not None and now - echo_sent_at > lease:
            return Verdict.STALE, 0.0
        ballot = c.ballot
        previous, previous_until = ballot.grantee, ballot.until
        held_before = ballot.holder(now) == node
        verdict = ballot.grant(node, now, lease)
        if verdict is not Verdict.GRANTED:
            return verdict, ballot.wait(now)
        if not held_before and previous != node:
            if previous is not None:
                self._notices.append(VoteMoved(c.name, node, previous, now - previous_until,
                                               released=False))
            elif c.released_by is not None and c.released_by != node:
                self._notices.append(VoteMoved(c.name, node, c.released_by,
                                               now - c.released_at, released=True))
            elif c.released_by is None:
                self._notices.append(VoteMoved(c.name, node, None, None, released=False))
        return verdict, 0.0

    def _release(self, c: _Cluster, node: str, now: float) -> Verdict:
        held = c.ballot.holder(now) == node
        if c.ballot.release(node) and held:
            c.released_by, c.released_at = node, now
            self._notices.append(VoteReleased(c.name, node))
        return Verdict.RELEASED

    def _stale_reply(self, c: _Cluster, session: Session, data: bytes, source: Address,
                     now: float, wall_ns: int) -> list[Reply]:
        try:
            vote = decode(data, c.spec.keys).vote  # authentic: open() got past the MAC
        except Rejected:
            return []
        if vote is None:
            return []
        return [(self._seal(c, session, Verdict.STALE, vote.lease_ms, 0.0, now, wall_ns),
                 source)]

    def _seal(self, c: _Cluster, session: Session, verdict: Verdict, lease_ms: int,
              wait: float, now: float, wall_ns: int) -> bytes:
        key = (c.name, _LABEL[verdict])
        self.requests[key] = self.requests.get(key, 0) + 1
        granted = verdict is Verdict.GRANTED
        advert = Advert(state=State.ACTIVE if granted else State.STANDBY,
                        flags=Flag.VOTE if granted else Flag.NONE, term=0, priority=0,
                        effective_priority=0)
        # Rounded up: a node that waits wait_ms never asks before the vote is free.
        vote = Vote(lease_ms=lease_ms, verdict=verdict,
                    wait_ms=min(math.ceil(wait * 1000), 0xFFFF_FFFF))
        return session.seal(advert, now, wall_ns, kind=Kind.VOTE_REPLY, vote=vote)

    def _refuse(self, reason: str, detail: str, source: Address) -> list[Reply]:
        count = self.rejected.get(reason, 0) + 1
        self.rejected[reason] = count
        self._notices.append(Refused(reason, detail, source, count))
        return []

