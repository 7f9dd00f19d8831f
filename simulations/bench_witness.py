"""What a witness serving many pairs costs, and how fast it answers.

    python -m simulations.bench_witness [--pairs 50] [--seconds 30] [--json]

Starts the real `vipd witness --config FILE` as a subprocess on 127.0.0.1 with one
cluster per pair (key files generated in a temporary directory) and drives every pair
from this one asyncio process, with node-side Sessions (one `Session.seal` per request):
each pair's holder renews its vote every heartbeat interval (DEFAULT_INTERVAL, 40 ms),
its standby probes every 10th interval (a STANDBY request: answered HELD). The pairs are
spread evenly over the interval. The first `lease` plus half a second is a warm-up (the
witness grants nothing for one lease after it starts, and the standbys start asking once
every holder has its vote); then, over `--seconds`:

* the witness's CPU (utime + stime from /proc/PID/stat, as % of one core), its RSS at
  the end (VmRSS) and at its peak (VmHWM, /proc/PID/status);
* request -> reply latency at the client (reply received minus the send time its echo
  names), p50 / p99 / max, and the share of the requests sent in the window that were
  answered (replies still on their way get 0.3 s after the last send);
* the verdicts, and what this load generator itself cost (it must not be the bottleneck).

Traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from vipd.core.events import DEFAULT_INTERVAL
from vipd.core.protocol import (
    Advert,
    Flag,
    KeyRing,
    Kind,
    Received,
    Rejected,
    Session,
    State,
    Vote,
)
from vipd.keys import generate_key_line, load_keys

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
WITNESS_NAME = "witness"
STANDBY_EVERY = 10  # the standby asks every 10th interval
SLOTS = 10  # sending wakeups per interval; the pairs are spread over them


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WitnessProcess:
    """`vipd witness --config FILE` as a subprocess on 127.0.0.1, its key files and
    config in ``root``. The process runs this checkout's vipd (PYTHONPATH)."""

    def __init__(self, root: Path, clusters: dict[str, list[str]]) -> None:
        self.root = root
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.http_port = free_port(socket.SOCK_STREAM)
        self.config_path = root / "witness.yaml"
        self.stderr_path = root / "witness.stderr"
        self.keys: dict[str, KeyRing] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(clusters)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.udp_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self, clusters: dict[str, list[str]]) -> None:
        """The config for ``clusters`` (name -> nodes); a key file per new cluster."""
        for cluster in clusters:
            key_file = self.root / f"{cluster}.key"
            if not key_file.exists():
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(generate_key_line(1) + "\n")
            self.keys[cluster] = KeyRing(load_keys(key_file))
        config = {"name": WITNESS_NAME, "listen": f"127.0.0.1:{self.udp_port}",
                  "max_clock_skew": "1s",
                  "metrics": {"listen": f"127.0.0.1:{self.http_port}"},
                  "clusters": {cluster: {"key_file": f"{cluster}.key", "nodes": nodes}
                               for cluster, nodes in clusters.items()}}
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                          env.get("PYTHONPATH")]))
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vipd.cli", "witness", "--config",
                 str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=self.root)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vipd witness exited with {self.proc.returncode}: "
                                   f"{self.stderr()}")
            with contextlib.suppress(OSError):
                self.health()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"vipd witness did not answer /healthz within "
                                   f"{timeout:g}s: {self.stderr()}")
            time.sleep(0.05)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples}

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() \
            else ""

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # the command may contain spaces
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) in kB."""
        assert self.proc is not None
        found: dict[str, int] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
        return found

    def __enter__(self) -> WitnessProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class Voter:
    """A node's end of the vote channel (as a node of the pair would have it)."""

    def __init__(self, cluster: str, node: str, keys: KeyRing) -> None:
        self.cluster, self.node = cluster, node
        self.session = Session(cluster=cluster, node=node, keys=keys,
                               boot_id=secrets.randbits(64), digest=b"\0" * 8,
                               expect=Kind.VOTE_REPLY)

    def request(self, now: float, lease_ms: int, resign: bool = False,
                wall_offset: float = 0.0, probe: bool = False) -> bytes:
        """As the active node (grant or renew), or with ``probe`` as a standby (is the
        vote free? nothing changes)."""
        flags = Flag.HEALTHY | (Flag.RESIGNING if resign else Flag.NONE)
        state = State.STANDBY if probe else State.ACTIVE
        return self.session.seal(Advert(state, flags, 1, 100, 100), now,
                                 time.time_ns() + round(wall_offset * 1e9),
                                 kind=Kind.VOTE_REQUEST, vote=Vote(lease_ms=lease_ms))

    def open(self, data: bytes, now: float) -> Received:
        return self.session.open(data, now, time.time_ns())


# --- the load --------------------------------------------------------------------------------

@dataclass
class Load:
    measuring_from: float = float("inf")
    measuring_until: float = float("inf")
    sent: int = 0
    answered: int = 0
    refused_replies: int = 0
    latencies: list[float] = field(default_factory=list)
    verdicts: Counter[str] = field(default_factory=Counter)


@dataclass
class Member:
    voter: Voter
    sock: socket.socket


