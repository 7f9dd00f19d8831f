"""The witness's decisions (vipd.core.witness), driven by real node-side Sessions over
bytes, with time passed by hand.

Property (hypothesis): whatever the order and timing of requests (active, candidate,
standby probes), give-backs and witness restarts from 2-3 nodes of one cluster, no two
nodes are ever granted the vote for overlapping leases (a give-back ends the giver's
lease when it is sent).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.core.protocol import (
    Advert,
    Flag,
    Heartbeat,
    KeyRing,
    Kind,
    Received,
    Reject,
    Session,
    State,
    Verdict,
    Vote,
    decode,
)
from vipd.core.witness import (
    REFUSALS,
    UNKNOWN_CLUSTER,
    UNKNOWN_NODE,
    ClusterSpec,
    NodeBooted,
    Refused,
    VoteMoved,
    VoteReleased,
    Witness,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(50, 82))
KEYS = KeyRing({1: SECRET})
DB_KEYS = KeyRing({3: OTHER_SECRET})
T0 = 1_700_000_000_000_000_000  # epoch ns at now = 0
LEASE_MS = 2000
LEASE = LEASE_MS / 1000
WITNESS_BOOT = 0x5700_0000_0000_0001
READY = 10.0  # past the start-up block of a witness configured at 0
_boots = itertools.count(0xB00_0000_0000_0001)


def wall(now: float, offset: float = 0.0) -> int:
    return T0 + round((now + offset) * 1e9)


class Node:
    """A node's end of the vote channel, as the node side will have it."""

    def __init__(self, name: str, cluster: str = "web", keys: KeyRing = KEYS,
                 clock_offset: float = 0.0, host: int = 1) -> None:
        self.name = name
        self.session = Session(cluster=cluster, node=name, keys=keys, boot_id=next(_boots),
                               digest=b"\0" * 8, expect=Kind.VOTE_REPLY)
        self.address = (f"198.51.100.{host}", 40000 + host)
        self.offset = clock_offset

    def request(self, now: float, lease_ms: int = LEASE_MS, resign: bool = False,
                as_: str = "active") -> bytes:
        """``as_``: "active" (a holder renewing), "candidate" (a standby campaigning),
        "standby" (a probe)."""
        state = State.ACTIVE if as_ == "active" else State.STANDBY
        flags = Flag.HEALTHY | (Flag.RESIGNING if resign else 0) | (
            Flag.CANDIDATE if as_ == "candidate" else 0)
        advert = Advert(state, flags, term=3, priority=150, effective_priority=150)
        return self.session.seal(advert, now, wall(now, self.offset),
                                 kind=Kind.VOTE_REQUEST, vote=Vote(lease_ms=lease_ms))

    def open(self, replies: list[tuple[bytes, object]], now: float) -> Received:
        assert len(replies) == 1, replies
        data, address = replies[0]
        assert address == self.address
        return self.session.open(data, now, wall(now, self.offset))


def web_spec(*nodes: str) -> ClusterSpec:
    return ClusterSpec(KEYS, frozenset(nodes or ("vm-a", "vm-b")))


def witness(now: float = 0.0, **clusters: ClusterSpec) -> Witness:
    w = Witness("witness", WITNESS_BOOT)
    w.configure(clusters or {"web": web_spec()}, now)
    return w


def ask(w: Witness, node: Node, now: float, *, lease_ms: int = LEASE_MS,
        resign: bool = False, as_: str = "active") -> Heartbeat:
    """One request, answered at once; the reply as the node opens it."""
    replies = w.receive(node.request(now, lease_ms, resign, as_), node.address, now,
                        wall(now))
    return node.open(replies, now).heartbeat


def verdict(reply: Heartbeat) -> Verdict:
    assert reply.vote is not None and reply.kind is Kind.VOTE_REPLY
    return reply.vote.verdict


@pytest.fixture
def nodes() -> tuple[Node, Node]:
    return Node("vm-a", host=1), Node("vm-b", host=2)


