"""The faults of issue 12, part 6, on the real kernel: does any fault make two nodes
answer for the VIP, and how long does a client go without an answer?

`bench_failover --arbiter witness|none` runs these; each trial starts from the stable
pair `bench_failover.reset` leaves (node1 active, node2 standby, the UDP probe running,
the witness up when there is one), starts the ARP oracle (`simulations.arpwatch`, which
also samples both nodes' kernel gates every 2 ms when they have a fence), waits
BASELINE s plus a random phase of the heartbeat timer, injects the fault on the pair
(node1 is the active), holds it, undoes it, watches AFTER s more and measures:

* failover: the client-visible outage from the fault (`vipd.demo.pairlab.outage`: the
  first run of unanswered UDP requests); None when the client was still unanswered at
  the end (the witness-stop-then-kill fault: no failover is the right outcome);
* two MACs: the total length of the ARP probe rounds answered by two MACs;
* both gates: the time both nodes' fence gates were open together (None: no fence);
* moves: how often the sole VIP holder changed (`disturb.moves`, from netlink);
* stale (kill): from the kill to the killed node's last ARP reply for the VIP;
* why (witness-stop-then-kill): what node2's /v1/status and /metrics say about its votes;
  self_fence (isolate-active): node1's vipd_self_fence_total and its state afterwards.

With a witness every fault has an expected outcome (`EXPECT`); a trial that misses it is
reported as unexpected, next to the numbers (an error is a trial that could not run).
"""

from __future__ import annotations

import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from simulations import disturb
from simulations.arpwatch import ArpWatch, Observations
from vipd.demo.pairlab import VIP4, PairLab, failed_runs, outage

ACTIVE, STANDBY = "node1", "node2"
BASELINE = 0.5
HOLD = 2.0  # how long a partition or a stopped witness lasts (6 dead intervals)
WITNESS_GONE = 1.2  # witness-stop-then-kill: from the stop to the kill (> its 1 s
# reachability window, so node2 already says the witness is unreachable)
AFTER = 1.0  # watched after the fault is undone
TAKEOVER_TIMEOUT = 10.0
STALE_TIMEOUT = 8.0  # vip_lease (3 s) + margin: the killed node's address goes by then


@dataclass(frozen=True)
class Fault:
    text: str
    takeover: bool  # expected with a witness: node2 ends up holding and answering
    witness: bool = False  # needs a witness
    pause: float = 0.0


FAULTS = {
    "partition-pair": Fault("the pair's link cut both ways; the witness reaches both",
                            False),
    "isolate-active": Fault("node1 (active) cut off from node2 and the witness", True),
    "isolate-standby": Fault("node2 (standby) cut off from node1 and the witness", False),
    "oneway-12": Fault("frames from node1 to node2 dropped (node2 stops hearing node1)",
                       False),
    "oneway-21": Fault("frames from node2 to node1 dropped (node1 stops hearing node2)",
                       False),
    "witness-stop": Fault("the witness stopped (SIGTERM)", False, witness=True),
    "witness-stop-then-kill": Fault(f"the witness stopped, {WITNESS_GONE:g} s later kill -9 "
                                    f"of node1: no failover possible", False, witness=True),
    "kill": Fault("kill -9 of node1's daemon and service", True),
    "pause-active-1s": Fault("SIGSTOP of node1's daemon for 1 s, then SIGCONT", True,
                             pause=1.0),
    "pause-active-5s": Fault("SIGSTOP of node1's daemon for 5 s, then SIGCONT", True,
                             pause=5.0),
    "switchover": Fault("POST /v1/switchover to node1", True),
    "stop": Fault("SIGTERM to node1's daemon (graceful stop)", True),
}


def _inject(pair: PairLab, fault: str) -> None:
    witness = pair.witness_config is not None
    if fault == "partition-pair":
        pair.block(ACTIVE, STANDBY)
    elif fault in ("isolate-active", "isolate-standby"):
        node = ACTIVE if fault == "isolate-active" else STANDBY
        pair.block(node, STANDBY if node == ACTIVE else ACTIVE)
        if witness:
            pair.block(node, "witness")
    elif fault == "oneway-12":
        pair.block(ACTIVE, STANDBY, oneway=True)
    elif fault == "oneway-21":
        pair.block(STANDBY, ACTIVE, oneway=True)
    elif fault == "witness-stop":
        pair.stop_witness()
    elif fault == "witness-stop-then-kill":
        pair.kill(ACTIVE)  # the witness was stopped WITNESS_GONE s before (run_trial)
    elif fault == "kill":
        pair.kill(ACTIVE)
    elif fault.startswith("pause-active"):
        pair.pause(ACTIVE)
    elif fault == "switchover":
        code = pair.switchover(ACTIVE)
        if code != 200:
            raise RuntimeError(f"switchover refused with HTTP {code}")
    elif fault == "stop":
        pair.stop(ACTIVE)
    else:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")


