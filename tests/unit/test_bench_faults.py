"""The disturbance benchmark's definitions (simulations.arpwatch, simulations.disturb) on
hand-made observations: what counts as dual-active, a move, a resolution, a late GARP."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

import pytest

from simulations import arpwatch, disturb, splitbrain
from simulations.arpwatch import Observations

M1, M2 = "02:76:64:00:00:01", "02:76:64:00:00:02"
MACS = {M1: "node1", M2: "node2"}
VIP = "198.51.100.100"


def _arp(op: int, sender_mac: str, sender_ip: str, target_ip: str) -> bytes:
    mac = bytes.fromhex(sender_mac.replace(":", ""))
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac, socket.inet_aton(sender_ip),
                      b"\0" * 6, socket.inet_aton(target_ip))
    return b"\xff" * 6 + mac + b"\x08\x06" + arp


def test_classify_tells_garps_from_replies_to_the_prober_and_ignores_the_rest() -> None:
    vip = socket.inet_aton(VIP)
    assert arpwatch.classify(_arp(1, M2, VIP, VIP), vip) == ("garp", M2)
    assert arpwatch.classify(_arp(2, M1, VIP, arpwatch.PROBER_IP), vip) == ("reply", M1)
    # the client's own ARP and the replies to it are not the oracle's
    assert arpwatch.classify(_arp(1, "02:76:64:00:00:03", "198.51.100.3", VIP), vip) is None
    assert arpwatch.classify(_arp(2, M1, VIP, "198.51.100.3"), vip) is None
    assert arpwatch.classify(b"\0" * 20, vip) is None


def _addr_message(kind: int, address: str) -> bytes:
    attr = struct.pack("=HH", 8, arpwatch.IFA_LOCAL) + socket.inet_aton(address)
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 2) + attr
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_address_events_follow_the_vip_only() -> None:
    data = (_addr_message(arpwatch.RTM_NEWADDR, VIP)
            + _addr_message(arpwatch.RTM_NEWADDR, "198.51.100.1")
            + _addr_message(arpwatch.RTM_DELADDR, VIP))
    assert arpwatch.address_events(data, socket.inet_aton(VIP)) == [True, False]


def _obs(rounds: list[tuple[float, set[str]]], garps: Sequence[tuple[float, str]] = (),
         addr: Sequence[tuple[float, str, bool]] = ()) -> Observations:
    """Probes at the given times, each answered 1 ms later by the given MACs."""
    return Observations(probes=[t for t, _ in rounds],
                        replies=sorted((t + 0.001, mac) for t, macs in rounds for mac in macs),
                        garps=list(garps), addr=list(addr))


def test_dual_active_is_the_length_of_the_rounds_answered_by_two_macs() -> None:
    obs = _obs([(0.00, {M1}), (0.01, {M1, M2}), (0.02, {M1, M2}), (0.03, {M2}),
                (0.04, {M2})])
    rounds = obs.rounds(0.0, 0.05)
    dual = [nxt - t for t, nxt, seen in rounds if len(seen) == 2]
    assert sum(dual) == pytest.approx(0.02)
    (episode,) = obs.dual_episodes(0.0, 0.05)
    assert (episode.start, episode.end, episode.winner) == (0.01, 0.03, M2)
    assert episode.resolved_at == pytest.approx(0.021)  # node1's last reply


def test_a_late_reply_counts_in_the_round_it_arrives_in() -> None:
    obs = Observations(probes=[0.0, 0.01], replies=[(0.001, M1), (0.012, M2)])
    assert [seen for *_, seen in obs.rounds(0.0, 0.02)] == [{M1}, {M2}]


def test_the_winners_garp_is_timed_from_the_losers_last_reply() -> None:
    obs = _obs([(0.00, {M1, M2}), (0.01, {M1}), (0.02, {M1})],
               garps=[(0.0005, M1), (0.030, M2), (0.045, M1)])
    (episode,) = obs.dual_episodes(0.0, 0.03)
    assert episode.winner == M1
    w = disturb.Window(0.0, 0.0, 0.0, 0.05)
    detail = disturb.measure(obs, [], w, MACS)
    # node1's GARP while node2 still answers does not count; the one 44 ms after node2's
    # last reply (at 1 ms) does
    assert detail["garp_after_resolution_ms"] == [44.0]
    assert detail["garps_after_fault"] == {"node1": 2, "node2": 1}


def test_no_garp_is_owed_when_the_winners_was_already_the_last() -> None:
    """A frozen node's kernel answers ARP until its lease runs out, but it announced
    nothing: the client follows the winner's takeover GARP all along."""
    obs = _obs([(0.00, {M1}), (0.01, {M1, M2}), (0.02, {M1, M2}), (0.03, {M2})],
               garps=[(0.011, M2), (0.111, M2)])
    detail = disturb.measure(obs, [], disturb.Window(0.0, 0.0, 0.0, 0.05), MACS)
    assert detail["garp_after_resolution_ms"] == [0.0]
    obs.garps.append((0.025, M1))  # ... unless the loser announced after the winner
    obs.garps.sort()
    detail = disturb.measure(obs, [], disturb.Window(0.0, 0.0, 0.0, 0.2), MACS)
    assert detail["garp_after_resolution_ms"] == [pytest.approx(90.0, abs=1)]


