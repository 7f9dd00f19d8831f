"""simulations/bench_flood.py without a lab: the spoofed packets are valid IPv4/UDP to the
heartbeat port from 203.0.113.0/24 only, and the summary keeps median and spread."""

from __future__ import annotations

import socket
import struct

from simulations.bench_flood import spoofed_packets, summary


def test_spoofed_packets_come_from_the_documentation_range_only() -> None:
    packets = spoofed_packets("198.51.100.1", 5405, b"x" * 100)
    assert len(packets) == 254
    sources = set()
    for p in packets:
        ver_ihl, _, total, _, _, ttl, proto, _, src, dst = struct.unpack("!BBHHHBBH4s4s",
                                                                         p[:20])
        _, dport, length, _ = struct.unpack("!HHHH", p[20:28])
        assert (ver_ihl, total, proto, dport, length) == (0x45, len(p), 17, 5405, 108)
        assert socket.inet_ntoa(dst) == "198.51.100.1" and ttl == 64
        sources.add(socket.inet_ntoa(src))
    assert sources == {f"203.0.113.{i}" for i in range(1, 255)}


def test_summary_gives_median_and_spread_per_setting() -> None:
    def row(setting: str, cpu: float, moved: bool = False) -> dict[str, object]:
        return {"filter": setting, "flood_cpu_s": cpu, "transitions": int(moved),
                "holders_after": ["node1"]}
    stats = summary([row("off", 1.0), row("off", 3.0), row("off", 2.0, moved=True),
                     row("on", 0.1)])
    assert stats["off"]["flood_cpu_s"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert (stats["off"]["trials"], stats["off"]["moved"]) == (3, 1)
    assert stats["on"]["flood_cpu_s"]["median"] == 0.1 and stats["on"]["sent_per_s"] is None
