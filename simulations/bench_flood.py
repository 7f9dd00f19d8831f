"""What a UDP flood at the heartbeat port costs the daemon, with and without the kernel's
heartbeat filter (`fence: kernel`, vipd/fence.py).

    python -m simulations.bench_flood [--seconds 4] [--repeats 3] [--source spoofed|client]
                                      [--json]

Each trial is a fresh pair in the namespace lab (no health checks, no responders) with
`fence: none` (unfiltered) or `fence: kernel` (filtered), the two interleaved. Once node1
holds the VIP, the client host floods node1's heartbeat port 198.51.100.1:5405 for
``--seconds`` as fast as one Python process can: with ``spoofed`` (the default) from a raw
socket with source addresses cycling through 203.0.113.1-254, with ``client`` from a plain
UDP socket (the client's own address, 198.51.100.3). The payload is 100 random bytes,
about a heartbeat's size.

Measured on node1: its daemon's CPU seconds (utime + stime from /proc/PID/stat) over the
same window of quiet first and then over the flood (plus 0.2 s for a backlog to drain);
the datagrams that reached the daemon (the rise of vipd_heartbeats_rejected_total), those
the kernel dropped before the socket (vipd_heartbeat_filtered_total) and those the full
socket buffer dropped (Udp RcvbufErrors of node1's namespace); how late its election
timer fired (the heartbeats' send times); and on both nodes whether anything moved
(vipd_transitions_total, and who holds the VIP at the end). Network rule: only addresses
in the lab's own namespaces, documentation ranges only.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vipd.demo.pairlab import PORT, PairLab

TARGET = "198.51.100.1"  # node1's heartbeat address in the lab
SPOOFED_NET = "203.0.113."  # sources .1-.254 of the spoofed flood
PAYLOAD_SIZE = 100
DRAIN = 0.2  # s after the flood inside the CPU window: the daemon reads its backlog
TICKS = os.sysconf("SC_CLK_TCK")


# --- the flooder (run in the client's namespace) -----------------------------------------

def spoofed_packets(dst: str, port: int, payload: bytes) -> list[bytes]:
    """IPv4 + UDP packets from every 203.0.113.x (the kernel fills in the IP id and
    checksum of a raw IP_HDRINCL send; a UDP checksum of 0 means none, allowed in IPv4)."""
    out = []
    for i in range(1, 255):
        udp = struct.pack("!HHHH", 40000 + i, port, 8 + len(payload), 0) + payload
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64,
                             socket.IPPROTO_UDP, 0, socket.inet_aton(f"{SPOOFED_NET}{i}"),
                             socket.inet_aton(dst))
        out.append(header + udp)
    return out


def flood(dst: str, port: int, seconds: float, source: str) -> dict[str, Any]:
    """Send until ``seconds`` have passed; the counts. Waits for a line on stdin first, so
    that the caller's CPU window starts with the flood, not with Python's start-up."""
    payload = os.urandom(PAYLOAD_SIZE)
    if source == "spoofed":
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        batch = [(p, (dst, 0)) for p in spoofed_packets(dst, port, payload)]
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        batch = [(payload, (dst, port))] * 254
    print("ready", flush=True)
    sys.stdin.readline()
    sent = errors = 0
    started = time.monotonic()
    end = started + seconds
    send = sock.sendto
    while time.monotonic() < end:
        for data, address in batch:
            try:
                send(data, address)
            except OSError:  # ENOBUFS under pressure: counted, the flood goes on
                errors += 1
        sent += len(batch)
    elapsed = time.monotonic() - started
    sock.close()
    return {"sent": sent - errors, "send_errors": errors, "seconds": round(elapsed, 3)}


# --- measurements -----------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/PID/stat, after the comm)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def udp_counters(pid: int) -> dict[str, int]:
    """The Udp line of /proc/PID/net/snmp: the counters of that process's namespace."""
    lines = [line.split() for line in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
             if line.startswith("Udp:")]
    names, values = lines[0][1:], lines[1][1:]
    return {n: int(v) for n, v in zip(names, values, strict=True)}


def scrape(pair: PairLab, node: str) -> dict[str, float]:
    """The sums this benchmark needs from one /metrics of ``node``."""
    out = {"rejected": 0.0, "filtered": 0.0, "transitions": 0.0, "late_sum": 0.0,
           "late_count": 0.0}
    for family in text_string_to_metric_families(pair.metrics(node)):
        for s in family.samples:
            if s.name == "vipd_heartbeats_rejected_total":
                out["rejected"] += s.value
            elif s.name == "vipd_heartbeat_filtered_total":
                out["filtered"] = s.value
            elif s.name == "vipd_transitions_total":
                out["transitions"] += s.value
            elif s.name == "vipd_timer_lateness_seconds_sum":
                out["late_sum"] = s.value
            elif s.name == "vipd_timer_lateness_seconds_count":
                out["late_count"] = s.value
    return out


def lateness_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    count = after["late_count"] - before["late_count"]
    return round(1000 * (after["late_sum"] - before["late_sum"]) / count, 3) if count else None


