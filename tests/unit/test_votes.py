"""vipd.core.votes, the vote messages on the wire, the arbiter config, the witness client
and how a node's status shows the votes. The election's use of the votes is tested in
tests/unit/test_election_votes.py and by the simulator (simulations/README.md)."""

from __future__ import annotations

import copy
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.arbiter.witness_client import WitnessClient
from vipd.config import load_config
from vipd.core import election as el
from vipd.core.protocol import (
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
)
from vipd.core.votes import Ballot, Tally, counted_lease, majority
from vipd.errors import ConfigError
from vipd.view import NO_ARBITER, Status
from vipd.vipctl import render_status

KEYS = KeyRing({3: b"k" * 32})
WALL = 1_800_000_000 * 10**9
ADVERT = Advert(State.ACTIVE, Flag.HEALTHY, 4, 150, 150)


# --- Ballot: one voter --------------------------------------------------------------------

def test_a_vote_goes_to_one_node_until_its_lease_ends() -> None:
    b = Ballot(0.32)
    assert b.grant("a", 1.0) is Verdict.GRANTED
    assert b.grant("b", 1.2) is Verdict.HELD
    assert b.wait(1.2) == pytest.approx(0.12)
    assert b.grant("a", 1.3) is Verdict.GRANTED  # the holder renews
    assert b.grant("b", 1.61) is Verdict.HELD  # renewed at 1.3: until 1.62
    assert b.grant("b", 1.62) is Verdict.GRANTED
    assert b.holder(1.62) == "b"


def test_only_the_grantee_gives_a_vote_back() -> None:
    b = Ballot(0.32)
    b.grant("a", 1.0)
    assert not b.release("b")
    assert b.grant("b", 1.1) is Verdict.HELD
    assert b.release("a")
    assert b.grant("b", 1.1) is Verdict.GRANTED


def test_a_started_voter_grants_nothing_for_one_lease() -> None:
    b = Ballot.started(0.32, 5.0)
    assert b.grant("a", 5.31) is Verdict.RESTARTING
    assert b.wait(5.31) == pytest.approx(0.01)
    assert b.grant("a", 5.32) is Verdict.GRANTED


def test_a_renewal_never_shortens_a_grant() -> None:
    b = Ballot(0.32)
    b.grant("a", 1.0, lease=1.0)
    b.grant("a", 1.1, lease=0.1)  # a shorter lease asked later
    assert b.grant("b", 1.9) is Verdict.HELD


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.2),
                          st.sampled_from(["grant", "grant", "grant", "release"])),
                max_size=60))
def test_grants_of_different_nodes_never_overlap(ops: list[tuple[str, float, str]]) -> None:
    b, now = Ballot(0.32), 0.0
    grants: list[tuple[str, float, float]] = []  # node, from, until (the voter's promise)
    for node, step, op in ops:
        now += step
        if op == "release":
            if b.release(node) and grants and grants[-1][0] == node:
                grants[-1] = (node, grants[-1][1], now)  # the grantee ended it itself
        elif b.grant(node, now) is Verdict.GRANTED:
            if grants and grants[-1][0] == node and grants[-1][2] > now:
                grants[-1] = (node, grants[-1][1], b.until)
            else:
                grants.append((node, now, b.until))
    for (n1, _, u1), (n2, s2, _) in pairwise(grants):
        assert n1 == n2 or s2 >= u1, grants


# --- Tally: one candidate -----------------------------------------------------------------

def test_the_majority_lasts_until_the_second_latest_vote_runs_out() -> None:
    t = Tally(3)
    t.record("self", 2.0, 0.32)
    assert t.majority_until(2.0) is None
    t.record("peer", 1.9, 0.32)
    t.record("witness", 1.95, 0.32)
    assert t.majority_until(2.0) == pytest.approx(1.95 + counted_lease(0.32))
    assert t.held(2.1) == ["peer", "self", "witness"]
    t.drop("witness")
    assert t.majority_until(2.0) == pytest.approx(1.9 + counted_lease(0.32))
    assert t.majority_until(1.9 + counted_lease(0.32)) is None  # expiry is exclusive


