"""The soak (issue 15, part 4): a pair at vipd's defaults under loss on the heartbeat path
for minutes. Does the VIP ever move, do the daemons leak memory or file descriptors, and
are the heartbeats they drop only the ones loss explains?

    python -m simulations.soak --minutes 10 --loss 0.05 [--json]

Needs root (network namespaces, `vipd.demo.pairlab.PairLab`; deleted on exit, error or
Ctrl-C). The pair starts settled (node1 active), then `simulations.netfaults.set_loss`
drops that fraction of the heartbeats to and from node1 at the switch, each on its own
draw, for the whole run; the ARP oracle (`simulations.arpwatch`) watches throughout.
Every --every s each daemon's VmRSS (and its anonymous and file-backed parts) and open
file descriptors are read from /proc. At
the end:

* moves of the VIP (netlink, `disturb.moves`) and ms of ARP rounds answered by two MACs;
* per daemon, the (seconds, RSS KB, fds) samples and the least-squares slope of RSS
  (KB/min) and of the fd count (fds/min), over the whole run and over its second half
  (after warm-up), with first, last and max;
* per daemon, /metrics' ``vipd_heartbeats_rejected_total`` by reason. Loss drops
  datagrams on the wire; it neither reorders nor copies them, so no reason is expected:
  any nonzero one is listed as unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations import disturb, netfaults, splitbrain
from simulations.arpwatch import ArpWatch
from vipd.demo.lab import list_namespaces
from vipd.demo.pairlab import VIP4, PairLab

EXPECTED_REJECTIONS: frozenset[str] = frozenset()  # under loss alone (module docstring)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (None with fewer than two distinct x)."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def proc_sample(pid: int) -> tuple[int, int, int, int]:
    """(VmRSS in KB, open file descriptors, RssAnon KB, RssFile KB) of a live process:
    anonymous memory is the heap (a leak grows it); file-backed is the mapped code and
    libraries, paged in as code paths run for the first time (no leak)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    if "VmRSS" not in fields:
        raise RuntimeError(f"pid {pid}: no VmRSS in /proc/{pid}/status")
    return (fields["VmRSS"], len(os.listdir(f"/proc/{pid}/fd")), fields.get("RssAnon", 0),
            fields.get("RssFile", 0))


def trend(samples: list[tuple[float, ...]]) -> dict[str, Any]:
    """Slopes per minute of (seconds, rss KB, fds[, anon KB, file KB]) samples, whole run
    and second half."""
    half = [s for s in samples if s[0] >= samples[-1][0] / 2] if samples else []

    def per_min(rows: list[tuple[float, ...]], k: int) -> float | None:
        value = slope([(row[0] / 60, row[k]) for row in rows if len(row) > k])
        return None if value is None else round(value, 2)

    return {
        "samples": len(samples),
        "rss_kb": {"first": samples[0][1], "last": samples[-1][1],
                   "max": max(s[1] for s in samples)} if samples else None,
        "fds": {"first": samples[0][2], "last": samples[-1][2],
                "max": max(s[2] for s in samples)} if samples else None,
        "rss_kb_per_min": per_min(samples, 1),
        "rss_kb_per_min_second_half": per_min(half, 1),
        "fds_per_min": per_min(samples, 2),
        "fds_per_min_second_half": per_min(half, 2),
        "anon_kb_per_min": per_min(samples, 3),
        "anon_kb_per_min_second_half": per_min(half, 3),
        "file_kb_per_min": per_min(samples, 4),
        "file_kb_per_min_second_half": per_min(half, 4),
    }


def rejections(metrics_text: str) -> dict[str, float]:
    """Nonzero ``vipd_heartbeats_rejected_total`` by reason."""
    return {labels.removeprefix("reason="): value
            for (name, labels), value in splitbrain.metric_values(metrics_text).items()
            if name == "vipd_heartbeats_rejected_total" and value}


def run(pair: PairLab, minutes: float, loss: float, every: float) -> dict[str, Any]:
    """The soak on a created, not yet started pair."""
    if pair.start_settled() != "node1":
        raise RuntimeError(f"the pair did not settle with node1 alone holding the VIP "
                           f"(holders {pair.holders()})")
    time.sleep(1.0)
    pids = {name: disturb_pid(pair, name) for name in pair.nodes}
    watch = ArpWatch.start(pair, VIP4)
    try:
        start = time.time()
        netfaults.set_loss(pair.lab, "node1", loss)
        samples: dict[str, list[tuple[float, ...]]] = {name: [] for name in pids}
        t0 = time.monotonic()
        end = t0 + minutes * 60
        next_at = t0
        while True:
            for name, pid in pids.items():
                disturb_pid(pair, name)  # raises if it exited
                samples[name].append((round(time.monotonic() - t0, 1), *proc_sample(pid)))
            if next_at >= end:
                break
            next_at = min(next_at + every, end)
            time.sleep(max(next_at - time.monotonic(), 0))
        netfaults.clear(pair.lab)
        metrics = {name: scrape(pair, name) for name in pair.nodes}
        time.sleep(0.5)
        obs = watch.stop()
    finally:
        watch.close()
    stop = time.time()
    points = obs.holders(start, stop)
    return {
        "minutes": minutes, "loss": loss, "sample_every_s": every,
        "moves": disturb.moves(points),
        "holders_at_end": sorted(points[-1][1]),
        "two_macs_ms": round(sum(nxt - t for t, nxt, seen in obs.rounds(start, stop)
                                 if len(seen) >= 2) * 1000, 1),
        "arp_rounds": len(obs.probes),
        "daemons": {name: trend(rows) for name, rows in samples.items()},
        "samples": {name: [list(row) for row in rows] for name, rows in samples.items()},
        "rejections": {name: rejections(text) for name, text in metrics.items()},
        "unexpected_rejections": {
            name: {r: v for r, v in rejections(text).items() if r not in EXPECTED_REJECTIONS}
            for name, text in metrics.items()},
        "tracebacks": [f"{name}: {line}" for name in pair.nodes
                       for line in disturb.tracebacks(pair.log_lines(name))],
    }


