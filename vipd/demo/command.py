"""`vipd demo`: a throwaway two-node lab, a fault, and the timeline a client saw.

Everything lives in network namespaces the demo creates with documentation addresses
(198.51.100.0/24, 2001:db8::/32) and deletes on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from vipd.demo.pairlab import FAULTS, VIP4, PairLab, outage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fault", choices=sorted(FAULTS), default="kill",
                        help="what happens to the active node (default: kill)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory with configs and logs")


def _log_time(line: str) -> float | None:
    """Epoch seconds of a vipd text log line ('2026-11-22T21:25:18.316 INFO ...')."""
    stamp = line.split(" ", 1)[0]
    try:
        base, ms = stamp.split(".")
        return time.mktime(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000
    except ValueError:
        return None


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "vipd demo: needs root (it creates network namespaces); try: sudo vipd demo"
    if shutil.which("ip") is None:
        return "vipd demo: the 'ip' command (iproute2) is missing; apt-get install iproute2"
    return None


def main(args: argparse.Namespace) -> int:
    if (problem := _cannot_run()) is not None:
        print(problem, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-demo-"))
    t0 = time.time()
    events: list[tuple[float, str]] = []

    def note(text: str, when: float | None = None) -> None:
        events.append(((when or time.time()) - t0, text))
        print(f"{events[-1][0]:8.3f}  {text}", flush=True)

    print(f"vipd demo - fault: {args.fault} ({FAULTS[args.fault]})\n    time  event")
    pair = PairLab.create(workdir)
    try:
        note(f"lab ready: switch + node1 198.51.100.1, node2 198.51.100.2, client "
             f"198.51.100.3; VIP {VIP4}")
        pair.start("node1")
        pair.start("node2")
        note("vipd started on node1 (priority 150) and node2 (priority 100)")
        active = pair.wait_single_holder(10)
        if active is None:
            print("vipd demo: no single node took the VIP within 10 s; logs in", workdir)
            args.keep = True
            return 1
        other = "node2" if active == "node1" else "node1"
        note(f"{active} holds the VIP; the client starts probing it every 5 ms")
        pair.start_probe()
        time.sleep(1.0)
        fault_at = time.time()
        pair.inject(args.fault, active)
        note(f"FAULT on {active}: {FAULTS[args.fault]}", fault_at)
        pair.wait_for(lambda: other in pair.holders(), 10)
        time.sleep(1.0)
        samples = pair.stop_probe()
        for line in pair.log_lines(other):
            when = _log_time(line)
            if when and when >= fault_at and "-> ACTIVE" in line:
                note(f"{other}: {line.split(f' {other} ', 1)[-1]}", when)
        gap, who = outage(samples, fault_at)
        back = next((sent for sent, w in samples if sent >= fault_at and w == other), None)
        if back is not None:
            note(f"client answered by {other}", back)
        if args.fault == "kill" and pair.wait_for(lambda: active not in pair.holders(), 6):
            note(f"{active}'s stale VIP gone: the dead daemon's kernel lease (vip_lease 3s) "
                 "expired")
        failed = sum(1 for sent, w in samples if sent >= fault_at and w is None)
        print(f"\nclient-visible outage: {gap * 1000:.0f} ms (longest run of unanswered "
              f"requests after the fault; {len(samples)} requests, {failed} unanswered)")
        print(f"now answering: {who}; VIP held by: {', '.join(pair.holders()) or 'nobody'}")
        return 0 if who == other else 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        pair.destroy()
        if args.keep:
            print(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        print("lab removed: every namespace and process the demo made is gone")