def _undo(pair: PairLab) -> None:
    """After an error too: no partition stays, no daemon stays frozen."""
    pair.heal()
    for node in pair.nodes.values():
        if node.daemon is not None and node.daemon.poll() is None:
            pair.resume(node.name)


def run_trial(pair: PairLab, fault: str, index: int, rng: random.Random, interval: float,
              who: Callable[[], str | None]) -> disturb.Trial:
    """One fault of a stable pair with the UDP probe running (stops the probe);
    ``who`` asks the VIP from the client which node answers."""
    spec = FAULTS[fault]
    trial = disturb.Trial(fault, index)
    tails = {name: disturb.log_tail(pair, name) for name in pair.nodes}
    try:
        watch = ArpWatch.start(pair, VIP4)
    except RuntimeError as exc:
        trial.error = str(exc)
        return trial
    start = time.time()
    fault_at = ended = start
    extra: dict[str, Any] = {}
    try:
        if fault == "witness-stop-then-kill":
            pair.stop_witness()
            time.sleep(WITNESS_GONE)
        time.sleep(BASELINE + rng.uniform(0, interval))
        fault_at = time.time()
        _inject(pair, fault)
        took = None
        if spec.takeover:
            took = pair.wait_for(lambda: STANDBY in pair.holders() and who() == STANDBY,
                                 TAKEOVER_TIMEOUT, step=0.005)
            extra["takeover_confirmed_ms"] = _ms(time.time() - fault_at) if took else None
        hold = spec.pause or (HOLD if not spec.takeover or fault.startswith("isolate")
                              else 0.0)
        time.sleep(max(0.0, fault_at + hold - time.time()))
        extra.update(_explain(pair, fault))
        ended = time.time()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        trial.error = f"{fault} failed: {exc!r}"
    finally:
        def settle() -> None:
            _undo(pair)
            if fault in ("kill", "witness-stop-then-kill"):
                # the killed node's address stays until its lifetime runs out: watch its
                # kernel until then (without a fence it answers ARP all that time)
                pair.wait_for(lambda: ACTIVE not in pair.holders(), STALE_TIMEOUT, 0.02)
            time.sleep(AFTER)

        obs, samples = disturb.collect(pair, watch, trial, settle)
    if trial.error:
        return trial
    macs = {pair.host(name).mac: name for name in pair.nodes}
    trial.detail = {**measure(obs, samples, start, fault_at, time.time(), macs,
                              fenced=pair.fence_table is not None), **extra,
                    "fault_ms": _ms(ended - fault_at)}
    trial.detail["tracebacks"] = [f"{name}: {line}" for name, tail in tails.items()
                                  for line in disturb.tracebacks(tail())]
    if pair.witness_config is not None:
        trial.detail["unexpected"] = unexpected(fault, trial.detail)
    return trial


def _explain(pair: PairLab, fault: str) -> dict[str, Any]:
    """What the nodes say about the fault, read while it lasts."""
    if fault == "witness-stop-then-kill":
        return {"why": why(pair.status(STANDBY), pair.metrics(STANDBY))}
    if fault == "isolate-active" and pair.witness_config is not None:
        values = metric_values(pair.metrics(ACTIVE))
        return {"self_fence": values.get(("vipd_self_fence_total", "reason=votes_lost")),
                "old_active_state": pair.status(ACTIVE)["state"]}
    return {}