def trial(workdir: Path, filtered: bool, seconds: float, source: str) -> dict[str, Any]:
    with PairLab.create(workdir, checks=False, ipv6=False,
                        fence="kernel" if filtered else "none") as pair:
        if pair.start_settled(responder=False) != "node1":
            return {"error": "the pair did not settle with node1 holding the VIP"}
        time.sleep(1.0)
        load1 = round(os.getloadavg()[0], 2)  # the machine's load as the trial began
        daemon = pair.nodes["node1"].daemon
        assert daemon is not None
        pid = daemon.pid
        flooder = pair.lab["client"].spawn(
            sys.executable, "-m", "simulations.bench_flood", "flood", TARGET, str(PORT),
            str(seconds), source, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert flooder.stdin is not None and flooder.stdout is not None
        ready, _, _ = select.select([flooder.stdout], [], [], 30)
        if not ready or flooder.stdout.readline().strip() != "ready":
            return {"error": "the flooder did not start"}
        m1 = {n: scrape(pair, n) for n in pair.nodes}
        quiet0 = cpu_seconds(pid)
        time.sleep(seconds + DRAIN)
        quiet = cpu_seconds(pid) - quiet0
        m2 = {n: scrape(pair, n) for n in pair.nodes}
        udp0, cpu0 = udp_counters(pid), cpu_seconds(pid)
        flooder.stdin.write("go\n")
        flooder.stdin.flush()
        sent = json.loads(flooder.stdout.readline())
        time.sleep(DRAIN)
        cpu = cpu_seconds(pid) - cpu0
        udp = udp_counters(pid)
        m3 = {n: scrape(pair, n) for n in pair.nodes}
        flooder.wait(10)
        window = sent["seconds"] + DRAIN
        return {
            "filter": "on" if filtered else "off", "source": source, "load1": load1, **sent,
            "sent_per_s": round(sent["sent"] / sent["seconds"]),
            "quiet_cpu_s": round(quiet, 3), "flood_cpu_s": round(cpu, 3),
            "flood_cpu_pct": round(100 * cpu / window, 1),
            "reached_daemon": int(m3["node1"]["rejected"] - m2["node1"]["rejected"]),
            "kernel_filtered": int(m3["node1"]["filtered"] - m2["node1"]["filtered"]),
            "socket_buffer_drops": udp["RcvbufErrors"] - udp0["RcvbufErrors"],
            "timer_lateness_quiet_ms": lateness_ms(m1["node1"], m2["node1"]),
            "timer_lateness_flood_ms": lateness_ms(m2["node1"], m3["node1"]),
            "transitions": int(sum(m3[n]["transitions"] - m1[n]["transitions"]
                                   for n in pair.nodes)),
            "holders_after": pair.holders(),
        }


# --- the report -------------------------------------------------------------------------

COLUMNS = ("sent_per_s", "flood_cpu_s", "flood_cpu_pct", "quiet_cpu_s", "reached_daemon",
           "kernel_filtered", "socket_buffer_drops", "timer_lateness_flood_ms")


def summary(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per filter setting: median, min and max of each column; moves and trials."""
    out: dict[str, dict[str, Any]] = {}
    for setting in ("off", "on"):
        rows = [t for t in trials if t.get("filter") == setting]
        cells: dict[str, Any] = {"trials": len(rows),
                                 "moved": sum(1 for t in rows if t["transitions"]
                                              or t["holders_after"] != ["node1"])}
        for key in COLUMNS:
            values = [t[key] for t in rows if t.get(key) is not None]
            cells[key] = ({"median": statistics.median(values), "min": min(values),
                           "max": max(values)} if values else None)
        out[setting] = cells
    return out


def table(stats: dict[str, dict[str, Any]]) -> str:
    def cell(c: dict[str, Any] | None, fmt: str = "{:g}") -> str:
        if c is None:
            return "-"
        return (f"{fmt.format(c['median'])} ({fmt.format(c['min'])}-"
                f"{fmt.format(c['max'])})")

    lines = ["| filter | trials | sent/s | daemon CPU s | % of a core | quiet CPU s | reached "
             "the daemon | dropped by the filter | socket buffer drops | timer lateness ms "
             "| moves |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, s in stats.items():
        lines.append(
            f"| {setting} | {s['trials']} | {cell(s['sent_per_s'], '{:,.0f}')} | "
            f"{cell(s['flood_cpu_s'], '{:.2f}')} | {cell(s['flood_cpu_pct'], '{:.1f}')} | "
            f"{cell(s['quiet_cpu_s'], '{:.2f}')} | {cell(s['reached_daemon'], '{:,.0f}')} | "
            f"{cell(s['kernel_filtered'], '{:,.0f}')} | "
            f"{cell(s['socket_buffer_drops'], '{:,.0f}')} | "
            f"{cell(s['timer_lateness_flood_ms'], '{:.2f}')} | {s['moved']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["flood"]:
        dst, port, seconds, source = args_in[1:5]
        print(json.dumps(flood(dst, int(port), float(seconds), source)), flush=True)
        return 0
    ap = argparse.ArgumentParser(prog="python -m simulations.bench_flood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="flood duration")
    ap.add_argument("--repeats", type=int, default=3, help="trials per filter setting")
    ap.add_argument("--source", choices=("spoofed", "client"), default="spoofed")
    ap.add_argument("--json", action="store_true", help="the trials and summary as JSON")
    args = ap.parse_args(args_in)
    root = Path(tempfile.mkdtemp(prefix="vipd-flood-"))
    trials = []
    for r in range(args.repeats):
        for filtered in (False, True):
            t = trial(root / f"{r}-{int(filtered)}", filtered, args.seconds, args.source)
            print(json.dumps(t), file=sys.stderr, flush=True)
            trials.append(t)
    failed = [t for t in trials if "error" in t]
    stats = summary([t for t in trials if "error" not in t])
    if args.json:
        print(json.dumps({"trials": trials, "summary": stats}, indent=2))
    else:
        print(table(stats))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
