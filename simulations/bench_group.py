"""The group faults of issue 13 on the real kernel: three vipd nodes on a 3-member etcd.

    python -m simulations.bench_failover --arbiter etcd --trials 20

Run by `bench_failover --arbiter etcd` (the same ARP and UDP oracles as the split-brain
faults, `simulations.splitbrain`). The lab is `PairLab.create(arbiter="etcd")`: node1..3
(priorities 150, 120, 100, no preemption), the client, and etcd1..3 (one member each).
Before every trial all daemons are SIGKILLed and their VIPs deleted, the links healed,
every etcd member is running and healthy, and the group is started again (node1 first,
so it claims the key) with the UDP probe; the trial begins once node1 alone holds the
VIP and answers the client and node2 and node3 are STANDBY. The ARP oracle (every 10 ms)
records every MAC that answers for the VIP and samples the three nodes' kernel gates
every 2 ms.

Faults (node1 is the holder):

* kill: kill -9 of node1's daemon and service; node2 (the next priority) takes over when
  etcd expires node1's lease.
* isolate-holder: node1 cut off at the switch from etcd1..3 and from node2 and node3
  (the client still reaches it) for HOLD s: node1 must shut its gate at the end of its
  lease as it counts it (self-fence), node2 takes over after etcd expires that lease.
* stop: SIGTERM to node1 (graceful: it resigns naming node2, which claims at once).
* switchover: POST /v1/switchover to node1 with ``to: node3``.
* etcd-leader-kill: kill -9 of etcd's leader for HOLD s, then restarted: no VIP move.
* etcd-quorum-lost: two etcd members (the leader among them) killed for HOLD s: node1
  self-fences at its lease end and nobody holds; then "etcd back": the members are
  restarted and a node holds the VIP again (recovery measured from the restart).

Per trial: the client-visible failover (first run of unanswered UDP requests from the
fault), ms with two MACs answering, ms with two gates open, VIP moves, who holds at the
end, and for the self-fencing faults how long after the fault node1's gate shut.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulations import disturb
from simulations.arpwatch import ArpWatch, Observations
from vipd.demo.pairlab import VIP4, PairLab, failed_runs, outage

HOLDER, NEXT, LAST = "node1", "node2", "node3"
BASELINE = 0.5
HOLD = 3.0  # how long a partition or an etcd outage lasts (3 TTLs)
AFTER = 1.0  # watched after the fault is undone
TAKEOVER_TIMEOUT = 10.0
STALE_TIMEOUT = 8.0  # vip_lease (3 s) + margin: a killed node's address goes by then
START_LEAD = 0.3


@dataclass(frozen=True)
class Fault:
    text: str
    final: str | None  # who must hold the VIP at the end (None: anyone, but one)
    moves: int | None  # how many moves are expected (None: not checked)


FAULTS = {
    "kill": Fault("kill -9 of node1's daemon and service", NEXT, 1),
    "isolate-holder": Fault("node1 cut off from etcd and from node2 and node3 (not from "
                            "the client)", NEXT, 1),
    "stop": Fault("SIGTERM to node1's daemon (graceful stop)", NEXT, 1),
    "switchover": Fault("POST /v1/switchover to node1 with to: node3", LAST, 1),
    "etcd-leader-kill": Fault("kill -9 of etcd's leader, restarted after the hold", HOLDER, 0),
    "etcd-quorum-lost": Fault("two etcd members killed (the leader among them), restarted "
                              "after the hold", None, None),
}


def log(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


# --- etcd from the client namespace (HTTP, no gRPC in this process) -----------------------

def _is_leader(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=1) as r:
            return any(line.strip() == "etcd_server_is_leader 1"
                       for line in r.read().decode().splitlines())
    except (urllib.error.URLError, OSError):
        return False


def etcd_leader(pair: PairLab) -> str:
    assert pair.etcd is not None
    urls = {m.name: m.client_url for m in pair.etcd.members}
    for _ in range(50):
        for name, url in urls.items():
            if pair.lab["client"].run(_is_leader, url):
                return name
        time.sleep(0.1)
    raise RuntimeError("no etcd member says it is the leader")


def etcd_up(pair: PairLab) -> None:
    """Every member running and the cluster healthy (a member killed by a fault is
    started again on its data)."""
    assert pair.etcd is not None
    for member in pair.etcd.members:
        if member.proc is None or member.proc.poll() is not None:
            pair.etcd.restart(member.name)
    if not pair.etcd.wait_healthy(15):
        raise RuntimeError("etcd is not healthy")


# --- a stable group -----------------------------------------------------------------------

def clear(pair: PairLab) -> None:
    """SIGKILL every daemon (not the responders) and delete any VIP they left."""
    for name in pair.nodes:
        pair.kill(name, with_service=False)
        host = pair.host(name)
        info = host.address(VIP4)
        if info is not None:
            host.ip("addr", "del", f"{VIP4}/{info['prefixlen']}", "dev", "eth0", check=False)


def reset(pair: PairLab, who: Callable[[], str | None], kill_probe: Callable[[], None],
          revive: Callable[[], None]) -> None:
    problem = ""
    for attempt in range(1, 4):
        kill_probe()
        clear(pair)
        revive()
        pair.heal()
        for name in pair.nodes:
            pair.set_health(name, True)
        etcd_up(pair)
        problem = _start_stable(pair, who)
        if not problem:
            return
        log(f"  reset attempt {attempt} failed: {problem}")
    kill_probe()
    raise RuntimeError(f"cannot get a stable group with {HOLDER} holding: {problem}")


def _start_stable(pair: PairLab, who: Callable[[], str | None]) -> str:
    seen = {n: len(pair.log_lines(n)) if pair.nodes[n].log.exists() else 0
            for n in pair.nodes}

    def lines(name: str) -> list[str]:
        return pair.log_lines(name)[seen[name]:]

    pair.start(HOLDER)
    time.sleep(START_LEAD)
    for name in (NEXT, LAST):
        pair.start(name)
    try:
        pair.start_probe(every=0.005)
    except RuntimeError as exc:
        return str(exc)
    # node1 may wait for the key of the killed daemons' leases to expire (one TTL)
    if not pair.wait_for(lambda: pair.holders() == [HOLDER], 10.0):
        return f"{HOLDER} did not become the only holder (holders {pair.holders()})"
    if not pair.wait_for(lambda: all(any("-> STANDBY" in ln for ln in lines(n))
                                     for n in (NEXT, LAST)), 10.0):
        return "node2 and node3 did not reach STANDBY"
    time.sleep(0.5)
    if any("-> ACTIVE" in ln for n in (NEXT, LAST) for ln in lines(n)):
        return "node2 or node3 went active after starting"
    if pair.holders() != [HOLDER]:
        return f"holders {pair.holders()} instead of [{HOLDER}]"
    if not pair.wait_for(lambda: who() == HOLDER, 3.0, step=0.01):
        return f"the client does not get answers from {HOLDER}"
    return ""


# --- one trial ----------------------------------------------------------------------------

def _inject(pair: PairLab, fault: str) -> list[str]:
    """The fault; returns the etcd members it killed."""
    assert pair.etcd is not None
    if fault == "kill":
        pair.kill(HOLDER)
    elif fault == "isolate-holder":
        for other in (*pair.etcd_hosts, NEXT, LAST):
            pair.block(HOLDER, other)
    elif fault == "stop":
        pair.stop(HOLDER)
    elif fault == "switchover":
        code = pair.switchover(HOLDER, to=LAST)
        if code != 200:
            raise RuntimeError(f"switchover refused with HTTP {code}")
    elif fault in ("etcd-leader-kill", "etcd-quorum-lost"):
        leader = etcd_leader(pair)
        killed = [leader]
        if fault == "etcd-quorum-lost":
            killed.append(next(m.name for m in pair.etcd.members if m.name != leader))
        for name in killed:
            pair.etcd.kill(name)
        return killed
    else:
        raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
    return []


def run_trial(pair: PairLab, fault: str, index: int, rng: random.Random,
              who: Callable[[], str | None]) -> disturb.Trial:
    """One fault of a stable group with the UDP probe running (stops the probe)."""
    spec = FAULTS[fault]
    trial = disturb.Trial(fault, index)
    tails = {name: disturb.log_tail(pair, name) for name in pair.nodes}
    try:
        watch = ArpWatch.start(pair, VIP4)
    except RuntimeError as exc:
        trial.error = str(exc)
        return trial
    start = time.time()
    fault_at = back_at = ended = start
    killed: list[str] = []
    try:
        time.sleep(BASELINE + rng.uniform(0, 0.25))  # a random phase of the keep-alives
        fault_at = time.time()
        killed = _inject(pair, fault)
        if spec.final is not None and spec.final != HOLDER:
            pair.wait_for(lambda: spec.final in pair.holders() and who() == spec.final,
                          TAKEOVER_TIMEOUT, step=0.005)
        if fault in ("isolate-holder", "etcd-leader-kill", "etcd-quorum-lost"):
            time.sleep(max(0.0, fault_at + HOLD - time.time()))
        ended = time.time()
        pair.heal()
        if killed:
            back_at = time.time()
            etcd_up(pair)
            pair.wait_for(lambda: who() is not None, TAKEOVER_TIMEOUT, step=0.005)
        if fault == "kill":
            # the killed node's address stays until its lifetime runs out (its gate is
            # shut): watch its kernel until then
            pair.wait_for(lambda: HOLDER not in pair.holders(), STALE_TIMEOUT, 0.02)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        trial.error = f"{fault} failed: {exc!r}"
    finally:
        def settle() -> None:
            pair.heal()
            time.sleep(AFTER)

        obs, samples = disturb.collect(pair, watch, trial, settle)
    if trial.error:
        return trial
    macs = {pair.host(name).mac: name for name in pair.nodes}
    trial.detail = {**measure(obs, samples, start, fault_at, back_at if killed else None,
                              time.time(), macs),
                    "fault_ms": _ms(ended - fault_at), "etcd_killed": killed}
    trial.detail["tracebacks"] = [f"{name}: {line}" for name, tail in tails.items()
                                  for line in disturb.tracebacks(tail())]
    trial.detail["unexpected"] = unexpected(fault, trial.detail)
    return trial


def measure(obs: Observations, samples: list[tuple[float, str | None]], start: float,
            fault_at: float, back_at: float | None, end: float, macs: dict[str, str]
            ) -> dict[str, Any]:
    points = obs.holders(start, end)
    gap, _ = outage(samples, fault_at)
    holder_gate = obs.gate_open(HOLDER, fault_at, end)
    # the first moment after the fault that node1's gate is shut
    shut = next((hi for lo, hi in holder_gate if lo <= fault_at + 1e-6), fault_at)
    after_back = None
    if back_at is not None:
        answered = [t for t, node in samples if t >= back_at and node is not None]
        after_back = _ms(answered[0] - back_at) if answered else None
    return {
        "failover_ms": None if gap == float("inf") else _ms(gap),
        "longest_unanswered_ms": _ms(max((r for r in failed_runs(samples, fault_at)
                                          if r != float("inf")), default=0.0)),
        "two_macs_ms": _ms(sum(nxt - t for t, nxt, seen in obs.rounds(start, end)
                               if len(seen) >= 2)),
        "both_gates_ms": _ms(sum(hi - lo for lo, hi in obs.gates_open_together(start, end))),
        "gate_samples": {node: len(s) for node, s in obs.gates.items()},
        "holder_gate_shut_ms": _ms(shut - fault_at),
        "moves": disturb.moves(points),
        "final_holders": sorted(points[-1][1]),
        "answered_after_etcd_back_ms": after_back,
    }


def unexpected(fault: str, d: dict[str, Any]) -> str:
    """Why a trial missed what the design promises, or ""."""
    spec, problems = FAULTS[fault], []
    if d["two_macs_ms"]:
        problems.append(f"two MACs answered for {d['two_macs_ms']:g} ms")
    if d["both_gates_ms"]:
        problems.append(f"two gates open for {d['both_gates_ms']:g} ms")
    if spec.final is not None and d["final_holders"] != [spec.final]:
        problems.append(f"ends with holders {d['final_holders']}, not [{spec.final}]")
    if spec.final is None and len(d["final_holders"]) != 1:
        problems.append(f"ends with holders {d['final_holders']}, not one node")
    if spec.moves is not None and d["moves"] != spec.moves:
        problems.append(f"{d['moves']} VIP moves, expected {spec.moves}")
    return "; ".join(problems)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- summary and table ---------------------------------------------------------------------

def summarize(trials: list[disturb.Trial]) -> dict[str, Any]:
    ok = [t.detail for t in trials if not t.error]

    return {
        "n": len(ok), "failed": len(trials) - len(ok),
        "failover_ms": disturb.spread(ok, "failover_ms"),
        "no_failover": sum(1 for d in ok if d["failover_ms"] is None),
        "longest_unanswered_ms": disturb.spread(ok, "longest_unanswered_ms"),
        "two_macs_ms": disturb.spread(ok, "two_macs_ms"),
        "both_gates_ms": disturb.spread(ok, "both_gates_ms"),
        "holder_gate_shut_ms": disturb.spread(ok, "holder_gate_shut_ms"),
        "answered_after_etcd_back_ms": disturb.spread(ok, "answered_after_etcd_back_ms"),
        "moves_max": max((d["moves"] for d in ok), default=None),
        "trials_with_move": sum(1 for d in ok if d["moves"]),
        "unexpected": [d["unexpected"] for d in ok if d["unexpected"]],
        "tracebacks": sum(len(d["tracebacks"]) for d in ok),
        "errors": [t.error for t in trials if t.error],
    }


HEADER = ("| fault | n | failover ms median / max | two MACs ms median / max "
          "| two gates open ms median / max | trials with a move (max moves) "
          "| node1 gate shut after ms median / max | answered after etcd back ms "
          "median / max | as expected | tracebacks |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
SHUT_SHOWN = ("isolate-holder", "etcd-quorum-lost", "kill")


def row(fault: str, s: dict[str, Any]) -> str:
    def both(key: str) -> str:
        return disturb.median_max(s, key)

    failover = both("failover_ms") + (f" (none in {s['no_failover']})"
                                      if s["no_failover"] else "")
    failed = f" ({s['failed']} failed)" if s["failed"] else ""
    shut = both("holder_gate_shut_ms") if fault in SHUT_SHOWN else "-"
    back = both("answered_after_etcd_back_ms") if fault == "etcd-quorum-lost" else "-"
    return (f"| {fault} | {s['n']}{failed} | {failover} | {both('two_macs_ms')} "
            f"| {both('both_gates_ms')} | {s['trials_with_move']} "
            f"({'-' if s['moves_max'] is None else s['moves_max']}) | {shut} | {back} "
            f"| {s['n'] - len(s['unexpected'])} of {s['n']} | {s['tracebacks']} |")


def table(results: dict[str, list[disturb.Trial]], ttl: str) -> str:
    lines = [f"group faults: 3 vipd nodes, 3-member etcd, ttl {ttl} (ARP probe every 10 ms, "
             f"gates sampled every 2 ms, UDP probe every 5 ms)", "", HEADER]
    summaries = {kind: summarize(trials) for kind, trials in results.items()}
    lines += [row(kind, s) for kind, s in summaries.items()]
    for kind, s in summaries.items():
        lines += [f"* {kind}: unexpected: {u}" for u in s["unexpected"]]
        lines += [f"* {kind}: error: {e}" for e in s["errors"]]
    return "\n".join(lines)


def report(results: dict[str, list[disturb.Trial]]) -> dict[str, Any]:
    return {kind: {"summary": summarize(trials),
                   "trials": [{"error": t.error, **t.detail} for t in trials]}
            for kind, trials in results.items()}


def trial_line(t: disturb.Trial) -> str:
    shown = {k: v for k, v in t.detail.items() if k != "tracebacks" or v}
    return (f"{t.fault:<18} #{t.index:<3} {'FAILED: ' + t.error if t.error else 'ok'}  "
            f"{json.dumps(shown)}")