def test_an_episode_still_open_at_the_end_has_no_winner() -> None:
    obs = _obs([(0.00, {M1}), (0.01, {M1, M2})])
    (episode,) = obs.dual_episodes(0.0, 0.02)
    assert episode.winner is None and episode.resolved_at is None


def test_holders_start_with_the_state_at_the_window_and_skip_renewals() -> None:
    obs = Observations(addr=[(0.0, "node1", True), (0.5, "node1", True), (1.0, "node2", True),
                             (1.1, "node1", False), (3.0, "node1", True)])
    points = obs.holders(0.2, 2.0)
    assert points == [(0.2, {"node1"}), (1.0, {"node1", "node2"}), (1.1, {"node2"})]
    assert disturb.time_where(points, 0.2, 2.0, lambda s: len(s) > 1) == pytest.approx(0.1)
    assert disturb.moves(points) == 1
    assert Observations().holders(0.0, 1.0) == [(0.0, frozenset())]


@pytest.mark.parametrize(("sets", "moves"), [
    ([{"node1"}, {"node1", "node2"}, {"node1"}], 0),
    ([{"node1"}, set(), {"node2"}], 1),
    ([{"node1"}, {"node2"}, {"node1", "node2"}, {"node1"}], 2),
])
def test_a_move_is_a_change_of_the_sole_holder(sets: list[set[str]], moves: int) -> None:
    points = [(float(i), frozenset(s)) for i, s in enumerate(sets)]
    assert disturb.moves(points) == moves


def test_longest_unanswered_reports_a_run_open_at_the_end_as_a_lower_bound() -> None:
    samples: list[tuple[float, str | None]] = [
        (0.0, None), (1.0, "node1"), (2.0, None), (2.5, None), (3.0, "node2"), (4.0, None),
        (4.2, None)]
    assert disturb.longest_unanswered(samples, 0.5) == (pytest.approx(1.0), True)
    assert disturb.longest_unanswered(samples[:5], 0.5) == (pytest.approx(1.0), False)
    assert disturb.longest_unanswered(samples[:2], 0.5) == (0.0, False)


def test_tracebacks_yield_the_exception_lines() -> None:
    lines = ["2026 INFO node1 ok", "Traceback (most recent call last):",
             '  File "x.py", line 1, in <module>', "    boom()", "ValueError: boom",
             "2026 INFO node1 later"]
    assert disturb.tracebacks(lines) == ["ValueError: boom"]


def test_the_baseline_must_show_node1_alone() -> None:
    obs = _obs([(i / 100, {M1}) for i in range(20)], addr=[(-1.0, "node1", True)])
    assert disturb._implausible(obs, disturb.Window(0.0, 0.2, 0.2, 0.3), MACS) == ""
    silent = _obs([(i / 100, set()) for i in range(20)], addr=[(-1.0, "node1", True)])
    assert "probe rounds" in disturb._implausible(silent, disturb.Window(0.0, 0.2, 0.2, 0.3),
                                                  MACS)


LISTING = ("table arp vipd_lab {\n\tset lease4 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n"
           "\t\telements = { 198.51.100.7 timeout 1s expires 800ms, 198.51.100.100 timeout "
           "320ms expires 1s290ms }\n\t}\n}\n")