def _on_readable(member: Member, load: Load) -> None:
    while True:
        try:
            data = member.sock.recv(2048)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # a queued ICMP error: counted as unanswered
            continue
        now = time.monotonic()
        try:
            received = member.voter.open(data, now)
        except Rejected:
            load.refused_replies += 1
            continue
        sent_at = received.echo_sent_at
        vote = received.heartbeat.vote
        if sent_at is not None and vote is not None and \
                load.measuring_from <= sent_at < load.measuring_until:
            load.answered += 1
            load.latencies.append(now - sent_at)
            load.verdicts[vote.verdict.name.lower()] += 1


async def drive(witness: WitnessProcess, clusters: list[str], seconds: float,
                interval: float, lease_ms: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    load = Load()
    pairs: list[tuple[Member, Member]] = []
    for cluster in clusters:
        members = []
        for node in (f"{cluster}-a", f"{cluster}-b"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.connect(witness.address)
            sock.setblocking(False)
            member = Member(Voter(cluster, node, witness.keys[cluster]), sock)
            loop.add_reader(sock.fileno(), _on_readable, member, load)
            members.append(member)
        pairs.append((members[0], members[1]))
    warmup = lease_ms / 1000 + 0.5
    start = time.monotonic()
    load.measuring_from = start + warmup
    load.measuring_until = load.measuring_from + seconds
    cpu = {"witness": 0.0, "self": 0.0}
    tick = 0
    try:
        while True:
            slot_at = start + tick * interval / SLOTS
            delay = slot_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if now >= load.measuring_until:
                break
            if cpu["witness"] == 0.0 and now >= load.measuring_from:
                cpu = {"witness": witness.cpu_seconds(), "self": _own_cpu(), "at": now}
            round_no, slot = divmod(tick, SLOTS)
            standbys_ask = now >= start + warmup - interval and round_no % STANDBY_EVERY == 0
            for i in range(slot, len(pairs), SLOTS):
                holder, standby = pairs[i]
                holder.sock.send(holder.voter.request(now, lease_ms))
                if now >= load.measuring_from:
                    load.sent += 1
                if standbys_ask:
                    standby.sock.send(standby.voter.request(now, lease_ms, probe=True))
                    if now >= load.measuring_from:
                        load.sent += 1
            tick += 1
        ended = time.monotonic()
        witness_cpu = witness.cpu_seconds() - cpu["witness"]
        own_cpu = _own_cpu() - cpu["self"]
        memory = witness.memory_kb()
        await asyncio.sleep(0.3)  # replies on their way
    finally:
        for holder, standby in pairs:
            for member in (holder, standby):
                loop.remove_reader(member.sock.fileno())
                member.sock.close()
    window = ended - cpu["at"]
    latencies = sorted(load.latencies)
    return {
        "pairs": len(clusters), "seconds": round(window, 2),
        "interval_ms": round(interval * 1000, 3), "lease_ms": lease_ms,
        "requests": load.sent, "requests_per_s": round(load.sent / window, 1),
        "answered": load.answered,
        "answered_share": round(load.answered / load.sent, 5) if load.sent else 0.0,
        "verdicts": dict(sorted(load.verdicts.items())),
        "replies_refused_by_nodes": load.refused_replies,
        "latency_ms": {name: round(_quantile(latencies, q) * 1000, 3)
                       for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "witness_cpu_percent": round(100 * witness_cpu / window, 2),
        "witness_rss_mb": round(memory.get("VmRSS", 0) / 1024, 1),
        "witness_peak_rss_mb": round(memory.get("VmHWM", 0) / 1024, 1),
        "generator_cpu_percent": round(100 * own_cpu / window, 2),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(int(q * len(values)), len(values) - 1)]


def run_bench(pairs: int, seconds: float, interval: float = DEFAULT_INTERVAL,
              lease_ms: int = 1000, root: Path | None = None) -> dict[str, Any]:
    """Start a witness for ``pairs`` clusters, drive them, stop it; the report."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="vipd-bench-witness-")))
        clusters = [f"pair{i:03d}" for i in range(pairs)]
        witness = stack.enter_context(WitnessProcess(
            root, {c: [f"{c}-a", f"{c}-b"] for c in clusters}))
        report = asyncio.run(drive(witness, clusters, seconds, interval, lease_ms))
        samples = witness.metrics()
        report["witness_refused"] = sum(value for (name, _), value in samples.items()
                                        if name == "vipd_witness_rejected_total")
        report["witness_exit_code"] = witness.stop()
        report["witness_traceback"] = "Traceback" in witness.stderr()
    return report


def table(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    rows = [
        ("pairs (clusters)", r["pairs"]),
        ("measured", f"{r['seconds']} s at a {r['interval_ms']:g} ms interval, "
                     f"lease {r['lease_ms']} ms"),
        ("requests", f"{r['requests']} ({r['requests_per_s']}/s)"),
        ("answered", f"{r['answered']} ({100 * r['answered_share']:.3f} %)"),
        ("verdicts", ", ".join(f"{k} {v}" for k, v in r["verdicts"].items())),
        ("latency p50 / p99 / max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms"),
        ("witness CPU", f"{r['witness_cpu_percent']} % of one core"),
        ("witness RSS (end / peak)", f"{r['witness_rss_mb']} / {r['witness_peak_rss_mb']} MB"),
        ("load generator CPU", f"{r['generator_cpu_percent']} % of one core"),
        ("refused by the witness", int(r["witness_refused"])),
    ]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.bench_witness",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--lease-ms", type=int, default=1000)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = run_bench(args.pairs, args.seconds, lease_ms=args.lease_ms)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