def scrape(pair: PairLab, name: str, tries: int = 3) -> str:
    """/metrics of node ``name``, tried again after a timeout (a daemon taking a
    tracemalloc snapshot does not answer for a second or more)."""
    for _ in range(tries - 1):
        with contextlib.suppress(TimeoutError):  # asked again below
            return pair.metrics(name)
    return pair.metrics(name)


def disturb_pid(pair: PairLab, name: str) -> int:
    """The daemon's pid (`ip netns exec` execs it: the Popen's pid is the daemon's)."""
    proc = pair.nodes[name].daemon
    if proc is None or proc.poll() is not None:
        raise RuntimeError(f"{name}: the daemon is not running (exit "
                           f"{None if proc is None else proc.returncode}; log "
                           f"{pair.nodes[name].log})")
    return proc.pid


def table(r: dict[str, Any]) -> str:
    lines = [f"soak: {r['minutes']:g} min, {r['loss'] * 100:g} % loss on node1's heartbeat "
             f"path; VIP moves {r['moves']}, two MACs answering {r['two_macs_ms']:g} ms "
             f"({r['arp_rounds']} ARP rounds), holder at the end "
             f"{', '.join(r['holders_at_end']) or 'none'}, tracebacks {len(r['tracebacks'])}",
             "",
             "| daemon | RSS KB first / last / max | RSS KB/min (second half) "
             "| of it anonymous, KB/min (second half) | file-backed, KB/min (second half) "
             "| fds first / last / max | fds/min (second half) | rejected heartbeats "
             "by reason | unexpected |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in r["daemons"].items():
        rss, fds = d["rss_kb"], d["fds"]
        rejected = ", ".join(f"{k} {v:g}" for k, v in r["rejections"][name].items()) or "none"
        unexpected = ", ".join(r["unexpected_rejections"][name]) or "none"
        lines.append(f"| {name} | {rss['first']} / {rss['last']} / {rss['max']} "
                     f"| {d['rss_kb_per_min']} ({d['rss_kb_per_min_second_half']}) "
                     f"| {d['anon_kb_per_min']} ({d['anon_kb_per_min_second_half']}) "
                     f"| {d['file_kb_per_min']} ({d['file_kb_per_min_second_half']}) "
                     f"| {fds['first']} / {fds['last']} / {fds['max']} "
                     f"| {d['fds_per_min']} ({d['fds_per_min_second_half']}) "
                     f"| {rejected} | {unexpected} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.soak",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length (default 10)")
    ap.add_argument("--loss", type=float, default=0.05,
                    help="fraction of heartbeats dropped to and from node1 (default 0.05)")
    ap.add_argument("--every", type=float, default=10.0,
                    help="seconds between /proc samples (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace each daemon's heap (simulations/tracehook): what grew, by "
                         "line, in WORKDIR/tracemalloc/PID.txt (implies --keep). For the heap "
                         "figures only: tracing doubles the daemons' memory and each "
                         "snapshot stalls a daemon for a second or more, so the peer takes "
                         "over now and then")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.every <= 0 or not 0 <= args.loss <= 1:
        ap.error("--minutes and --every must be positive, --loss a fraction in 0..1")
    if os.geteuid() != 0:
        log("soak: needs root (it creates network namespaces)")
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-soak-"))
    started = time.monotonic()
    log(f"soak: {args.minutes:g} min at {args.loss * 100:g} % loss; work dir {workdir}")
    prefix = ""
    try:
        pair = PairLab.create(workdir / "pair")
        prefix = pair.lab.prefix
        if args.tracemalloc:
            args.keep = True
            traces = workdir / "tracemalloc"
            traces.mkdir()
            hook = str(Path(__file__).resolve().parent / "tracehook")
            pair.env = {"PYTHONPATH": os.pathsep.join(filter(None, [
                            hook, os.environ.get("PYTHONPATH")])),
                        "VIPD_TRACEMALLOC_DIR": str(traces),
                        "VIPD_TRACEMALLOC_EVERY": str(max(args.every, 30.0))}
            log(f"soak: tracing the daemons' heaps into {traces}")
        try:
            report = run(pair, args.minutes, args.loss, args.every)
        finally:
            pair.destroy()
    except KeyboardInterrupt:
        log("\ninterrupted: lab removed")
        return 130
    finally:
        left = [ns for ns in list_namespaces() if prefix and ns.startswith(prefix)]
        log(f"namespaces of this run still present: {', '.join(left) or 'none'}")
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["runtime_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(report))
        log(table(report))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