def test_gate_remaining_reads_the_vips_element_from_a_listing() -> None:
    assert arpwatch.gate_remaining(LISTING, VIP) == pytest.approx(1.29)
    assert arpwatch.gate_remaining(LISTING, "198.51.100.10") == 0.0  # 198.51.100.100 != .10
    shut = "table arp vipd_lab {\n\tset lease4 {\n\t\ttype ipv4_addr\n\t\tflags timeout\n\t}\n}\n"
    assert arpwatch.gate_remaining(shut, VIP) == 0.0
    assert arpwatch.gate_remaining("elements = { 198.51.100.100 }", VIP) == float("inf")


@pytest.mark.parametrize(("text", "seconds"), [
    ("290ms", 0.29), ("1s200ms", 1.2), ("2m3s", 123.0), ("1h", 3600.0), ("0ms", 0.0)])
def test_nft_durations(text: str, seconds: float) -> None:
    assert arpwatch.nft_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "12", "1x", "ms", "1s 2ms"])
def test_a_malformed_nft_duration_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an nftables time"):
        arpwatch.nft_duration(text)


def test_a_gate_is_open_from_a_sample_until_the_next_or_its_expiry() -> None:
    obs = Observations(gates={"node1": [(0.0, None), (1.0, 0.3), (1.002, 0.298),
                                        (1.004, 0.0), (2.0, 0.3), (2.5, 0.3), (3.5, 0.0)]})
    # 1.000-1.004 open, then shut (flushed); 2.0 open for 0.3 s with no sample between:
    # the expiry ends it at 2.3 (not the next sample); 2.5 open until its expiry at 2.8
    assert obs.gate_open("node1", 0.0, 10.0) == [
        pytest.approx((1.0, 1.004)), (2.0, pytest.approx(2.3)), (2.5, pytest.approx(2.8))]
    assert obs.gate_open("node1", 2.1, 2.6) == [(2.1, pytest.approx(2.3)), (2.5, 2.6)]
    assert obs.gate_open("node2", 0.0, 1.0) == []


def test_gates_open_together_is_the_overlap_of_two_nodes_open_spans() -> None:
    obs = Observations(gates={
        "node1": [(0.0, 0.3), (0.2, 0.3), (0.4, 0.0)],       # open 0.0 - 0.4
        "node2": [(0.0, 0.0), (0.35, 0.3), (0.6, 0.0)],      # open 0.35 - 0.6
    })
    assert obs.gates_open_together(0.0, 1.0) == [(0.35, 0.4)]
    obs.gates["node2"] = [(0.0, 0.0), (0.4, 0.3), (0.6, 0.0)]  # opens as node1 shuts
    assert obs.gates_open_together(0.0, 1.0) == []


def test_an_overlap_inside_a_late_samplers_gap_is_unknown_not_proven() -> None:
    # node1 sampled open at 0.0 and next at 0.1 (its sampler fell behind 100 ms): when it
    # shut in between is unknown. node2, sampled on time, opened at 0.05.
    late = [(0.0, 0.3), (0.1, 0.0)] + [(0.1 + 0.002 * i, 0.0) for i in range(1, 50)]
    on_time = [(0.002 * i, 0.0 if i < 25 else 0.3) for i in range(100)]
    obs = Observations(gates={"node1": late, "node2": on_time})
    assert obs.gates_open_together(0.0, 0.2) == [(0.05, 0.1)]
    assert obs.sampler_gaps(0.0, 0.2, 0.02) == [(0.0, 0.1)]
    assert obs.gates_open_together_known(0.0, 0.2) == []
    # both on time: the same overlap is proven
    obs.gates["node1"] = [(0.002 * i, 0.3 if i <= 50 else 0.0) for i in range(100)]
    assert obs.gates_open_together_known(0.0, 0.2) == [(0.05, pytest.approx(0.102))]


def test_gate_rows_are_parsed_per_node_in_time_order() -> None:
    obs = Observations.parse(['["gate", 2.0, "node1", 0]', '["gate", 1.0, "node1", 0.25]',
                              '["gate", 1.5, "node2", null]', '["probe", 1.0]'])
    assert obs.gates == {"node1": [(1.0, 0.25), (2.0, 0)], "node2": [(1.5, None)]}
    assert obs.probes == [1.0]


