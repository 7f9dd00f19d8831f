"""The pure parts of the fault campaign (simulations.faults), the heartbeat forwarder
(simulations.netfaults) and the soak (simulations.soak): what counts as nobody
answering, when one holder is reached, what "Done when" demands per row, which frames
the forwarder takes and how it re-sends them, the slopes of the soak."""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from simulations import faults, netfaults, soak
from simulations.faultinject import FAULTS

ROUNDS = [(0.00, 0.01, {"m1"}), (0.01, 0.02, set()), (0.02, 0.03, set()),
          (0.03, 0.04, {"m1"}), (0.04, 0.05, set()), (0.05, 0.06, set()),
          (0.06, 0.07, set()), (0.07, 0.08, set())]


def test_longest_nobody_counts_from_the_first_silent_round_to_the_next_answer() -> None:
    assert faults.longest_nobody(ROUNDS[:4], []) == pytest.approx(0.02)
    # a run still open at the end lasts to the end of the last round
    assert faults.longest_nobody(ROUNDS, []) == pytest.approx(0.04)


def test_longest_nobody_excuses_rounds_while_no_node_could_serve() -> None:
    # both daemons down from 0.045 to 0.065: the rounds touching that span break the run
    assert faults.longest_nobody(ROUNDS, [(0.045, 0.065)]) == pytest.approx(0.02)
    assert faults.longest_nobody([], []) == 0.0


def test_single_holder_is_measured_from_the_end_of_the_fault() -> None:
    one, both, none = frozenset({"node1"}), frozenset({"node1", "node2"}), frozenset()
    assert faults.single_holder_since([(0.0, one)], 5.0) == 0.0
    assert faults.single_holder_since([(0.0, one), (5.5, both), (6.25, one)], 5.0) == 1.25
    assert faults.single_holder_since([(0.0, one), (5.5, both)], 5.0) is None
    assert faults.single_holder_since([(0.0, one), (5.5, none)], 5.0) is None


def _detail(two_macs: float = 0.0, moves: int = 0, single: float | None = 0.0
            ) -> dict[str, object]:
    return {"two_macs_ms": two_macs, "moves": moves, "single_holder_ms": single,
            "final_holders": ["node1"] if single is not None else ["node1", "node2"]}


def test_done_when_follows_the_issue_per_row() -> None:
    # quiet rows: no two MACs, no move
    assert faults.unmet("delay", _detail(), witness=False) == ""
    assert "two MACs" in faults.unmet("delay", _detail(two_macs=10), witness=False)
    assert "1 moves" in faults.unmet("key-rotation", _detail(moves=1), witness=False)
    # flapping and the crash loop: at most two moves
    assert faults.unmet("health-flap", _detail(moves=2), witness=False) == ""
    assert "at most 2" in faults.unmet("crash-loop-active", _detail(moves=3), witness=False)
    # rows the issue says nothing about without an arbiter
    assert faults.unmet("partition-2s", _detail(two_macs=1700, moves=1), witness=False) == ""
    assert not faults.checked("partition-2s", witness=False)
    # with a witness every row: no two MACs, moves are fine
    assert "two MACs" in faults.unmet("partition-2s", _detail(two_macs=10), witness=True)
    assert faults.unmet("pause-active-5s", _detail(moves=2), witness=True) == ""
    # every row: one holder at the end
    assert "at the end" in faults.unmet("loss-5", _detail(single=None), witness=False)


def test_every_fault_is_known_to_the_command_line() -> None:
    assert faults.parse_faults(None) == list(FAULTS)
    assert faults.parse_faults(" delay,loss-5 ") == ["delay", "loss-5"]
    with pytest.raises(ValueError, match="no-such-fault"):
        faults.parse_faults("delay,no-such-fault")


def _udp_frame(dport: int, checksum: int = 0xBEEF, proto: int = 17) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + 8, 1, 0, 64, proto, 0,
                     socket.inet_aton("198.51.100.1"), socket.inet_aton("198.51.100.2"))
    udp = struct.pack("!HHHH", 5405, dport, 16, checksum) + b"12345678"
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def test_the_forwarder_takes_heartbeats_only_and_zeroes_their_checksum() -> None:
    frame = _udp_frame(netfaults.HEARTBEAT_PORT)
    assert netfaults.heartbeat(frame, netfaults.HEARTBEAT_PORT)
    assert not netfaults.heartbeat(_udp_frame(7000), netfaults.HEARTBEAT_PORT)
    assert not netfaults.heartbeat(_udp_frame(5405, proto=6), netfaults.HEARTBEAT_PORT)
    zeroed = netfaults.zero_udp_checksum(frame)
    assert zeroed[14 + 20 + 6:14 + 20 + 8] == b"\0\0"
    assert zeroed[:40] == frame[:40] and zeroed[42:] == frame[42:]
    # classic BPF: 11 instructions of 8 bytes, the port in the compare
    program = netfaults._udp_port_filter(5405)
    assert len(program) == 11 * 8
    assert struct.unpack_from("HBBI", program, 8 * 8)[3] == 5405


def test_forwarder_schedules_per_mode() -> None:
    rng = random.Random(5)
    delays = [netfaults.schedule("delay", rng)[0] for _ in range(500)]
    assert min(delays) >= 0.1 and max(delays) <= 0.3
    reordered = [netfaults.schedule("reorder", rng) for _ in range(1000)]
    held = sum(1 for d in reordered if d == [0.06])
    assert 150 < held < 350 and all(d in ([0.0], [0.06]) for d in reordered)
    copies = [len(netfaults.schedule("duplicate", rng)) for _ in range(1000)]
    assert 400 < copies.count(2) < 600 and set(copies) == {1, 2}
    with pytest.raises(ValueError, match="unknown forwarder mode"):
        netfaults.schedule("corrupt", rng)


def test_soak_slopes_are_least_squares_per_minute() -> None:
    assert soak.slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert soak.slope([(0, 1)]) is None
    assert soak.slope([(1, 1), (1, 2)]) is None
    # 60 KB more every minute, fds flat; the second half is fitted alone
    rows = [(t * 10.0, 50_000 + t * 10, 9) for t in range(13)]
    got = soak.trend(rows)
    assert got["rss_kb_per_min"] == pytest.approx(60.0)
    assert got["rss_kb_per_min_second_half"] == pytest.approx(60.0)
    assert got["fds_per_min"] == 0.0
    assert got["rss_kb"] == {"first": 50_000, "last": 50_120, "max": 50_120}
    assert got["anon_kb_per_min"] is None  # samples without the split
    # the split: the heap flat, the file-backed pages growing 60 KB a minute
    split = [(t * 10.0, 50_000 + t * 10, 9, 30_000, 20_000 + t * 10) for t in range(13)]
    got = soak.trend(split)
    assert got["anon_kb_per_min"] == 0.0
    assert got["file_kb_per_min"] == pytest.approx(60.0)


def test_soak_reads_the_anonymous_and_file_backed_parts_of_a_live_process() -> None:
    rss, fds, anon, file = soak.proc_sample(os.getpid())
    assert fds > 0 and anon > 0 and file > 0
    assert abs(rss - (anon + file)) < 0.2 * rss  # plus shared memory, if any


def test_soak_rejections_keep_the_nonzero_reasons() -> None:
    text = ('# TYPE vipd_heartbeats_rejected_total counter\n'
            'vipd_heartbeats_rejected_total{reason="replay"} 3.0\n'
            'vipd_heartbeats_rejected_total{reason="stale"} 0.0\n')
    assert soak.rejections(text) == {"replay": 3.0}
