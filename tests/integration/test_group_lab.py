"""A group on etcd on the real kernel (issue 13): three vipd nodes sharing one VIP, a
3-member etcd on three more hosts, the client. The oracle is the client's ARP prober
(simulations.arpwatch: every MAC that answers for the VIP every 10 ms, the three nodes'
kernel gates every 2 ms); "never two MACs" is checked over every probe round.

Bounds are generous multiples of the TTL (1 s; etcd here runs with a 500 ms election
timeout, so it grants 1 s): the benchmark (`bench_failover --arbiter etcd`) measures."""

from __future__ import annotations

import time
from typing import Any

import pytest

from simulations.bench_group import etcd_leader
from simulations.splitbrain import metric_values
from support.etcd import require_etcd
from support.pairlab_checks import expect, logs, oracle, status_section, stays, two_mac_rounds
from vipd.demo.pairlab import PairLab
from vipd.vipctl import render_status

pytestmark = [pytest.mark.netns, pytest.mark.pair(arbiter="etcd", api=True, ipv6=False)]

TTL = 1.0


@pytest.fixture(autouse=True)
def _etcd_installed() -> None:
    require_etcd()


def group(pair: PairLab, node: str) -> dict[str, Any]:
    return status_section(pair, node, "group")


def start_group(pair: PairLab) -> None:
    """etcd, then node1 (it claims), then node2 and node3; returns with node1 the only
    holder and the others STANDBY members that see it."""
    assert pair.start_settled() == "node1", logs(pair)
    expect(pair, lambda: all(group(pair, n)["holder"] == "node1"
                             and len(group(pair, n)["members"]) == 3 for n in pair.nodes),
           5.0, "every node to see node1 holding and three members")
    assert pair.holders() == ["node1"], logs(pair)


def test_three_nodes_agree_on_one_holder_and_report_the_group(pair: PairLab) -> None:
    start_group(pair)
    doc = pair.status("node1")
    g = doc["group"]
    assert doc["state"] == "ACTIVE" and doc["fence"] == "open" and doc["peer"] is None
    assert g["etcd"] == "ok" and g["granted_ttl_seconds"] == TTL
    assert doc["term"] == g["holder_term"] > 0
    assert 0 < g["lease_remaining_seconds"] <= TTL
    assert {m["node"]: (m["state"], m["priority"], m["settings_match"])
            for m in g["members"]} == {"node1": ("ACTIVE", 150, True),
                                       "node2": ("STANDBY", 120, True),
                                       "node3": ("STANDBY", 100, True)}
    expect(pair, lambda: not any(m["starting"] for m in group(pair, "node1")["members"]),
           3 * TTL, "every member's start wait (one TTL) to be over")
    for node in ("node2", "node3"):
        other = pair.status(node)
        assert other["state"] == "STANDBY" and other["fence"] == "shut"
        assert other["pair_term"] == doc["term"]
    text = render_status(doc)
    assert "holder: node1 (term" in text and "node3" in text and "etcd 198.51.100.5:2379" in text
    values = metric_values(pair.metrics("node1"))
    assert values[("vipd_etcd_state", "state=ok")] == 1
    assert values[("vipd_group_members", "")] == 3
    assert values[("vipd_group_holder_term", "")] == doc["term"]
    assert values[("vipd_arbiter_info", "kind=etcd")] == 1


def test_a_killed_holder_is_replaced_by_the_next_in_priority_never_two_answering(
        pair: PairLab) -> None:
    start_group(pair)
    term = pair.status("node1")["term"]
    with oracle(pair) as seen:
        start = time.time()
        pair.kill("node1")
        killed = time.time()
        expect(pair, lambda: "node2" in pair.holders(), 4 * TTL,
               "node2 (priority 120) to take the VIP")
        took = time.time() - killed
        time.sleep(0.5)
        end = time.time()
    obs = seen[0]
    assert took < 4 * TTL
    assert two_mac_rounds(obs, start, end) == [], logs(pair)
    assert obs.gates_open_together_known(start, end) == [], obs.sampler_gaps(start, end, 0.02)
    assert obs.gate_open("node3", start, end) == []
    status = pair.status("node2")
    assert status["state"] == "ACTIVE" and status["term"] > term
    assert "the holder key of node1 is gone" in "\n".join(pair.log_lines("node2"))


def test_stop_and_switchover_hand_over_to_the_named_member(pair: PairLab) -> None:
    start_group(pair)
    with oracle(pair) as seen:
        start = time.time()
        pair.stop("node1")
        expect(pair, lambda: pair.holders() == ["node2"], TTL,
               "node2 to hold after node1's graceful stop, well within a TTL")
        assert "node1 handed over to us" in "\n".join(pair.log_lines("node2"))
        assert pair.switchover("node2", to="node3") == 200
        expect(pair, lambda: pair.holders() == ["node3"], TTL,
               "node3 to hold after the switchover to it")
        assert pair.switchover("node3", to="node1") == 409  # stopped: not a member
        stays(pair, ["node3"], 0.3)
        end = time.time()
    obs = seen[0]
    assert two_mac_rounds(obs, start, end) == [], logs(pair)
    assert obs.gates_open_together_known(start, end) == [], obs.sampler_gaps(start, end, 0.02)
    assert group(pair, "node3")["holder"] == "node3"
    assert "node1" not in {m["node"] for m in group(pair, "node3")["members"]}  # revoked


def test_an_etcd_leader_kill_moves_nothing(pair: PairLab) -> None:
    start_group(pair)
    term = pair.status("node1")["term"]
    leader = etcd_leader(pair)
    assert pair.etcd is not None
    pair.etcd.kill(leader)
    # a new etcd leader within about an election timeout; node1 may shut its gate (and
    # drop the VIP) for a moment if that takes longer than its lease allows, but it keeps
    # the key: nobody else ever holds the VIP
    end = time.monotonic() + 3 * TTL
    while time.monotonic() < end:
        assert set(pair.holders()) <= {"node1"}, logs(pair)
        time.sleep(0.02)
    expect(pair, lambda: pair.status("node1")["state"] == "ACTIVE", 2 * TTL,
           "node1 ACTIVE after etcd's leader change")
    assert pair.status("node1")["term"] == term
    for node in ("node2", "node3"):
        assert "-> ACTIVE" not in "\n".join(pair.log_lines(node)), logs(pair)
    pair.etcd.restart(leader)


def test_a_holder_cut_off_from_etcd_fences_itself_before_another_takes_over(
        pair: PairLab) -> None:
    start_group(pair)
    with oracle(pair) as seen:
        start = time.time()
        for other in (*pair.etcd_hosts, "node2", "node3"):
            pair.block("node1", other)  # the client still reaches node1
        cut = time.time()
        expect(pair, lambda: "node2" in pair.holders(), 4 * TTL, "node2 to take over")
        time.sleep(0.5)
        end = time.time()
    obs = seen[0]
    assert two_mac_rounds(obs, start, end) == [], logs(pair)
    assert obs.gates_open_together_known(start, end) == [], obs.sampler_gaps(start, end, 0.02)
    node1_open = obs.gate_open("node1", start, end)
    assert node1_open and node1_open[-1][1] - cut < 1.5 * TTL, node1_open
    assert "self-fence: etcd lease" in "\n".join(pair.log_lines("node1"))
    pair.heal()
    expect(pair, lambda: group(pair, "node1")["holder"] == "node2", 3 * TTL,
           "node1 to see node2 holding once it reaches etcd again")
    stays(pair, ["node2"], 0.5)
