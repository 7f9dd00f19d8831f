"""The fault campaign of issue 15: what a client sees on the real kernel while a pair
suffers loss, delay, partitions, freezes, restart storms, crash loops, clock steps, a
deleted VIP, a flapping health check, a bad reload, a key rotation, a double restart.

    python -m simulations.faults [--trials N] [--faults a,b,...] [--arbiter none|witness]
                                 [--seed S] [--json]

Needs root: every fault row gets its own `vipd.demo.pairlab.PairLab` (namespaces with a
unique prefix, documentation addresses only), deleted when the row ends, on an error and
on Ctrl-C or SIGTERM; at the end the run lists any namespace of its prefixes still there.
The pair runs as an operator would try it: ``preempt: true``, node1 preferred (priority
150, node2 100), vipd's defaults otherwise (heartbeat 40 ms x 8, flap damping as
shipped); with ``--arbiter witness`` a witness host and the kernel fence.

Each trial starts from the stable pair `bench_failover.reset` leaves (both daemons
killed and started again, node1 active, node2 standby, the UDP probe running), starts
the ARP oracle (`simulations.arpwatch`: an ARP request for the VIP every 10 ms and every
MAC that answers, the VIP's presence on each node from netlink), waits BASELINE s plus a
random phase of the heartbeat timer, does the fault (`simulations.faultinject.FAULTS`),
undoes it, waits until one node alone has held the VIP for STABLE s (at most
SETTLE_TIMEOUT s) and watches AFTER s more. Per trial (ms):

* single holder: from the end of the fault to the moment from which one node alone held
  the VIP until the end of the trial (0: it never stopped being so; none: two or no
  holders at the end);
* two MACs: the total length of the ARP rounds answered by two MACs (the whole trial);
* moves: how often the sole holder changed (`disturb.moves`; node1, both, node1 is none);
* nobody answered: the longest run of ARP rounds nobody answered, not counting rounds
  while no node could serve (both daemons down: the double restart's kill-to-start);
* client unanswered: the longest run of unanswered UDP requests from the fault on;
* tracebacks: the exception line of every traceback in the daemons' logs.

"Done when" of the issue is checked per trial: without an arbiter the rows marked quiet
(one-way active-deaf, delay, restart storm of the standby, bad reload, key rotation,
restart of both) must show 0 ms of two MACs and 0 moves, health flapping and the crash
loop at most 2 moves; with a witness every row 0 ms of two MACs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from simulations import bench_failover, disturb, faultinject
from simulations.arpwatch import ArpWatch, Observations
from simulations.faultinject import ACTIVE, FAULTS, Run
from vipd.config import load_config
from vipd.demo.lab import list_namespaces
from vipd.demo.pairlab import VIP4, PairLab

BASELINE = 0.5
STABLE = 1.0  # one holder for this long ends the settling
SETTLE_TIMEOUT = 8.0  # a killed daemon's address lives 3 s (vip_lease): well within
AFTER = 1.0
log = bench_failover.log


# --- one trial ---------------------------------------------------------------------------

def run_trial(pair: PairLab, fault: str, index: int, rng: random.Random,
              interval: float) -> disturb.Trial:
    """One fault of a stable pair with the UDP probe running (stops the probe)."""
    spec = FAULTS[fault]
    trial = disturb.Trial(fault, index)
    tails = {name: disturb.log_tail(pair, name) for name in pair.nodes}
    run = Run(pair, rng, rng.randrange(1 << 31))
    try:
        watch = ArpWatch.start(pair, VIP4)
    except RuntimeError as exc:
        trial.error = str(exc)
        return trial
    start = time.time()
    fault_at = ended = start
    try:
        time.sleep(BASELINE + rng.uniform(0, interval))
        fault_at = time.time()
        spec.act(run)
        ended = time.time()
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as exc:
        trial.error = f"{fault} failed: {exc!r}"
    finally:
        def settle() -> None:
            faultinject.undo(run)
            run.extra["settled_one_holder"] = settle_single(pair)
            time.sleep(AFTER)

        obs, samples = disturb.collect(pair, watch, trial, settle)
    if trial.error:
        return trial
    macs = {pair.host(name).mac: name for name in pair.nodes}
    trial.detail = {**measure(obs, samples, start, fault_at, ended, time.time(), macs,
                              run.unhealthy), **run.extra}
    trial.detail["tracebacks"] = [f"{name}: {line}" for name, tail in tails.items()
                                  for line in disturb.tracebacks(tail())]
    trial.detail["unmet"] = unmet(fault, trial.detail, pair.witness_config is not None)
    return trial


def settle_single(pair: PairLab) -> bool:
    """Wait until one node alone has held the VIP for STABLE s (SETTLE_TIMEOUT at most)."""
    end = time.monotonic() + SETTLE_TIMEOUT
    since = None
    while time.monotonic() < end:
        if len(pair.holders()) == 1:
            since = since or time.monotonic()
            if time.monotonic() - since >= STABLE:
                return True
        else:
            since = None
        time.sleep(0.05)
    return False


# --- what the observations say -----------------------------------------------------------

def measure(obs: Observations, samples: list[tuple[float, str | None]], start: float,
            fault_at: float, ended: float, end: float, macs: dict[str, str],
            unhealthy: list[tuple[float, float]]) -> dict[str, Any]:
    """The per-trial quantities of the module docstring."""
    points = obs.holders(start, end)
    rounds = obs.rounds(start, end)
    single = single_holder_since(points, ended)
    client, _ = disturb.longest_unanswered(samples, fault_at)
    return {
        "single_holder_ms": None if single is None else _ms(single),
        "two_macs_ms": _ms(sum(nxt - t for t, nxt, seen in rounds if len(seen) >= 2)),
        "moves": disturb.moves(points),
        "nobody_ms": _ms(longest_nobody(rounds, unhealthy)),
        "client_unanswered_ms": _ms(client),
        "final_holders": sorted(points[-1][1]),
        "holders": [[_ms(t - fault_at), sorted(held)] for t, held in points],
        "answered_by": sorted({macs.get(m, m) for _, _, seen in rounds for m in seen}),
        "fault_ms": _ms(ended - fault_at),
    }


def single_holder_since(points: list[tuple[float, frozenset[str]]], ended: float
                        ) -> float | None:
    """Seconds from ``ended`` until one node alone held the VIP for good (0 if it already
    did at ``ended``); None if the last holder set is not a single node."""
    if len(points[-1][1]) != 1:
        return None
    return max(points[-1][0] - ended, 0.0)


def longest_nobody(rounds: list[tuple[float, float, set[str]]],
                   unhealthy: list[tuple[float, float]]) -> float:
    """The longest run of ARP rounds nobody answered, in seconds (from the first such
    round to the next answered one, or the end of the last); a round that overlaps an
    ``unhealthy`` span (no node could serve) ends a run and counts for none."""
    longest = 0.0
    since: float | None = None
    for t, nxt, seen in rounds:
        excused = any(lo < nxt and t < hi for lo, hi in unhealthy)
        if seen or excused:
            if since is not None:
                longest = max(longest, t - since)
            since = None
        elif since is None:
            since = t
    if since is not None and rounds:
        longest = max(longest, rounds[-1][1] - since)
    return longest


def unmet(fault: str, d: dict[str, Any], witness: bool) -> str:
    """What of the issue's "Done when" this trial misses, or ""."""
    spec = FAULTS[fault]
    problems = []
    if (witness or spec.quiet) and d["two_macs_ms"]:
        problems.append(f"two MACs answered for {d['two_macs_ms']:g} ms")
    if not witness and spec.quiet and d["moves"]:
        problems.append(f"{d['moves']} moves")
    if not witness and spec.max_moves is not None and d["moves"] > spec.max_moves:
        problems.append(f"{d['moves']} moves (at most {spec.max_moves})")
    if d["single_holder_ms"] is None:
        problems.append(f"holders {d['final_holders']} at the end")
    return "; ".join(problems)


