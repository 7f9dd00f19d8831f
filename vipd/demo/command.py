"""`vipd demo`: a throwaway two-node lab, a fault, and the timeline a client saw.

With ``--arbiter etcd``: three nodes arbitrated by a 3-member etcd (Debian's etcd-server,
in three more namespaces) instead of a pair; the VIP goes to the next node in priority.

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
    parser.add_argument("--arbiter", choices=("none", "etcd"), default="none",
                        help="none: a pair (default); etcd: three nodes on a 3-member etcd "
                             "(needs etcd-server and pip install 'vipd[etcd]')")
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


def _cannot_run(arbiter: str) -> str | None:
    if os.geteuid() != 0:
        return "vipd demo: needs root (it creates network namespaces); try: sudo vipd demo"
    if shutil.which("ip") is None:
        return "vipd demo: the 'ip' command (iproute2) is missing; apt-get install iproute2"
    if arbiter == "etcd":
        from vipd.demo.etcdserver import etcd_binary

        if etcd_binary() is None:
            return "vipd demo --arbiter etcd: etcd is missing; apt-get install etcd-server"
        try:
            import aetcd  # noqa: F401
        except ImportError:
            return "vipd demo --arbiter etcd: the etcd client is missing; pip install 'vipd[etcd]'"
    return None


def main(args: argparse.Namespace) -> int:
    if (problem := _cannot_run(args.arbiter)) is not None:
        print(problem, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-demo-"))
    t0 = time.time()
    events: list[tuple[float, str]] = []

    def note(text: str, when: float | None = None) -> None:
        events.append(((when or time.time()) - t0, text))
        print(f"{events[-1][0]:8.3f}  {text}", flush=True)

    group = args.arbiter == "etcd"
    print(f"vipd demo - fault: {args.fault} ({FAULTS[args.fault]})"
          + (", a group of three nodes on etcd" if group else "") + "\n    time  event")
    pair = PairLab.create(workdir, arbiter=args.arbiter)
    try:
        hosts = ", ".join(f"{name} {pair.host(name).ipv4.ip}" for name in pair.lab.hosts)
        note(f"lab ready: switch + {hosts}; VIP {VIP4}")
        if group:
            pair.start_etcd()
            note("etcd started: 3 members on etcd1..3 (heartbeat 50 ms, election 500 ms)")
        for name in pair.nodes:
            pair.start(name)
        note("vipd started on " + ", ".join(f"{n} (priority {node.priority})"
                                            for n, node in pair.nodes.items()))
        active = pair.wait_single_holder(10)
        if active is None:
            print("vipd demo: no single node took the VIP within 10 s; logs in", workdir)
            args.keep = True
            return 1
        others = [n for n in pair.nodes if n != active]
        note(f"{active} holds the VIP; the client starts probing it every 5 ms")
        pair.start_probe()
        time.sleep(1.0)
        fault_at = time.time()
        pair.inject(args.fault, active)
        note(f"FAULT on {active}: {FAULTS[args.fault]}", fault_at)
        pair.wait_for(lambda: any(n in pair.holders() for n in others), 10)
        time.sleep(1.0)
        samples = pair.stop_probe()
        other = next((n for n in others if n in pair.holders()), others[0])
        seen = []
        for name in (active, other):
            for line in pair.log_lines(name):
                when = _log_time(line)
                if when and when >= fault_at and ("-> ACTIVE" in line or "holder key" in line
                                                  or "self-fence" in line):
                    seen.append((when, f"{name}: {line.split(f' {name} ', 1)[-1]}"))
        for when, text in sorted(seen):
            note(text, when)
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