def test_an_older_request_never_shortens_a_vote() -> None:
    t = Tally(3)
    t.record("peer", 2.0, 0.32)
    t.record("peer", 1.5, 0.32)  # a late reply to an older request
    assert t.expiries["peer"] == pytest.approx(2.0 + counted_lease(0.32))


def test_an_answer_to_a_request_sent_before_a_give_back_counts_for_nothing() -> None:
    """We gave our votes up at 2.0; the voter may have granted another node since our
    give-back reached it, so a late GRANTED for a request of 1.99 must not count."""
    t = Tally(3)
    t.record("witness", 1.9, 0.32)
    t.clear(2.0)
    assert t.held(2.0) == []
    t.record("witness", 1.99, 0.32)
    assert t.held(2.01) == []
    t.record("witness", 2.0, 0.32)  # a request sent at or after the give-back counts
    assert t.held(2.01) == ["witness"]


def test_counted_lease_margin() -> None:
    # 0.1 % for clock rates, 5 ms for the gate's timer and the write
    assert counted_lease(0.32) == pytest.approx(0.32 * 0.999 - 0.005)
    assert counted_lease(0.001) == 0.0
    assert [majority(n) for n in (3, 4, 5)] == [2, 3, 3]


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 10), st.floats(0, 5), st.floats(0, 0.1),
       st.floats(-0.0005, 0.0005), st.floats(-0.0005, 0.0005))
def test_a_candidate_stops_counting_before_the_voter_grants_again(
        lease: float, sent: float, delay: float, rate_voter: float,
        rate_candidate: float) -> None:
    """Real time: the request leaves at `sent`, the voter grants on arrival, the voter's
    clock runs at (1 + rate_voter), the candidate's at (1 + rate_candidate); the two rates
    differ by at most the 0.1 % margin (RATE_MARGIN). The vote may go elsewhere only after
    the voter's lease ends, which must not be before the candidate stops counting it."""
    voter_free_real = (sent + delay) + lease / (1 + rate_voter)
    counted_until_real = sent + counted_lease(lease) / (1 + rate_candidate)
    assert counted_until_real <= voter_free_real


# --- the vote messages --------------------------------------------------------------------

def pair() -> tuple[Session, Session]:
    node = Session(cluster="web", node="vm-a", keys=KEYS, boot_id=11, digest=b"\0" * 8,
                   expect=Kind.VOTE_REPLY)
    witness = Session(cluster="web", node="witness", keys=KEYS, boot_id=22,
                      digest=b"\0" * 8, expect=Kind.VOTE_REQUEST)
    return node, witness


def test_request_and_reply_round_trip_and_the_reply_echoes_the_request() -> None:
    node, witness = pair()
    request = node.seal(ADVERT, 10.0, WALL, kind=Kind.VOTE_REQUEST, vote=Vote(320))
    rx = witness.open(request, 50.0, WALL)
    assert rx.heartbeat.kind is Kind.VOTE_REQUEST
    assert rx.heartbeat.vote == Vote(320, Verdict.GRANTED, 0)
    reply = witness.seal(Advert(State.STANDBY, Flag.NONE, 0, 0, 0), 50.001, WALL,
                         kind=Kind.VOTE_REPLY, vote=Vote(320, Verdict.HELD, 123))
    back = node.open(reply, 10.002, WALL)
    assert back.echo_sent_at == 10.0  # the request's send time: the vote counts from it
    assert back.heartbeat.vote == Vote(320, Verdict.HELD, 123)


def test_a_vote_message_to_a_heartbeat_session_and_the_reverse_are_refused() -> None:
    node, witness = pair()
    hb_session = Session(cluster="web", node="vm-b", keys=KEYS, boot_id=33, digest=b"\0" * 8)
    request = node.seal(ADVERT, 1.0, WALL, kind=Kind.VOTE_REQUEST, vote=Vote(320))
    with pytest.raises(Rejected) as info:
        hb_session.open(request, 1.0, WALL)
    assert info.value.reason is Reject.WRONG_KIND
    heartbeat = hb_session.seal(ADVERT, 1.0, WALL)
    with pytest.raises(Rejected) as info:
        witness.open(heartbeat, 1.0, WALL)
    assert info.value.reason is Reject.WRONG_KIND