# --- granting --------------------------------------------------------------------------------

def test_the_first_requester_is_granted(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness()
    reply = ask(w, a, READY)
    assert reply.vote == Vote(lease_ms=LEASE_MS, verdict=Verdict.GRANTED, wait_ms=0)
    assert (reply.state, reply.flags, reply.node) == (State.ACTIVE, Flag.VOTE, "witness")
    assert w.holders(READY) == {"web": "vm-a"}
    assert w.requests[("web", "granted")] == 1


def test_the_other_node_is_held_for_the_rest_of_the_lease(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    reply = ask(w, b, READY + 0.5)
    assert verdict(reply) is Verdict.HELD
    assert reply.vote is not None and reply.vote.wait_ms == 1500
    assert (reply.state, reply.flags) == (State.STANDBY, Flag.NONE)
    assert w.holders(READY + 0.5) == {"web": "vm-a"}


def test_the_other_node_is_granted_once_the_lease_has_run_out(
        nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    w.take_notices()
    last_moment = ask(w, b, READY + LEASE - 0.001)
    assert verdict(last_moment) is Verdict.HELD
    assert last_moment.vote is not None and last_moment.vote.wait_ms == 1
    assert verdict(ask(w, b, READY + LEASE + 0.012)) is Verdict.GRANTED
    assert w.holders(READY + LEASE + 0.012) == {"web": "vm-b"}
    moved = [n for n in w.take_notices() if isinstance(n, VoteMoved)]
    assert len(moved) == 1 and (moved[0].node, moved[0].previous) == ("vm-b", "vm-a")
    assert moved[0].ended_ago == pytest.approx(0.012) and not moved[0].released


def test_the_holder_keeps_the_vote_while_it_renews(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    renewals = [READY + 0.5 * i for i in range(41)]  # 20 s of renewals, a quarter lease apart
    asks = [READY + 0.05 + 0.3 * i for i in range(66)]
    for now, who in sorted([(t, a) for t in renewals] + [(t, b) for t in asks],
                           key=lambda e: e[0]):
        expected = Verdict.GRANTED if who is a else Verdict.HELD
        assert verdict(ask(w, who, now)) is expected, (now, who.name)
    assert w.requests[("web", "granted")] == 41 and w.requests[("web", "held")] == 66


def test_a_renewal_extends_the_lease_from_the_renewal(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    ask(w, a, READY + 1.5)
    reply = ask(w, b, READY + 3.0)  # past the first grant's lease, within the renewal's
    assert verdict(reply) is Verdict.HELD and reply.vote is not None
    assert reply.vote.wait_ms == 500


def test_a_give_back_by_the_holder_frees_the_vote_at_once(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    w.take_notices()
    reply = ask(w, a, READY + 0.2, resign=True)
    assert verdict(reply) is Verdict.RELEASED and reply.flags == Flag.NONE
    assert w.holders(READY + 0.2) == {"web": None}
    assert verdict(ask(w, b, READY + 0.21)) is Verdict.GRANTED
    released, moved = [n for n in w.take_notices() if not isinstance(n, NodeBooted)]
    assert released == VoteReleased("web", "vm-a")
    assert isinstance(moved, VoteMoved) and moved.released
    assert (moved.node, moved.previous, moved.ended_ago) == ("vm-b", "vm-a",
                                                             pytest.approx(0.01))


def test_a_give_back_by_another_node_changes_nothing(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    assert verdict(ask(w, b, READY + 0.2, resign=True)) is Verdict.RELEASED
    assert w.holders(READY + 0.2) == {"web": "vm-a"}
    assert verdict(ask(w, b, READY + 0.3)) is Verdict.HELD
    assert not [n for n in w.take_notices() if isinstance(n, VoteReleased)]


def test_a_candidate_is_granted_like_an_active_node(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    assert verdict(ask(w, b, READY, as_="candidate")) is Verdict.GRANTED
    assert verdict(ask(w, a, READY + 0.1, as_="candidate")) is Verdict.HELD


def test_a_standby_probe_never_takes_the_vote(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness(now=100.0)
    probe = ask(w, b, 100.5, as_="standby")  # start-up block: nothing is free yet
    assert verdict(probe) is Verdict.RESTARTING and probe.vote is not None
    assert probe.vote.wait_ms == 1500
    free = ask(w, b, 103.0, as_="standby")
    assert verdict(free) is Verdict.RELEASED and free.flags == Flag.NONE
    assert w.holders(103.0) == {"web": None}
    assert verdict(ask(w, a, 103.1)) is Verdict.GRANTED
    held = ask(w, b, 103.6, as_="standby")
    assert verdict(held) is Verdict.HELD and held.vote is not None
    assert held.vote.wait_ms == 1500
    assert verdict(ask(w, a, 103.7, as_="standby")) is Verdict.RELEASED  # its own: not HELD
    assert w.holders(103.7) == {"web": "vm-a"}  # a probe changes nothing, even the holder's


# --- start-up --------------------------------------------------------------------------------

def test_a_started_witness_grants_nothing_for_one_lease(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness(now=100.0)
    first = ask(w, a, 100.5)
    assert verdict(first) is Verdict.RESTARTING and first.vote is not None
    assert first.vote.wait_ms == 1500
    assert verdict(ask(w, a, 100.0 + LEASE - 0.001)) is Verdict.RESTARTING
    assert w.holders(101.9) == {"web": None}
    assert verdict(ask(w, a, 100.0 + LEASE)) is Verdict.GRANTED
    assert w.requests[("web", "restarting")] == 2


def test_the_start_up_block_is_the_lease_the_request_asks(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness(now=0.0)
    assert verdict(ask(w, a, 3.0, lease_ms=5000)) is Verdict.RESTARTING
    assert verdict(ask(w, a, 3.0 + 0.01, lease_ms=3000)) is Verdict.GRANTED


def test_a_cluster_added_by_a_reload_counts_its_start_from_the_reload() -> None:
    a, b, db1 = Node("vm-a", host=1), Node("vm-b", host=2), Node("db-1", "db", DB_KEYS, host=3)
    w = witness()
    ask(w, a, 99.5)
    w.configure({"web": web_spec(), "db": ClusterSpec(DB_KEYS, frozenset({"db-1", "db-2"}))},
                now=100.0)
    assert verdict(ask(w, db1, 100.5)) is Verdict.RESTARTING
    assert verdict(ask(w, b, 100.5)) is Verdict.HELD  # web kept its ballot
    assert verdict(ask(w, a, 100.6)) is Verdict.GRANTED
    assert verdict(ask(w, db1, 102.0)) is Verdict.GRANTED
    assert w.clusters == ["db", "web"]


def test_a_cluster_removed_and_added_again_does_not_forget_its_grant(
        nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    w.configure({}, now=READY + 0.1)
    w.configure({"web": web_spec()}, now=READY + 0.2)
    assert verdict(ask(w, b, READY + 0.3)) is Verdict.RESTARTING
    assert verdict(ask(w, b, READY + 0.2 + LEASE)) is Verdict.GRANTED  # a's lease is over


def test_a_reload_takes_new_keys_and_drops_nodes_no_longer_listed(
        nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    w = witness()
    ask(w, a, READY)
    ask(w, b, READY)
    rotated = KeyRing({1: SECRET, 2: OTHER_SECRET})
    w.configure({"web": ClusterSpec(rotated, frozenset({"vm-a"}))}, now=READY + 0.1)
    assert set(w.last_requests()) == {("web", "vm-a")}
    a.session.rekey(rotated)
    reply = ask(w, a, READY + 0.2)
    assert verdict(reply) is Verdict.GRANTED and reply.key_id == 2
    assert w.receive(b.request(READY + 0.3), b.address, READY + 0.3, wall(READY + 0.3)) == []
    assert w.rejected[UNKNOWN_NODE] == 1


# --- many clusters ---------------------------------------------------------------------------

def test_clusters_are_independent() -> None:
    a, b = Node("vm-a", host=1), Node("vm-b", host=2)
    db1, db2 = Node("db-1", "db", DB_KEYS, host=3), Node("db-2", "db", DB_KEYS, host=4)
    w = witness(web=web_spec(), db=ClusterSpec(DB_KEYS, frozenset({"db-1", "db-2"})))
    assert verdict(ask(w, a, READY)) is Verdict.GRANTED
    assert verdict(ask(w, db2, READY + 0.1)) is Verdict.GRANTED
    assert verdict(ask(w, b, READY + 0.2)) is Verdict.HELD
    assert verdict(ask(w, db1, READY + 0.3)) is Verdict.HELD
    assert verdict(ask(w, db2, READY + 0.4, resign=True)) is Verdict.RELEASED
    assert verdict(ask(w, db1, READY + 0.5)) is Verdict.GRANTED
    assert verdict(ask(w, b, READY + 0.6)) is Verdict.HELD
    assert w.holders(READY + 0.6) == {"db": "db-1", "web": "vm-a"}
    assert (w.requests[("web", "held")], w.requests[("db", "held")]) == (2, 1)


# --- refusals --------------------------------------------------------------------------------

def test_every_refusal_is_counted_by_reason_and_gets_no_reply(
        nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness()
    now = READY

    def refused(data: bytes) -> None:
        assert w.receive(data, ("203.0.113.9", 999), now, wall(now)) == []

    refused(Node("vm-a", cluster="mail").request(now))
    refused(Node("vm-c").request(now))
    refused(Node("vm-b", keys=KeyRing({1: OTHER_SECRET})).request(now))  # same id, other key
    refused(Node("vm-b", keys=KeyRing({9: SECRET})).request(now))
    first, second = a.request(now), a.request(now + 0.01)
    assert w.receive(second, a.address, now, wall(now))  # accepted
    refused(first)  # older sequence of the same boot
    refused(second)  # the same datagram again
    heartbeat = a.session.seal(Advert(State.ACTIVE, Flag.HEALTHY, 1, 150, 150), now, wall(now))
    refused(heartbeat)
    refused(b"VIPD" + bytes(200))
    refused(bytes(600))
    expected = {UNKNOWN_CLUSTER: 1, UNKNOWN_NODE: 1, Reject.BAD_MAC: 1, Reject.UNKNOWN_KEY: 1,
                Reject.REPLAY: 1, Reject.DUPLICATE: 1, Reject.WRONG_KIND: 1,
                Reject.BAD_VERSION: 1, Reject.OVERSIZE: 1}
    assert w.rejected == {reason: expected.get(reason, 0) for reason in REFUSALS}
    refusals = [n for n in w.take_notices() if isinstance(n, Refused)]
    assert [n.count for n in refusals] == [1] * 9
    assert "'mail'" in refusals[0].detail and "'vm-c'" in refusals[1].detail
    assert w.requests[("web", "granted")] == 1


def test_a_stale_request_is_answered_while_nothing_was_accepted_then_proves_itself() -> None:
    """The node's wall clock is 5 s ahead: its first request is stale by ours. The STALE
    reply echoes it, so the node's second request echoes our reply and is fresh; without
    that reply it would stay stale (the control below)."""
    a = Node("vm-a", clock_offset=5.0)
    w = witness()
    replies = w.receive(a.request(READY), a.address, READY, wall(READY))
    assert w.rejected[Reject.STALE] == 1 and w.requests[("web", "stale")] == 1
    stale = decode(replies[0][0], KEYS)
    assert stale.vote is not None and stale.vote.verdict is Verdict.STALE
    assert stale.vote.lease_ms == LEASE_MS and stale.flags == Flag.NONE
    # Fresh for the node by its echo of the request, whatever the clocks say.
    assert a.open(replies, READY + 0.001).echo_sent_at == READY
    second = ask(w, a, READY + 0.002)
    assert verdict(second) is Verdict.GRANTED
    assert w.holders(READY + 0.002) == {"web": "vm-a"}
    unanswered = Node("vm-b", clock_offset=5.0, host=2)
    for i in range(3):  # never reading our STALE replies, it never proves itself
        now = READY + 0.1 * (i + 1)
        w.receive(unanswered.request(now), unanswered.address, now, wall(now))
    assert w.rejected[Reject.STALE] == 4


def test_a_stale_request_after_an_accepted_one_gets_no_reply(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness()
    ask(w, a, READY)
    a.offset = 5.0  # its clock steps; its echo (of a reply 10 s old) proves nothing
    later = READY + 10
    assert w.receive(a.request(later), a.address, later, wall(later)) == []
    assert w.rejected[Reject.STALE] == 1 and w.requests[("web", "stale")] == 0


# --- the echo --------------------------------------------------------------------------------

def test_the_reply_echoes_the_request_it_answers(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness()
    first, second = a.request(READY), a.request(READY + 0.2)
    reply_1 = w.receive(first, a.address, READY + 0.05, wall(READY + 0.05))
    reply_2 = w.receive(second, a.address, READY + 0.25, wall(READY + 0.25))
    assert a.open(reply_1, READY + 0.3).echo_sent_at == READY
    assert a.open(reply_2, READY + 0.31).echo_sent_at == READY + 0.2


def test_a_node_boot_is_noticed_once(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    w = witness()
    ask(w, a, READY)
    ask(w, a, READY + 0.1)
    restarted = Node("vm-a", host=1)
    ask(w, restarted, READY + 0.2)
    boots = [n for n in w.take_notices() if isinstance(n, NodeBooted)]
    assert [(n.node, n.boot_id, n.first) for n in boots] == [
        ("vm-a", a.session.boot_id, True), ("vm-a", restarted.session.boot_id, False)]
    assert boots[0].source == a.address


# --- the property ----------------------------------------------------------------------------

@dataclass
class Grant:
    node: str
    at: float
    until: float


OPS = st.lists(st.tuples(st.sampled_from(["vm-a", "vm-b", "vm-c"]),
                         st.sampled_from(["active", "active", "candidate", "standby",
                                          "give back", "restart witness"]),
                         st.floats(min_value=0.0, max_value=1.5)),
               max_size=120)


@settings(max_examples=300, deadline=None, database=None)
@given(ops=OPS, lease_ms=st.sampled_from([200, 500, 1000, 2000]))
def test_no_two_nodes_ever_hold_overlapping_grants(
        ops: list[tuple[str, str, float]], lease_ms: int) -> None:
    nodes = {name: Node(name, host=i) for i, name in enumerate(["vm-a", "vm-b", "vm-c"], 1)}
    spec = web_spec(*nodes)
    boots = itertools.count(1)
    now = 0.0
    w = Witness("witness", next(boots))
    w.configure({"web": spec}, now)
    grants: list[Grant] = []  # the witness's promises
    for name, op, step in ops:
        now += step
        if op == "restart witness":  # everything it knew is gone
            w = Witness("witness", next(boots))
            w.configure({"web": spec}, now)
            continue
        node = nodes[name]
        data = node.request(now, lease_ms, resign=op == "give back",
                            as_="standby" if op == "give back" else op)
        replies = w.receive(data, node.address, now, wall(now))
        reply = node.open(replies, now).heartbeat
        assert reply.vote is not None
        if reply.vote.verdict is Verdict.GRANTED:
            grants.append(Grant(name, now, now + lease_ms / 1000))
        elif reply.vote.verdict is Verdict.RELEASED:  # the node holds nothing from now on
            for grant in grants:
                if grant.node == name:
                    grant.until = min(grant.until, now)
    for one, other in itertools.combinations(grants, 2):
        if one.node != other.node:
            assert one.until <= other.at or other.until <= one.at, (one, other)