def metric_values(text: str) -> dict[tuple[str, str], float]:
    """Every sample of a /metrics page as (name, "label=value,...") -> value."""
    return {(s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def why(status: dict[str, Any], metrics: str) -> dict[str, Any]:
    """A standby's own account of why it does not take over: state, campaign, the votes
    it holds and needs, whether the witness answers."""
    values = metric_values(metrics)
    arbiter = status["arbiter"]
    return {
        "state": status["state"],
        "campaign": arbiter["campaign"],
        "votes": sorted(v["voter"] for v in arbiter["votes"]),
        "votes_held": values.get(("vipd_votes_held", "")),
        "votes_needed": values.get(("vipd_votes_needed", "")),
        "arbiter_reachable": [v for (name, _), v in values.items()
                              if name == "vipd_arbiter_reachable"],
    }


def measure(obs: Observations, samples: list[tuple[float, str | None]], start: float,
            fault_at: float, end: float, macs: dict[str, str], fenced: bool
            ) -> dict[str, Any]:
    """The per-trial quantities of the module docstring (ms)."""
    points = obs.holders(start, end)
    gap, _ = outage(samples, fault_at)
    killed_mac = next(mac for mac, name in macs.items() if name == ACTIVE)
    replies = [t for t, mac in obs.replies if mac == killed_mac and t >= fault_at]
    return {
        "failover_ms": None if gap == float("inf") else _ms(gap),
        "longest_unanswered_ms": _ms(max((r for r in failed_runs(samples, fault_at)
                                          if r != float("inf")), default=0.0)),
        "unanswered_at_end": bool(samples) and samples[-1][1] is None,
        "two_macs_ms": _ms(sum(nxt - t for t, nxt, seen in obs.rounds(start, end)
                               if len(seen) >= 2)),
        "both_gates_ms": _ms(sum(hi - lo for lo, hi in obs.gates_open_together(start, end)))
        if fenced else None,
        "gate_samples": {node: len(s) for node, s in obs.gates.items()},
        "moves": disturb.moves(points),
        "standby_held": any(STANDBY in s for _, s in disturb.points_from(points, fault_at)),
        "node1_last_reply_ms": _ms(max(replies) - fault_at) if replies else None,
        "final_holders": sorted(points[-1][1]),
    }


def unexpected(fault: str, d: dict[str, Any]) -> str:
    """Why a trial with a witness missed what the design promises, or ""."""
    problems = []
    if d["two_macs_ms"]:
        problems.append(f"two MACs answered for {d['two_macs_ms']:g} ms")
    if d["both_gates_ms"]:
        problems.append(f"both gates open for {d['both_gates_ms']:g} ms")
    if FAULTS[fault].takeover:
        if d.get("takeover_confirmed_ms") is None:
            problems.append(f"{STANDBY} did not take over")
        elif d["final_holders"] != [STANDBY]:
            problems.append(f"ends with holders {d['final_holders']}, not [{STANDBY}]")
    elif d["standby_held"] or d["moves"]:
        problems.append(f"{STANDBY} held the VIP ({d['moves']} moves)")
    return "; ".join(problems)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- summary and table ---------------------------------------------------------------

def summarize(trials: list[disturb.Trial]) -> dict[str, Any]:
    ok = [t.detail for t in trials if not t.error]

    # kill: from the kill to the killed node's last ARP reply (0: none after the kill)
    stale = [t.detail["node1_last_reply_ms"] or 0.0 for t in trials
             if not t.error and t.fault == "kill"]
    return {
        "n": len(ok), "failed": len(trials) - len(ok),
        "failover_ms": disturb.spread(ok, "failover_ms"),
        "no_failover": sum(1 for d in ok if d["failover_ms"] is None),
        "two_macs_ms": disturb.spread(ok, "two_macs_ms"),
        "both_gates_ms": disturb.spread(ok, "both_gates_ms"),
        "moves_max": max((d["moves"] for d in ok), default=None),
        "trials_with_move": sum(1 for d in ok if d["moves"]),
        "stale_ms": {"median": round(statistics.median(stale), 1) if stale else None,
                     "max": round(max(stale), 1) if stale else None},
        "unexpected": [d["unexpected"] for d in ok if d.get("unexpected")],
        "expected_checked": sum(1 for d in ok if "unexpected" in d),
        "why": [d["why"] for d in ok if "why" in d],
        "self_fence": [d["self_fence"] for d in ok if "self_fence" in d],
        "tracebacks": sum(len(d["tracebacks"]) for d in ok),
        "errors": [t.error for t in trials if t.error],
    }


HEADER = ("| fault | n | failover ms median / max | two MACs ms median / max "
          "| both gates open ms median / max | trials with a move (max moves) "
          "| stale VIP ms median / max | as expected | tracebacks |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(fault: str, s: dict[str, Any]) -> str:
    def both(key: str) -> str:
        return disturb.median_max(s, key)

    failover = both("failover_ms") + (f" (none in {s['no_failover']})"
                                      if s["no_failover"] else "")
    expected = (f"{s['expected_checked'] - len(s['unexpected'])} of {s['expected_checked']}"
                if s["expected_checked"] else "-")
    stale = both("stale_ms") if fault == "kill" else "-"
    failed = f" ({s['failed']} failed)" if s["failed"] else ""
    return (f"| {fault} | {s['n']}{failed} | {failover} | {both('two_macs_ms')} "
            f"| {both('both_gates_ms')} | {s['trials_with_move']} ({_cell(s['moves_max'])}) "
            f"| {stale} | {expected} | {s['tracebacks']} |")


def table(results: dict[str, list[disturb.Trial]], arbiter: str, fence: str) -> str:
    gates = "gates sampled every 2 ms" if fence == "kernel" else "no gates to sample"
    lines = [f"split-brain faults, arbiter {arbiter}, fence {fence} (ARP probe every 10 ms, "
             f"{gates}, UDP probe every 5 ms)", "", HEADER]
    summaries = {kind: summarize(trials) for kind, trials in results.items()}
    lines += [row(kind, s) for kind, s in summaries.items()]
    for kind, s in summaries.items():
        for w in s["why"]:
            lines.append(f"* {kind}: {STANDBY} {w['state']}, campaign {w['campaign']!r}, "
                         f"votes {w['votes']} ({_cell(w['votes_held'])} held of "
                         f"{_cell(w['votes_needed'])} needed), witness reachable "
                         f"{w['arbiter_reachable']}")
        if s["self_fence"]:
            lines.append(f"* {kind}: {ACTIVE}'s vipd_self_fence_total{{reason=votes_lost}} "
                         f"per trial: {s['self_fence']}")
        lines += [f"* {kind}: unexpected: {u}" for u in s["unexpected"]]
        lines += [f"* {kind}: error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