METRICS_PAGE = """# TYPE vipd_votes_held gauge
vipd_votes_held 1.0
# TYPE vipd_votes_needed gauge
vipd_votes_needed 2.0
# TYPE vipd_arbiter_reachable gauge
vipd_arbiter_reachable{witness="198.51.100.4:5406"} 0.0
# TYPE vipd_self_fence_total counter
vipd_self_fence_total{reason="votes_lost"} 1.0
"""


def test_metric_values_key_samples_by_name_and_sorted_labels() -> None:
    values = splitbrain.metric_values(METRICS_PAGE)
    assert values[("vipd_votes_held", "")] == 1.0
    assert values[("vipd_arbiter_reachable", "witness=198.51.100.4:5406")] == 0.0
    assert values[("vipd_self_fence_total", "reason=votes_lost")] == 1.0


def test_why_is_the_standbys_own_account_of_a_failover_it_cannot_make() -> None:
    status = {"state": "STANDBY", "arbiter": {
        "campaign": "peer node1 silent for 1973 ms",
        "votes": [{"voter": "node2", "kind": "self", "remaining_seconds": 0.3,
                   "age_seconds": 0.01}]}}
    assert splitbrain.why(status, METRICS_PAGE) == {
        "state": "STANDBY", "campaign": "peer node1 silent for 1973 ms", "votes": ["node2"],
        "votes_held": 1.0, "votes_needed": 2.0, "arbiter_reachable": [0.0]}


def _detail(**changes: object) -> dict[str, object]:
    detail: dict[str, object] = {
        "failover_ms": 0.0, "two_macs_ms": 0, "both_gates_ms": 0, "moves": 0,
        "standby_held": False, "final_holders": ["node1"], "node1_last_reply_ms": None,
        "tracebacks": []}
    return {**detail, **changes}


def test_a_trial_with_a_witness_is_judged_against_the_promise_of_its_fault() -> None:
    assert splitbrain.unexpected("partition-pair", _detail()) == ""
    assert splitbrain.unexpected("partition-pair", _detail(moves=1, standby_held=True)) == \
        "node2 held the VIP (1 moves)"
    took = _detail(takeover_confirmed_ms=300.0, final_holders=["node2"], moves=1)
    assert splitbrain.unexpected("kill", took) == ""
    assert splitbrain.unexpected("kill", {**took, "two_macs_ms": 10.0, "both_gates_ms": 4.2}) \
        == "two MACs answered for 10 ms; both gates open for 4.2 ms"
    assert splitbrain.unexpected("isolate-active", _detail(takeover_confirmed_ms=None)) == \
        "node2 did not take over"
    assert "not [node2]" in splitbrain.unexpected(
        "pause-active-1s", {**took, "final_holders": ["node1", "node2"]})


def test_the_summary_row_shows_no_failover_and_the_stale_vip_of_kill() -> None:
    trials = [disturb.Trial("kill", 1, detail=_detail(failover_ms=290.0,
                                                      node1_last_reply_ms=230.0, moves=1)),
              disturb.Trial("kill", 2, detail=_detail(failover_ms=310.0,
                                                      node1_last_reply_ms=None, moves=1)),
              disturb.Trial("kill", 3, error="no stable pair")]
    s = splitbrain.summarize(trials)
    assert (s["n"], s["failed"], s["trials_with_move"]) == (2, 1, 2)
    assert s["failover_ms"] == {"median": 300.0, "max": 310.0}
    assert s["stale_ms"] == {"median": 115.0, "max": 230.0}  # no reply after the kill: 0
    assert splitbrain.row("kill", s) == (
        "| kill | 2 (1 failed) | 300 / 310 | 0 / 0 | 0 / 0 | 2 (1) | 115 / 230 | - | 0 |")
    none = splitbrain.summarize([disturb.Trial("witness-stop-then-kill", 1,
                                               detail=_detail(failover_ms=None, unexpected=""))])
    assert "| - / - (none in 1) |" in splitbrain.row("witness-stop-then-kill", none)
    assert "| 1 of 1 |" in splitbrain.row("witness-stop-then-kill", none)