@pytest.mark.parametrize(("block", "why"), [
    (bytes.fromhex("00000140" "00000000" "07000000"), "verdict 7"),  # unknown verdict
    (bytes.fromhex("00000140" "00000000" "00000100"), "verdict 0"),  # padding not zero
    (bytes.fromhex("00000000" "00000000" "00000000"), "lease 0 ms"),
    (bytes.fromhex("0000ea61" "00000000" "00000000"), "lease 60001 ms"),
])
def test_a_bad_vote_block_is_malformed_even_when_signed(block: bytes, why: str) -> None:
    import hashlib
    import hmac
    node, _ = pair()
    good = node.seal(ADVERT, 1.0, WALL, kind=Kind.VOTE_REQUEST, vote=Vote(320))
    body = good[:-32 - 12] + block
    data = body + hmac.digest(b"k" * 32, body, hashlib.sha256)
    with pytest.raises(Rejected) as info:
        decode(data, KEYS)
    assert info.value.reason is Reject.MALFORMED
    assert why.split()[0] in info.value.detail


def test_witness_client_asks_each_witness_and_gives_votes_back() -> None:
    client = WitnessClient(cluster="web", node="vm-a", keys=KEYS, boot_id=11,
                           digest=b"\0" * 8, lease=0.32, max_skew=1.0,
                           witnesses=[("198.51.100.3:5406", ("198.51.100.3", 5406))])
    (ask, to), = client.requests(ADVERT, False, 1.0, WALL)
    (give, _), = client.requests(ADVERT, True, 1.1, WALL)
    assert to == ("198.51.100.3", 5406)
    witness = Session(cluster="web", node="witness", keys=KEYS, boot_id=22, digest=b"\0" * 8,
                      expect=Kind.VOTE_REQUEST)
    first = witness.open(ask, 5.0, WALL).heartbeat
    assert first.vote == Vote(320) and Flag.RESIGNING not in first.flags
    assert Flag.RESIGNING in witness.open(give, 5.1, WALL).heartbeat.flags
    reply = witness.seal(Advert(State.ACTIVE, Flag.VOTE, 0, 0, 0), 5.1, WALL,
                         kind=Kind.VOTE_REPLY, vote=Vote(320, Verdict.RELEASED))
    event = client.open(reply, "198.51.100.3", 1.102, WALL)
    assert event == el.VoteReplied("198.51.100.3:5406", Verdict.RELEASED, 1.1, 0.32, 0.0)
    assert client.last_replies() == {"198.51.100.3:5406": 1.102}
    with pytest.raises(Rejected):  # a replay of the same reply
        client.open(reply, "198.51.100.3", 1.103, WALL)


# --- config -------------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "node": "vm-a", "cluster": "web", "interface": "eth0", "vips": ["198.51.100.10/32"],
    "heartbeat": {"bind": "198.51.100.101:5405", "peers": ["198.51.100.102:5405"]},
    "auth": {"key_file": "/etc/vipd/web.key"},
    "arbiter": {"witness": ["198.51.100.3:5406"]},
}


