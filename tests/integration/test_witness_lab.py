"""Lease votes on the real kernel (issue 12, part 6): two nodes, a witness host running
`vipd witness`, a client, partitions cut at the switch. The oracle is the client's ARP
prober (simulations.arpwatch: every MAC that answers for the VIP, every 10 ms) with each
node's kernel gate sampled every 2 ms; "never two MACs" is checked over every probe round
of the fault's window."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from simulations.arpwatch import Observations
from simulations.splitbrain import metric_values
from support.pairlab_checks import (
    expect,
    logs,
    oracle,
    start_pair,
    status_section,
    stays,
    two_mac_rounds,
)
from vipd.config import load_config
from vipd.demo.pairlab import PairLab, outage

pytestmark = [pytest.mark.netns, pytest.mark.pair(arbiter="witness", api=True)]

OBSERVE = 0.5  # s the oracle keeps watching once the outcome is reached
GATE_SLACK = 0.02  # s: nftables timeouts count in jiffies (4 ms at HZ=250), and margin


def dead_interval(pair: PairLab) -> float:
    return load_config(pair.nodes["node1"].config).heartbeat.dead_interval


def replies_from(pair: PairLab, obs: Observations, node: str, since: float) -> list[float]:
    mac = pair.host(node).mac
    return [t for t, m in obs.replies if m == mac and t >= since]


def arbiter(pair: PairLab, node: str) -> dict[str, Any]:
    return status_section(pair, node, "arbiter")


def test_a_killed_active_is_replaced_within_the_dead_interval_without_overlap(
        pair: PairLab) -> None:
    start_pair(pair)
    dead = dead_interval(pair)
    with oracle(pair) as seen:
        start = time.time()
        pair.kill("node1")
        killed = time.time()
        expect(pair, lambda: "node2" in pair.holders(), 3 * dead,
               "node2 to take the VIP within three dead intervals")
        took = time.time() - killed
        time.sleep(OBSERVE)  # the oracle's window after the takeover
        # still within its 3 s lifetime: what stopped node1 answering was its gate
        assert "node1" in pair.holders(), logs(pair)
        end = time.time()
    obs = seen[0]
    assert took < 3 * dead
    assert two_mac_rounds(obs, start, end) == [], logs(pair)
    # its gate shuts when the votes it counted run out: within L (= the dead interval) of
    # its last renewal, plus the set timeout's jiffy (GATE_SLACK)
    late = [round(t - killed, 3)
            for t in replies_from(pair, obs, "node1", killed + dead + GATE_SLACK)]
    assert late == [], f"node1's kernel answered ARP after its votes ran out: {late}"
    last_rounds = obs.rounds(end - 0.2, end)
    assert last_rounds and all(macs == {pair.host("node2").mac} for *_, macs in last_rounds)
    assert obs.gates_open_together_known(start, end) == [], obs.sampler_gaps(start, end, 0.02)


def test_a_pair_partition_with_the_witness_reachable_moves_nothing(pair: PairLab) -> None:
    start_pair(pair)
    dead = dead_interval(pair)
    with oracle(pair) as seen:
        start = time.time()
        pair.block("node1", "node2")
        # node2 hears node1 no more and campaigns; the witness keeps voting for node1
        expect(pair, lambda: arbiter(pair, "node2")["campaign"] is not None, 3 * dead,
               "node2 to notice the partition and ask for votes")
        stays(pair, ["node1"], 4 * dead)
        status = pair.status("node2")
        assert status["state"] == "STANDBY" and status["fence"] == "shut", status
        assert [w["verdict"] for w in status["arbiter"]["witnesses"]] == ["held"], status
        assert pair.status("node1")["state"] == "ACTIVE"
        pair.heal()
        expect(pair, lambda: arbiter(pair, "node2")["campaign"] is None, 3 * dead,
               "node2 to hear node1 again and stop campaigning")
        end = time.time()
    obs = seen[0]
    assert two_mac_rounds(obs, start, end) == []
    assert replies_from(pair, obs, "node2", start) == []
    assert obs.gate_open("node2", start, end) == []
    # one open span to the end: never shut. It may begin a few ms after `start`: the
    # gate samplers' first read can come after the oracle says it is ready.
    spans = obs.gate_open("node1", start, end)
    assert len(spans) == 1 and spans[0][1] == end and spans[0][0] - start < 0.05, \
        f"node1's gate flickered: {spans} in [{start}, {end}]"


def test_an_isolated_active_fences_itself_and_the_standby_takes_over(pair: PairLab) -> None:
    start_pair(pair)
    dead = dead_interval(pair)
    with oracle(pair) as seen:
        start = time.time()
        pair.block("node1", "node2")
        pair.block("node1", "witness")  # the client still reaches node1
        expect(pair, lambda: pair.holders() == ["node2"], 3 * dead,
               "node2 alone to hold the VIP")
        taken = time.time()
        status = pair.status("node1")
        assert status["state"] == "STANDBY" and status["fence"] == "shut", status
        metrics = metric_values(pair.metrics("node1"))
        assert metrics[("vipd_self_fence_total", "reason=votes_lost")] == 1
        assert metrics[("vipd_transitions_total",
                        "from_state=ACTIVE,reason=no_quorum,to_state=STANDBY")] == 1
        time.sleep(OBSERVE)  # the oracle's window: node1 reachable, node2 holding
        pair.heal()
        end = time.time()
    obs = seen[0]
    assert any("ACTIVE -> STANDBY (self-fence" in line for line in pair.log_lines("node1")), \
        logs(pair)
    assert two_mac_rounds(obs, start, end) == []
    assert obs.gates_open_together_known(start, end) == [], obs.sampler_gaps(start, end, 0.02)
    closed = obs.gate_open("node1", start, end)
    assert closed and closed[-1][1] < taken, f"node1's gate: {closed}"
    assert replies_from(pair, obs, "node1", taken) == []
    assert replies_from(pair, obs, "node2", taken), "node2 does not answer ARP"


def test_with_the_witness_stopped_a_dead_active_is_not_replaced_and_the_standby_says_why(
        pair: PairLab) -> None:
    start_pair(pair)
    dead = dead_interval(pair)
    assert pair.stop_witness() == 0
    expect(pair, lambda: not arbiter(pair, "node2")["witnesses"][0]["reachable"], 5.0,
           "node2 to see the witness unreachable")
    assert pair.holders() == ["node1"], "losing the witness alone moved the VIP"
    pair.kill("node1")
    expect(pair, lambda: "node1" in (arbiter(pair, "node2")["campaign"] or ""), 3 * dead,
           "node2 to notice node1 is dead and ask for votes")
    # it must not take the VIP: one vote (its own) of the two it needs
    deadline = time.monotonic() + 4 * dead
    while time.monotonic() < deadline:
        assert "node2" not in pair.holders(), logs(pair)
        time.sleep(0.02)
    status = pair.status("node2")
    assert status["state"] == "STANDBY" and status["fence"] == "shut", status
    assert [v["voter"] for v in status["arbiter"]["votes"]] == ["node2"], status
    assert status["arbiter"]["majority"] == 2
    metrics = metric_values(pair.metrics("node2"))
    assert metrics[("vipd_votes_held", "")] == 1
    assert metrics[("vipd_votes_needed", "")] == 2
    assert metrics[("vipd_arbiter_reachable", f"witness={pair.witness_address}")] == 0


def test_a_switchover_with_a_witness_takes_well_under_a_dead_interval(pair: PairLab) -> None:
    start_pair(pair)
    dead = dead_interval(pair)
    pair.start_probe()
    with oracle(pair) as seen:
        start = time.time()
        assert pair.switchover("node1") == 200
        expect(pair, lambda: pair.holders() == ["node2"], dead, "node2 alone to hold the VIP")
        time.sleep(OBSERVE)  # answered requests after the move, and the oracle's window
        end = time.time()
    samples = pair.stop_probe()
    gap, who = outage(samples, start)
    assert who == "node2"
    assert gap < dead / 4, f"the client went {gap * 1000:.0f} ms without an answer"
    assert two_mac_rounds(seen[0], start, end) == []
    assert seen[0].gates_open_together_known(start, end) == [], \
        seen[0].sampler_gaps(start, end, 0.02)


def _udp_arrives(pair: PairLab, src: str, dst: str) -> bool:
    """One datagram from host ``src`` to host ``dst``'s address: did it arrive?"""
    address = str(pair.host(dst).ipv4.ip)

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, 9999))
        sock.settimeout(0.3)
        return sock

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"lab", (address, 9999))

    receiver = pair.host(dst).run(listen)
    try:
        pair.host(src).run(send)
        receiver.recv(16)
    except TimeoutError:
        return False
    finally:
        receiver.close()
    return True


def test_block_cuts_one_or_both_directions_at_the_switch_and_heal_mends(
        pair: PairLab) -> None:
    def links() -> dict[str, bool]:
        return {f"{a}>{b}": _udp_arrives(pair, a, b) for a, b in (
            ("node1", "node2"), ("node2", "node1"), ("node1", "witness"),
            ("node1", "client"))}

    everything = {"node1>node2": True, "node2>node1": True, "node1>witness": True,
                  "node1>client": True}
    assert links() == everything
    pair.block("node1", "node2", oneway=True)
    assert links() == {**everything, "node1>node2": False}
    pair.block("node1", "witness")
    assert pair.lab.blocked() == [("node1", "node2"), ("node1", "witness"),
                                  ("witness", "node1")]
    assert links() == {**everything, "node1>node2": False, "node1>witness": False}
    pair.heal()
    assert pair.lab.blocked() == []
    assert links() == everything