def checked(fault: str, witness: bool) -> bool:
    """Whether the issue's "Done when" says something about this row."""
    spec = FAULTS[fault]
    return witness or spec.quiet or spec.max_moves is not None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- summary and table -------------------------------------------------------------------

def summarize(fault: str, trials: list[disturb.Trial], witness: bool) -> dict[str, Any]:
    ok = [t.detail for t in trials if not t.error]
    return {
        "n": len(ok), "failed": len(trials) - len(ok),
        **{key: disturb.spread(ok, key) for key in (
            "single_holder_ms", "two_macs_ms", "moves", "nobody_ms",
            "client_unanswered_ms")},
        "no_single_holder": sum(1 for d in ok if d["single_holder_ms"] is None),
        "trials_with_move": sum(1 for d in ok if d["moves"]),
        "tracebacks": sum(len(d["tracebacks"]) for d in ok),
        "checked": checked(fault, witness),
        "met": sum(1 for d in ok if not d["unmet"]),
        "unmet": [f"#{t.index}: {t.detail['unmet']}" for t in trials
                  if not t.error and t.detail["unmet"]],
        "errors": [f"#{t.index}: {t.error}" for t in trials if t.error],
    }


HEADER = ("| fault | n | single holder after ms median / max | two MACs ms median / max "
          "| moves median / max (trials with a move) | nobody answered ms median / max "
          "| client unanswered ms median / max | tracebacks | done when |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(fault: str, s: dict[str, Any]) -> str:
    def both(key: str) -> str:
        return disturb.median_max(s, key)

    single = both("single_holder_ms") + (f" (none in {s['no_single_holder']})"
                                         if s["no_single_holder"] else "")
    failed = f" ({s['failed']} failed)" if s["failed"] else ""
    done = f"{s['met']} of {s['n']}" if s["checked"] else "-"
    return (f"| {fault} | {s['n']}{failed} | {single} | {both('two_macs_ms')} "
            f"| {both('moves')} ({s['trials_with_move']}) | {both('nobody_ms')} "
            f"| {both('client_unanswered_ms')} | {s['tracebacks']} | {done} |")


def table(summaries: dict[str, dict[str, Any]], arbiter: str) -> str:
    lines = [f"fault campaign, arbiter {arbiter}, preempt true (ARP probe every 10 ms, UDP "
             f"probe every 5 ms)", "", HEADER]
    lines += [row(kind, s) for kind, s in summaries.items()]
    for kind, s in summaries.items():
        lines += [f"* {kind}: unmet {u}" for u in s["unmet"]]
        lines += [f"* {kind}: error {e}" for e in s["errors"]]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------

def git_state() -> dict[str, Any]:
    """The commit the daemons import from (they start from this checkout) and whether
    vipd/ has uncommitted edits at this moment."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, check=False, timeout=30)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "vipd_uncommitted": git("status", "--porcelain", "--", "vipd").splitlines()}


def parse_faults(text: str | None) -> list[str]:
    if text is None:
        return list(FAULTS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULTS]
    if bad or not kinds:
        raise ValueError(f"unknown fault(s) {', '.join(bad) or '(none)'}; choose from "
                         f"{', '.join(FAULTS)}")
    return kinds


def fault_row(workdir: Path, kind: str, args: argparse.Namespace, rng: random.Random,
              prefixes: list[str]) -> list[disturb.Trial]:
    """args.trials trials of one fault on a lab of its own, deleted afterwards."""
    witness = args.arbiter == "witness"
    pair = PairLab.create(workdir / kind, preempt=True, arbiter=args.arbiter)
    prefixes.append(pair.lab.prefix)
    log(f"{kind}: lab {pair.lab.prefix}")
    try:
        saved = faultinject.prepare(pair, kind)
        hb = load_config(pair.nodes[ACTIVE].config).pair
        asker = bench_failover.Asker(pair)
        try:
            trial = functools.partial(run_trial, pair, kind, rng=rng, interval=hb.interval)

            def before() -> None:
                faultinject.restore(pair, saved)
                fresh_state(pair)
            trials = bench_failover.fault_trials(pair, asker, kind, args, hb.dead_interval,
                                                 trial, before)
            log(row(kind, summarize(kind, trials, witness)))
            return trials
        finally:
            asker.close()
    finally:
        pair.destroy()


def fresh_state(pair: PairLab) -> None:
    """Both daemons killed and their state directories removed before the reset starts
    them: each trial begins with two fresh nodes. The reset's own kill -9 would
    otherwise count as an unclean exit in node1's persisted flap-damping history and
    keep it from preempting in every later trial, whatever the fault."""
    bench_failover.clear_daemons(pair)
    for name in pair.nodes:
        shutil.rmtree(pair.workdir / f"state-{name}", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.faults",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5, help="trials per fault (default 5)")
    ap.add_argument("--faults", default=None,
                    help=f"comma-separated, default all: {', '.join(FAULTS)}")
    ap.add_argument("--arbiter", choices=("none", "witness"), default="none",
                    help="none (default) or a witness host with the kernel fence")
    ap.add_argument("--seed", type=int, default=None, help="seed of phases and forwarders")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = ap.parse_args(argv)
    if args.trials < 1:
        ap.error("--trials must be at least 1")
    try:
        kinds = parse_faults(args.faults)
    except ValueError as exc:
        ap.error(str(exc))
    if os.geteuid() != 0:
        log("faults: needs root (it creates network namespaces)")
        return 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="vipd-faults-"))
    started, at_start = time.monotonic(), git_state()
    witness = args.arbiter == "witness"
    results: dict[str, list[disturb.Trial]] = {}
    prefixes: list[str] = []
    left: list[str] = []
    log(f"faults: {args.trials} trials x {len(kinds)} faults, arbiter {args.arbiter}; seed "
        f"{seed}; commit {at_start['commit']}; work dir {workdir}")
    try:
        for kind in kinds:
            results[kind] = fault_row(workdir, kind, args, rng, prefixes)
    except KeyboardInterrupt:
        log("\ninterrupted: lab removed")
        return 130
    finally:
        left = [ns for ns in list_namespaces() if ns.startswith(tuple(prefixes))] \
            if prefixes else []
        log(f"namespaces of this run still present: {', '.join(left) or 'none'}")
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summaries = {kind: summarize(kind, trials, witness) for kind, trials in results.items()}
    runtime = time.monotonic() - started
    report = {
        "arbiter": args.arbiter, "trials": args.trials, "seed": seed,
        "runtime_s": round(runtime, 1), "git_start": at_start, "git_end": git_state(),
        "workdir": str(workdir), "prefixes": prefixes, "namespaces_left": left,
        "faults": {kind: {"text": FAULTS[kind].text, "summary": summaries[kind],
                          "trials": [{"index": t.index, "error": t.error, **t.detail}
                                     for t in trials]}
                   for kind, trials in results.items()},
    }
    text = table(summaries, args.arbiter)
    if args.json:
        print(json.dumps(report))
        log(text)
    else:
        print(text)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    log(f"runtime {runtime:.1f} s; seed {seed}; commit {at_start['commit']} -> "
        f"{report['git_end']['commit']}; host load average now {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