def load(tmp_path: Path, **changes: Any) -> Any:
    data = copy.deepcopy(BASE)
    data.update(changes)
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_an_arbiter_turns_the_fence_on_and_the_lease_defaults_to_the_dead_interval(
        tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.fence == "kernel"
    assert cfg.vote_lease == pytest.approx(0.32)
    assert load(tmp_path, arbiter={"witness": ["198.51.100.3:5406"], "lease": "500ms"}
                ).vote_lease == 0.5
    assert load(tmp_path, arbiter=None).fence == "none"


@pytest.mark.parametrize(("arbiter", "extra", "key", "message"), [
    ({"witness": ["198.51.100.3:5406"]}, {"fence": "none"}, "fence",
     "an arbiter needs fence: kernel"),
    ({"witness": []}, {}, "arbiter.witness", "expected at least one witness"),
    ({"witness": ["198.51.100.3:5406", "198.51.100.3:5406"]}, {}, "arbiter.witness[1]",
     "listed twice"),
    ({"witness": ["198.51.100.102:5405"]}, {}, "arbiter.witness[0]",
     "is on a heartbeat address of the pair; the witness must run on a third host"),
    ({"witness": ["198.51.100.101:5406"]}, {}, "arbiter.witness[0]", "run on a third host"),
    ({"witness": ["[2001:db8::3]:5406"]}, {}, "arbiter.witness[0]", "is IPv6 but bind"),
    ({"witness": ["198.51.100.3:5406"], "lease": "100ms"}, {}, "arbiter.lease",
     "at least 3 heartbeat intervals"),
    ({"witness": ["198.51.100.3:5406"], "votes": 3}, {}, "arbiter.votes",
     "unknown key; expected one of: witness, lease"),
])
def test_bad_arbiter_configs_are_explained(tmp_path: Path, arbiter: dict[str, Any],
                                           extra: dict[str, Any], key: str,
                                           message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, arbiter=arbiter, **extra)
    assert [p for p in info.value.problems if p[0] == key and message in p[1]], \
        info.value.problems


# --- status -------------------------------------------------------------------------------

def status_doc(arbiter: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": "vm-b", "cluster": "web", "version": "1", "uptime_seconds": 9.0,
        "state": "STANDBY", "term": 3, "pair_term": 3, "priority": 100,
        "effective_priority": 100, "preempt": True, "preferred": False,
        "maintenance": False, "healthy": True, "health_override": False, "handover": None,
        "ready": True, "checks": [], "interface": "eth0",
        "vips": [{"address": "198.51.100.10/32", "held": False}], "vip_error": None,
        "peer": None, "config_digest": "00", "rejected_heartbeats": {},
        "socket_errors": {"send": 0, "receive": 0}, "fence": "shut", "group": None,
        "movers": [], "heartbeat_filtered": None,
        "damping": {"enabled": True, "damped": False, "remaining_seconds": None,
                    "failures": 0, "failures_to_damp": 1, "window_seconds": 600.0,
                    "hold_down_seconds": 30.0, "last_failure": None,
                    "last_failure_seconds_ago": None},
        "keys": {"loaded": [1, 2], "signing": 1, "peer_signing": None, "peer_newest": None}}
    if arbiter is not None:
        doc["arbiter"] = arbiter
    return doc


def test_status_shows_why_a_takeover_waits_for_votes() -> None:
    arbiter = {
        "kind": "witness", "lease_seconds": 0.32, "voters": 3, "majority": 2,
        "votes": [{"voter": "vm-b", "kind": "self", "remaining_seconds": 0.3,
                   "age_seconds": 0.01}],
        "majority_remaining_seconds": None, "vote_for": "vm-b",
        "campaign": "peer vm-a silent for 2501 ms",
        "witnesses": [{"address": "198.51.100.3:5406", "reachable": False,
                       "last_reply_seconds_ago": 4.2, "verdict": "held"}]}
    doc = status_doc(arbiter)
    assert Status.from_json(doc).to_json() == doc
    text = render_status(doc)
    assert "votes held: vm-b (self, 300 ms left)" in text
    assert "witness 198.51.100.3:5406: UNREACHABLE, last reply 4200 ms ago (held)" in text
    assert "waiting for votes to take over: peer vm-a silent for 2501 ms" in text
    assert "kernel gate shut" in text


def test_an_older_status_without_arbiter_reads_as_none() -> None:
    s = Status.from_json(status_doc(None))
    assert s.arbiter == NO_ARBITER
    assert "arbiter: none (a partition of the heartbeat path makes both nodes active)" in \
        render_status(status_doc(None))


def test_check_config_with_an_arbiter_says_what_to_install_without_nftables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from vipd import fence
    from vipd.cli import main
    from vipd.keys import generate_key_line

    key = tmp_path / "web.key"
    key.write_text(generate_key_line(1) + "\n")
    key.chmod(0o600)
    data = copy.deepcopy(BASE)
    data["auth"] = {"key_file": str(key)}
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", str(path)]) == 0  # libnftables1 is installed here
    assert "arbiter witness 198.51.100.3:5406 (vote lease 320ms), fence kernel" in \
        capsys.readouterr().out
    monkeypatch.setattr(fence, "LIBRARY", "libnftables-missing.so.1")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: fence: cannot load libnftables-missing.so.1" in err
    assert "apt-get install libnftables1 nftables" in err
