"""Failover benchmark on a real namespace lab: client-visible outage per fault kind.

    python -m simulations.bench_failover --trials 20 --faults kill,stop,health,link-down --json

Not part of the test suite; needs root (it builds network namespaces with documentation
addresses through `vipd.demo.pairlab.PairLab` and deletes them on exit, error or Ctrl-C).

Per fault kind one PairLab is reused. Before every trial both daemons are SIGKILLed, any
VIP they left is deleted, health and links are restored, dead responders are restarted,
and the pair is started again (node1 0.3 s ahead of node2, so it wins the election)
together with the probe (a request every 5 ms from the client namespace). The trial
begins once node1 alone holds the VIP and answers the client, node2 has been a standby
for longer than the dead interval, and the probe has sent its first request (checked in
/proc, since the probe needs a while to import). After a random 0.5 .. 0.5 + heartbeat
interval s the fault hits node1; the trial ends when node2 holds the VIP and answers the
client (10 s timeout = a failed trial). The outage is
`vipd.demo.pairlab.outage(samples, fault_time)`: from the first unanswered request at or
after the fault to the next answered one.

Disturbances (pause-standby, pause-active, clock-step; `simulations.disturb`) start
from the same stable pair but measure something else: whether two nodes ever answer for
the VIP (an ARP oracle in the client namespace, `simulations.arpwatch`), whether the VIP
moves, and how soon the winner announces after a dual-active episode; --pause sets how
long the pause faults freeze a daemon. They have their own tables.

Split-brain faults (issue 12, part 6): with ``--arbiter witness`` or ``--arbiter none``
every fault runs as a `simulations.splitbrain` trial from the same stable pair (plus a
witness host running `vipd witness`, restarted by the reset when a fault stopped it),
with the ARP oracle sampling both nodes' kernel gates (``--fence kernel``, the default
with a witness): client-visible failover, ms with two MACs answering, ms with both gates
open, VIP moves, and for kill the stale-VIP time. The faults: partition-pair,
isolate-active, isolate-standby, oneway-12, oneway-21, witness-stop,
witness-stop-then-kill (these two need a witness), kill, pause-active-1s,
pause-active-5s, switchover, stop.

    python -m simulations.bench_failover --arbiter witness --trials 20 --idle-seconds 0
    python -m simulations.bench_failover --arbiter none --fence kernel --faults kill

Groups on etcd (issue 13): with ``--arbiter etcd`` the lab is three vipd nodes on a
3-member etcd and the faults are those of `simulations.bench_group` (kill,
isolate-holder, stop, switchover, etcd-leader-kill, etcd-quorum-lost), measured by the same
oracles; ``--ttl`` sets the nodes' etcd lease TTL (default 1s).

    python -m simulations.bench_failover --arbiter etcd --trials 20

Idle resources: with a stable pair and no probe, each daemon's CPU % of one core (the
scheduler's own accounting, /proc/PID/task/*/schedstat; the median of 5 windows over
--idle-seconds, 30 by default) and its VmRSS.

Progress and per-trial lines go to stderr; stdout gets the table, or the JSON object with
--json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations import bench_cloud, bench_group, disturb, splitbrain
from vipd.config import load_config
from vipd.demo.lab import list_namespaces
from vipd.demo.pairlab import ECHO_PORT, VIP4, VIP6, PairLab, failed_runs, outage

FAULTS = {
    "kill": "SIGKILL of the daemon and its service (node crash)",
    "stop": "SIGTERM to the daemon (graceful stop)",
    "health": "the health check starts failing",
    "link-down": "the node's link goes down",
    "switchover": "planned switchover through the control API (POST /v1/switchover)",
    **disturb.DISTURBANCES,
}
OUTAGE_FAULTS = [kind for kind in FAULTS if kind not in disturb.DISTURBANCES]
ACTIVE, OTHER = "node1", "node2"
PROBE_EVERY = 0.005
PHASE_BASE = 0.5
FAILOVER_TIMEOUT = 10.0
AFTER_RECOVERY = 0.15  # answered samples after the takeover before stopping the probe
RESET_ATTEMPTS = 3
START_LEAD = 0.3  # node1 starts this much before node2
STALE_TIMEOUT = 8.0  # vip_lease (3 s) + margin


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- talking to the VIP from the client namespace ------------------------------------------

class Asker:
    """A UDP socket created inside the client namespace, used from this thread: asks the
    responder on the VIP who answers (the same request format as the probe)."""

    def __init__(self, pair: PairLab) -> None:
        self.sock: socket.socket = pair.lab["client"].run(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.setblocking(False)
        self.seq = 1 << 62  # far from the probe's numbers, for readability in captures

    def who(self, timeout: float = 0.05) -> str | None:
        self.seq += 1
        try:
            self.sock.sendto(struct.pack("!Q", self.seq), (VIP4, ECHO_PORT))
        except OSError:
            time.sleep(timeout)
            return None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data, _ = self.sock.recvfrom(64)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except OSError:
                return None
            if struct.unpack("!Q", data[:8])[0] == self.seq:
                return data[8:].decode()
        return None

    def close(self) -> None:
        self.sock.close()


# --- pair state ---------------------------------------------------------------------------

def kill_probe(pair: PairLab) -> None:
    if pair.probe is not None:
        if pair.probe.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                pair.probe.kill()
        pair.probe.wait()
        pair.probe = None
    if pair.probe_out is not None:
        pair.probe_out.unlink(missing_ok=True)


def clear_daemons(pair: PairLab) -> None:
    """SIGKILL both daemons (not the responders) and delete any VIP they left: faster
    than a graceful stop (which may wait for a handover) and leaves no stale copy. Their
    state files forget the kill (the running mark and flap damping's failures): the next
    trial starts from a pair with no history, as a clean stop would leave it."""
    for name in pair.nodes:
        pair.kill(name, with_service=False)
        forget_failures(pair.workdir / f"state-{name}" / "state.json")
        host = pair.host(name)
        for vip in (VIP4, VIP6):
            info = host.address(vip)
            if info is not None:
                host.ip("addr", "del", f"{vip}/{info['prefixlen']}", "dev", "eth0",
                        check=False)


def forget_failures(state_file: Path) -> None:
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return
    state.pop("running", None)
    state.pop("flaps", None)
    state_file.write_text(json.dumps(state))


RESPONDER_DEATHS: list[str] = []


def revive_responders(pair: PairLab) -> None:
    """`PairLab.start` starts a responder only if the node has none; one that died
    would otherwise leave the node unable to answer (none should: each death is noted
    in the report)."""
    for node in pair.nodes.values():
        proc = node.responder
        if proc is not None and proc.poll() is not None:
            tail = [ln for ln in pair.log_lines(node.name) if "Error" in ln][-1:]
            RESPONDER_DEATHS.append(f"{node.name}: exit {proc.returncode}"
                                    f"{': ' + tail[0].strip() if tail else ''}")
            log(f"  responder on {node.name} had exited ({RESPONDER_DEATHS[-1]}); "
                f"starting a new one")
            node.responder = None


def reset(pair: PairLab, asker: Asker, dead_interval: float) -> None:
    """Back to a clean, stable pair with the probe running: node1 active and answering
    the client, node2 a standby that has heard it for longer than a dead interval."""
    problem = ""
    for attempt in range(1, RESET_ATTEMPTS + 1):
        kill_probe(pair)
        clear_daemons(pair)
        revive_responders(pair)
        pair.heal()
        for name in pair.nodes:
            pair.set_health(name, True)
            pair.link(name, True)
        if pair.witness_config is not None:
            pair.start_witness()  # after witness-stop: it grants nothing for one lease
        problem = _start_stable(pair, asker, dead_interval)
        if not problem:
            return
        log(f"  reset attempt {attempt} failed: {problem}")
    kill_probe(pair)
    raise RuntimeError(f"cannot get a stable pair with {ACTIVE} active: {problem}")


def _new_lines(pair: PairLab, name: str) -> Any:
    log_file = pair.nodes[name].log
    seen = len(log_file.read_text().splitlines()) if log_file.exists() else 0
    return lambda: pair.log_lines(name)[seen:]


def _start_stable(pair: PairLab, asker: Asker, dead_interval: float) -> str:
    active_lines, other_lines = _new_lines(pair, ACTIVE), _new_lines(pair, OTHER)
    # Both daemons import for a second or more; node1 gets a head start so that it is up
    # well within node2's hold-down (one dead interval) and wins the election. The
    # probe's own start-up overlaps with theirs.
    pair.start(ACTIVE)
    time.sleep(START_LEAD)
    pair.start(OTHER)
    try:
        pair.start_probe(every=PROBE_EVERY)  # returns once the first request is out
    except RuntimeError as exc:
        return str(exc)
    if not pair.wait_for(lambda: any("-> STANDBY" in ln for ln in other_lines()), 10.0):
        return f"{OTHER} did not reach STANDBY"
    if not pair.wait_for(lambda: pair.holders() == [ACTIVE], 10.0):
        return f"{ACTIVE} did not become the only holder (holders {pair.holders()})"
    # A standby that did not hear the active would take over after one dead interval.
    time.sleep(dead_interval + 0.15)
    if any("-> ACTIVE" in ln for ln in other_lines()):
        return f"{OTHER} went active after starting"
    if not any("-> ACTIVE" in ln for ln in active_lines()):
        return f"{ACTIVE} is not active"
    if pair.holders() != [ACTIVE]:
        return f"holders {pair.holders()} instead of [{ACTIVE}]"
    if not pair.wait_for(lambda: asker.who() == ACTIVE, 3.0, step=0.01):
        return f"the client does not get answers from {ACTIVE}"
    return ""


# --- one trial ----------------------------------------------------------------------------

@dataclass
class Trial:
    fault: str
    index: int
    outage_ms: float | None = None  # None: failed
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def inject(pair: PairLab, fault: str, node: str) -> None:
    if fault != "switchover":
        pair.inject(fault, node)
        return
    # From a thread inside the node's namespace: no process start in the measurement.
    status = pair.switchover(node)
    if status != 200:
        raise RuntimeError(f"switchover refused with HTTP {status}")


def run_trial(pair: PairLab, asker: Asker, fault: str, index: int, rng: random.Random,
              interval: float) -> Trial:
    """One fault on node1 of a pair that `reset` left stable, with the probe running."""
    trial = Trial(fault, index)
    samples: list[tuple[float, str | None]] = []
    ok = False
    phase = rng.uniform(PHASE_BASE, PHASE_BASE + interval)
    time.sleep(phase)
    fault_at = confirmed_at = time.time()
    try:
        inject(pair, fault, ACTIVE)
        ok = pair.wait_for(lambda: OTHER in pair.holders() and asker.who() == OTHER,
                           FAILOVER_TIMEOUT, step=0.005)
        confirmed_at = time.time()
        if ok:
            time.sleep(AFTER_RECOVERY)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        trial.error = f"injecting {fault} failed: {exc!r}"
    finally:
        if fault == "link-down":
            pair.link(ACTIVE, True)
        if fault == "kill" and ok:
            # The dead daemon cannot release: its copy goes when the kernel lease runs out.
            gone = pair.wait_for(lambda: ACTIVE not in pair.holders(), STALE_TIMEOUT, 0.01)
            trial.detail["stale_ms"] = round((time.time() - fault_at) * 1000, 1) if gone \
                else None
        try:
            samples = pair.stop_probe()
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            trial.error = trial.error or f"no probe results: {exc!r}"
        kill_probe(pair)
    gap, who = outage(samples, fault_at)
    trial.detail = {
        **trial.detail,
        "phase_ms": round(phase * 1000, 1),
        "requests": len(samples),
        # over the random phase only: the probe starts while the pair is still forming
        "lost_in_phase": sum(1 for t, w in samples
                             if fault_at - phase <= t < fault_at and w is None),
        "lost_after_fault": sum(1 for t, w in samples if t >= fault_at and w is None),
        "longest_gap_ms": round(max((r for r in failed_runs(samples, fault_at)
                                     if r != float("inf")), default=0.0) * 1000, 1),
        "confirmed_ms": round((confirmed_at - fault_at) * 1000, 1),
    }
    if trial.error:
        pass
    elif not ok:
        trial.error = (f"{OTHER} not holding and answering within {FAILOVER_TIMEOUT:.0f} s "
                       f"(holders {pair.holders()})")
    elif math.isinf(gap):
        trial.error = "no answered request after the outage began"
    elif who != OTHER:
        trial.error = f"the client ends up answered by {who}, not {OTHER}"
    else:
        trial.outage_ms = gap * 1000
    return trial


def outage_trials(pair: PairLab, asker: Asker, kind: str, args: argparse.Namespace,
                  rng: random.Random, interval: float, dead_interval: float) -> list[Trial]:
    """args.trials failovers of kind (`run_trial`), each from a freshly reset stable pair."""
    trials = []
    for i in range(1, args.trials + 1):
        try:
            reset(pair, asker, dead_interval)
        except RuntimeError as exc:
            t = Trial(kind, i, error=f"no stable pair to start from: {exc}")
        else:
            t = run_trial(pair, asker, kind, i, rng, interval)
        trials.append(t)
        res = f"{t.outage_ms:7.1f} ms" if t.outage_ms is not None else f"FAILED: {t.error}"
        log(f"{kind:<9} #{i:<3} {res}  {json.dumps(t.detail)}")
    return trials


def fault_trials(pair: PairLab, asker: Asker, kind: str, args: argparse.Namespace,
                 dead_interval: float, run: Callable[[int], disturb.Trial],
                 before: Callable[[], None] | None = None) -> list[disturb.Trial]:
    """args.trials faults of kind (``run(i)``: `disturb.run_trial`,
    `splitbrain.run_trial`, `faults.run_trial`), each from a freshly reset stable pair
    (``before``: called before each reset); the trial stops the probe, and an error
    leaves none running."""
    trials = []
    for i in range(1, args.trials + 1):
        if before is not None:
            before()
        try:
            reset(pair, asker, dead_interval)
        except RuntimeError as exc:
            t = disturb.Trial(kind, i, error=f"no stable pair to start from: {exc}")
        else:
            try:
                t = run(i)
            finally:
                kill_probe(pair)
        trials.append(t)
        shown = {k: v for k, v in t.detail.items() if k != "tracebacks" or v}
        log(f"{kind:<22} #{i:<3} {'FAILED: ' + t.error if t.error else 'ok'}  "
            f"{json.dumps(shown)}")
    return trials


# --- idle resources -----------------------------------------------------------------------

IDLE_SAMPLES = 5  # the idle window is cut into this many; the table shows their median


def _cpu_ns(pid: int) -> int:
    """CPU time of all the process's threads in ns, from the scheduler's own accounting
    (/proc/PID/task/TID/schedstat). utime/stime in /proc/PID/stat come in 10 ms ticks,
    too coarse for a process that runs a few ms a second."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a worker thread that just ended
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def daemon_pid(pair: PairLab, name: str) -> int:
    """`ip netns exec` execs the command, so the Popen pid is the daemon's python."""
    proc = pair.nodes[name].daemon
    assert proc is not None and proc.poll() is None, f"{name}: daemon not running"
    argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    words = [a.decode() for a in argv if a]
    if not (words and "python" in Path(words[0]).name and "vipd.cli" in words
            and "run" in words):
        raise RuntimeError(f"{name}: pid {proc.pid} is not the daemon: {words}")
    return proc.pid


def measure_idle_without_checks(workdir: Path, args: argparse.Namespace,
                                prefixes: list[str]) -> dict[str, dict[str, float]]:
    """Idle cost of the daemons alone: a pair without the lab's exec check."""
    pair = PairLab.create(workdir / "idle", checks=False, interval=args.interval,
                          dead_after=args.dead_after, arbiter=args.arbiter or "none",
                          fence=args.fence)
    prefixes.append(pair.lab.prefix)
    try:
        if pair.start_settled(responder=False, lead=START_LEAD) != ACTIVE:
            raise RuntimeError("the idle pair did not settle with node1 active")
        time.sleep(1.0)
        return measure_idle(pair, args.idle_seconds)
    finally:
        pair.destroy()


def measure_idle(pair: PairLab, seconds: float) -> dict[str, dict[str, Any]]:
    """CPU % of one core per daemon over ``seconds``, as the median of IDLE_SAMPLES equal
    windows (one noisy window on a shared machine does not decide), and the RSS."""
    pids = {name: daemon_pid(pair, name) for name in pair.nodes}
    samples: dict[str, list[float]] = {name: [] for name in pids}
    for _ in range(IDLE_SAMPLES):
        start = {name: _cpu_ns(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(seconds / IDLE_SAMPLES)
        elapsed = time.monotonic() - t0
        for name, pid in pids.items():
            used = (_cpu_ns(pid) - start[name]) / 1e9
            samples[name].append(round(100 * used / elapsed, 2))
    return {name: {"cpu_percent": round(statistics.median(samples[name]), 2),
                   "cpu_percent_samples": samples[name], "rss_mib": round(_rss_mib(pid), 1)}
            for name, pid in pids.items()}


# --- statistics and output ----------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(trials: list[Trial]) -> dict[str, Any]:
    ok = [t.outage_ms for t in trials if t.outage_ms is not None]
    failed = sum(1 for t in trials if t.outage_ms is None)
    if not ok:
        return {"n": 0, "median_ms": None, "p95_ms": None, "max_ms": None, "failed": failed}
    summary: dict[str, Any] = {
        "n": len(ok), "median_ms": round(percentile(ok, 0.5), 1),
        "p95_ms": round(percentile(ok, 0.95), 1), "max_ms": round(max(ok), 1),
        "failed": failed}
    stale = [t.detail["stale_ms"] for t in trials if t.detail.get("stale_ms") is not None]
    if stale:  # kill only: from the crash until the dead node's VIP copy was gone
        summary["stale_vip_ms"] = {"median": round(percentile(stale, 0.5), 1),
                                   "max": round(max(stale), 1),
                                   "missing": sum(1 for t in trials if t.outage_ms is not None
                                                  and t.detail.get("stale_ms") is None)}
    return summary


def table(report: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    hb = report["heartbeat"]
    lines = [f"heartbeat {hb['interval_ms']:g} ms x {hb['dead_after']}; "
             f"{report['trials']} trials per fault"]
    if report["faults"]:
        lines += [f"failover outage seen by the client (probe every "
                  f"{report['probe_interval_ms']:g} ms)",
                  f"{'fault':<10} {'n':>3} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} "
                  f"{'failed':>6}"]
    for kind, s in report["faults"].items():
        lines.append(f"{kind:<10} {s['n']:>3} {cell(s['median_ms']):>10} "
                     f"{cell(s['p95_ms']):>8} {cell(s['max_ms']):>8} {s['failed']:>6}")
    for kind, s in report["faults"].items():
        if "stale_vip_ms" in s:
            st = s["stale_vip_ms"]
            lines.append(f"{kind}: the dead node's VIP copy gone after median "
                         f"{cell(st['median'])} ms, max {cell(st['max'])} ms (kernel lease; "
                         f"not seen gone in {st['missing']} trials)")
    for key, title in (("idle", "lab config: exec check every 100 ms"),
                       ("idle_without_checks", "no health checks")):
        if report.get(key):
            lines.append(f"\nidle pair, {title} ({report['idle_seconds']:g} s in "
                         f"{IDLE_SAMPLES} windows, no probe; cpu % = median of the windows)")
            lines.append(f"{'node':<6} {'cpu %':>7} {'rss MiB':>8}  windows")
            for node, r in report[key].items():
                windows = " ".join(f"{v:.2f}" for v in r.get("cpu_percent_samples", []))
                lines.append(f"{node:<6} {r['cpu_percent']:>7.2f} {r['rss_mib']:>8.1f}  "
                             f"{windows}")
    if report.get("disturbance_trials"):
        lines += ["", disturb.table(report["disturbance_trials"], report["pause_s"])]
    if report.get("splitbrain_trials"):
        lines += ["", splitbrain.table(report["splitbrain_trials"], report["arbiter"],
                                       report["fence"])]
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------

def _num(ms: float) -> float | int:
    ms = round(ms, 3)
    return int(ms) if ms == int(ms) else ms


def _faults(text: str | None, arbiter: str | None) -> list[str]:
    """The fault kinds asked for (default: all of the mode's), checked against the mode:
    the split-brain faults with --arbiter, the outage and disturbance faults without."""
    if arbiter is None:
        known, default = list(FAULTS), OUTAGE_FAULTS
    elif arbiter == "etcd":
        known = default = list(bench_group.FAULTS)
    else:
        known = [k for k, f in splitbrain.FAULTS.items()
                 if arbiter == "witness" or not f.witness]
        default = known
    if text is None:
        return default
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in known]
    if bad or not kinds:
        mode = f"with --arbiter {arbiter}" if arbiter else "without --arbiter"
        raise ValueError(f"unknown fault(s) {', '.join(bad) or '(none)'} {mode}; choose "
                         f"from {', '.join(known)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.bench_failover",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials per fault (default 20)")
    ap.add_argument("--faults", default=None,
                    help=f"comma-separated fault kinds: {', '.join(FAULTS)} (default "
                         f"{','.join(OUTAGE_FAULTS)}); with --arbiter: "
                         f"{', '.join(splitbrain.FAULTS)} (default: all; the witness-* "
                         f"ones need a witness)")
    ap.add_argument("--arbiter", choices=("none", "witness", "etcd"), default=None,
                    help="run the split-brain faults (issue 12) on a pair with this "
                         "arbiter; etcd: the group faults (issue 13) on three nodes")
    ap.add_argument("--movers", choices=("netlink", "aws"), default="netlink",
                    help="aws: kill trials of a pair with movers [netlink, aws] against an "
                         "EC2 emulator in the lab (issue 14)")
    ap.add_argument("--ttl", default="1s", help="with --arbiter etcd: the etcd lease TTL "
                                                "(default 1s)")
    ap.add_argument("--fence", choices=("none", "kernel"), default=None,
                    help="the nodes' fence (default: vipd's, kernel with a witness)")
    ap.add_argument("--pause", type=float, default=5.0,
                    help="seconds pause-standby and pause-active freeze a daemon (default 5)")
    ap.add_argument("--idle-seconds", type=float, default=30.0,
                    help="idle CPU/RSS sampling time, 0 to skip (default 30)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault phases")
    ap.add_argument("--interval", default=None,
                    help="heartbeat interval, e.g. 100ms (default: vipd's, 40ms)")
    ap.add_argument("--dead-after", type=int, default=None,
                    help="missed heartbeats before the peer is dead (default: vipd's, 8)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    if args.trials < 1:
        ap.error("--trials must be at least 1")
    if args.pause <= 0:
        ap.error("--pause must be positive")
    try:
        args.faults = _faults(args.faults, args.arbiter)
    except ValueError as exc:
        ap.error(str(exc))
    if args.arbiter == "witness" and args.fence == "none":
        ap.error("a witness needs --fence kernel (vipd refuses an arbiter without it)")
    if os.geteuid() != 0:
        log("bench_failover: needs root (it creates network namespaces)")
        return 1
    if args.arbiter == "etcd":
        return group_main(args)
    if args.movers == "aws":
        return cloud_main(args)

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    # SIGTERM like Ctrl-C, so the finally blocks below take the lab down.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-bench-"))
    started = time.monotonic()
    results: dict[str, list[Trial]] = {}
    disturbed: dict[str, list[disturb.Trial]] = {}
    split: dict[str, list[disturb.Trial]] = {}
    idle: dict[str, dict[str, float]] = {}
    idle_bare: dict[str, dict[str, float]] = {}
    hb = None
    prefixes: list[str] = []
    log(f"bench_failover: {args.trials} trials x {', '.join(args.faults)}; seed {seed}; "
        f"work dir {workdir}")
    try:
        for kind_no, kind in enumerate(args.faults):
            pair = PairLab.create(workdir / kind, interval=args.interval,
                                  dead_after=args.dead_after, arbiter=args.arbiter or "none",
                                  fence=args.fence,
                                  api=kind == "switchover" or args.arbiter is not None)
            prefixes.append(pair.lab.prefix)
            try:
                hb = load_config(pair.nodes[ACTIVE].config).pair
                if kind in disturb.DISTURBANCES and args.arbiter is None:
                    disturb.prepare(pair, kind)
                asker = Asker(pair)
                try:
                    if kind_no == 0 and args.idle_seconds > 0:
                        reset(pair, asker, hb.dead_interval)
                        kill_probe(pair)
                        log(f"idle: sampling both daemons for {args.idle_seconds:g} s")
                        idle = measure_idle(pair, args.idle_seconds)
                        log("idle: " + json.dumps(idle))
                        clear_daemons(pair)  # alone: no exec-check pair running beside
                        idle_bare = measure_idle_without_checks(workdir, args, prefixes)
                        log("idle without health checks: " + json.dumps(idle_bare))
                    if args.arbiter is not None:
                        split[kind] = fault_trials(
                            pair, asker, kind, args, hb.dead_interval, functools.partial(
                                splitbrain.run_trial, pair, kind, rng=rng,
                                interval=hb.interval, who=asker.who))
                    elif kind in disturb.DISTURBANCES:
                        disturbed[kind] = fault_trials(
                            pair, asker, kind, args, hb.dead_interval, functools.partial(
                                disturb.run_trial, pair, kind, rng=rng,
                                interval=hb.interval, pause=args.pause))
                    else:
                        results[kind] = outage_trials(pair, asker, kind, args, rng,
                                                      hb.interval, hb.dead_interval)
                finally:
                    asker.close()
            finally:
                pair.destroy()
    except KeyboardInterrupt:
        log("\ninterrupted: lab removed")
        return 130
    finally:
        left = [ns for ns in list_namespaces() if ns.startswith(tuple(prefixes))]
        if prefixes:
            log(f"namespaces of this run still present: {', '.join(left) or 'none'}")
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    assert hb is not None
    report: dict[str, Any] = {
        "trials": args.trials,
        "heartbeat": {"interval_ms": _num(hb.interval * 1000), "dead_after": hb.dead_after},
        "probe_interval_ms": _num(PROBE_EVERY * 1000),
        "faults": {kind: summarize(trials) for kind, trials in results.items()},
        "idle": idle,
        # the same pair with no health check (the lab's check is an exec every 100 ms)
        "idle_without_checks": idle_bare,
    }
    if split:
        report["arbiter"] = args.arbiter
        report["fence"] = args.fence or ("kernel" if args.arbiter == "witness" else "none")
        report["splitbrain"] = {
            kind: {"summary": splitbrain.summarize(trials),
                   "trials": [{"error": t.error, **t.detail} for t in trials]}
            for kind, trials in split.items()}
    if disturbed:
        report["pause_s"] = args.pause
        report["disturbances"] = {
            kind: {"summary": disturb.summarize(trials),
                   "trials": [{"error": t.error, **t.detail} for t in trials]}
            for kind, trials in disturbed.items()}
    runtime = time.monotonic() - started
    shown = {**report, "idle_seconds": args.idle_seconds, "disturbance_trials": disturbed,
             "splitbrain_trials": split}
    if args.json:
        print(json.dumps(report))
        log(table(shown))
    else:
        print(table(shown))
    if RESPONDER_DEATHS:
        log(f"responders that died and were restarted: {len(RESPONDER_DEATHS)} "
            f"({'; '.join(RESPONDER_DEATHS)})")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"runtime {runtime:.1f} s; seed {seed}; host load average now {load} on "
        f"{os.cpu_count()} CPUs (other work on the host adds timer jitter)")
    return 0


def cloud_main(args: argparse.Namespace) -> int:
    """--movers aws: kill trials of a pair moving the VIP in an EC2 emulator."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-bench-cloud-"))
    started = time.monotonic()
    trials: list[dict[str, Any]] = []
    log(f"bench_failover --movers aws: {args.trials} kill trials; work dir {workdir}")
    pair = PairLab.create(workdir / "pair", ipv6=False, roles=("cloud",))
    try:
        cloud = bench_cloud.start_cloud(pair)
        dead = load_config(pair.nodes[ACTIVE].config).pair.dead_interval
        asker = Asker(pair)
        try:
            for i in range(1, args.trials + 1):
                try:
                    reset(pair, asker, dead)
                except RuntimeError as exc:
                    trial = {"error": f"no stable pair: {exc}"}
                else:
                    try:
                        trial = bench_cloud.run_trial(pair, cloud, i)
                    finally:
                        kill_probe(pair)
                trials.append(trial)
                log(f"kill #{i:<3} {json.dumps(trial)}")
        finally:
            asker.close()
    except KeyboardInterrupt:
        log("\ninterrupted: lab removed")
        return 130
    finally:
        pair.destroy()
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = bench_cloud.summarize(trials)
    text = bench_cloud.table(summary)
    if args.json:
        print(json.dumps({"trials": trials, "summary": summary}))
        log(text)
    else:
        print(text)
    log(f"runtime {time.monotonic() - started:.1f} s")
    return 0


def group_main(args: argparse.Namespace) -> int:
    """--arbiter etcd: the group faults of `simulations.bench_group`, one lab per fault."""
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-bench-group-"))
    started = time.monotonic()
    results: dict[str, list[disturb.Trial]] = {}
    prefixes: list[str] = []
    log(f"bench_failover --arbiter etcd: {args.trials} trials x {', '.join(args.faults)}; "
        f"ttl {args.ttl}; seed {seed}; work dir {workdir}")
    try:
        for kind in args.faults:
            pair = PairLab.create(workdir / kind, arbiter="etcd", api=True, ipv6=False,
                                  ttl=args.ttl)
            prefixes.append(pair.lab.prefix)
            try:
                pair.start_etcd()
                asker = Asker(pair)
                try:
                    trials = []
                    for i in range(1, args.trials + 1):
                        try:
                            bench_group.reset(pair, asker.who, functools.partial(
                                kill_probe, pair), functools.partial(revive_responders, pair))
                        except RuntimeError as exc:
                            t = disturb.Trial(kind, i, error=f"no stable group: {exc}")
                        else:
                            try:
                                t = bench_group.run_trial(pair, kind, i, rng, asker.who)
                            finally:
                                kill_probe(pair)
                        trials.append(t)
                        log(bench_group.trial_line(t))
                    results[kind] = trials
                finally:
                    asker.close()
            finally:
                pair.destroy()
    except KeyboardInterrupt:
        log("\ninterrupted: lab removed")
        return 130
    finally:
        left = [ns for ns in list_namespaces() if ns.startswith(tuple(prefixes))]
        log(f"namespaces of this run still present: {', '.join(left) or 'none'}")
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = bench_group.table(results, args.ttl)
    if args.json:
        print(json.dumps({"trials": args.trials, "arbiter": "etcd", "ttl": args.ttl,
                          "group": bench_group.report(results)}))
        log(text)
    else:
        print(text)
    log(f"runtime {time.monotonic() - started:.1f} s; seed {seed}; host load average now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
