"""Disturbances of a settled pair, measured with the ARP oracle (simulations.arpwatch).

The failover faults of bench_failover ask how long a client goes without an answer.
These ask whether a pair that should stay put ever has two nodes answering for the VIP,
moves it for no reason, or leaves clients pointed at the loser:

* ``pause-standby``: SIGSTOP of node2's daemon (the standby) for ``pause`` s, then
  SIGCONT. A standby that wakes up must not take the VIP nor announce it.
* ``pause-active``: SIGSTOP of node1's daemon (the active) for ``pause`` s, then
  SIGCONT. node2 takes over after the dead interval; the frozen node's kernel keeps its
  copy of the VIP until the lifetime runs out, and the node must not bring it back on
  waking. After a dual-active episode the winner must announce promptly.
* ``clock-step``: node2's wall clock CLOCK_STEP s ahead for STEP_HOLD s, then back
  (libfaketime in that one daemon; the host clock is never touched). A skewed clock must
  not become a split brain.

Each trial starts from the stable pair `bench_failover.reset` leaves (node1 active, the
UDP probe running), starts the oracle, waits BASELINE s plus a random phase of the
heartbeat timer, disturbs, and keeps watching AFTER s past the end of the disturbance
(the SIGCONT or the step back). Per trial, over that window (ms):

* dual-active: the total length of the oracle's ARP probe rounds (10 ms, from one
  request to the next) in which replies came from two MACs. ``after``: only the rounds
  from the end of the disturbance on (for pause-active: what happens on waking, apart
  from the frozen node's kernel answering while it sleeps).
* dual-holder: the time the netlink watches saw the VIP on both nodes (``after`` alike).
* moves: how often the sole holder changed; node1 alone, then both, then node2 alone
  is one move; node1, both, node1 is none.
* standby held / GARPs: whether node2 held the VIP at any moment from the fault on, and
  how many gratuitous ARPs for the VIP from node2's MAC reached the client.
* GARP after resolution: per dual-active episode (`arpwatch.Episode`), from the loser's
  last ARP reply to the winner's first gratuitous ARP after it; None when there was none
  within the trial; 0 when the winner's GARP was already the last one (the loser sent
  none after it). Target: <= GARP_TARGET.
* longest unanswered: the longest run of unanswered UDP probe requests from the fault
  on; if the client was still unanswered at the end, the run so far, flagged open (a
  client whose neighbour entry points at the loser waits for its ARP to re-resolve).
* tracebacks: the exception line of every Python traceback in the daemons' logs.
"""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from simulations.arpwatch import ArpWatch, Episode, Observations
from vipd.demo.pairlab import VIP4, PairLab, failed_runs

ACTIVE, STANDBY = "node1", "node2"
BASELINE = 0.5  # watched before the fault (plus a random phase of the heartbeat timer)
AFTER = 2.0  # watched after the end of the disturbance
CLOCK_STEP = 3.0
STEP_HOLD = 8.0
GARP_TARGET_MS = 50.0
DISTURBANCES = {
    "pause-standby": "SIGSTOP of the standby's daemon for --pause s, then SIGCONT",
    "pause-active": "SIGSTOP of the active's daemon for --pause s, then SIGCONT",
    "clock-step": f"the standby's wall clock {CLOCK_STEP:+g} s for {STEP_HOLD:g} s, then "
                  f"back (libfaketime in that daemon only)",
}


@dataclass
class Trial:
    fault: str
    index: int
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Window:
    """Wall-clock times of one trial: oracle watching, fault, disturbance over, end."""

    start: float
    fault: float
    ended: float
    end: float


def prepare(pair: PairLab, fault: str) -> None:
    """What the lab needs before the pair first starts."""
    if fault == "clock-step":
        pair.fake_clock(STANDBY)


def run_trial(pair: PairLab, fault: str, index: int, rng: random.Random, interval: float,
              pause: float) -> Trial:
    """One disturbance of a stable pair with the UDP probe running; stops the probe."""
    trial = Trial(fault, index)
    tails = {name: log_tail(pair, name) for name in pair.nodes}
    window = None
    try:
        watch = ArpWatch.start(pair, VIP4)
    except RuntimeError as exc:
        trial.error = str(exc)
        return trial
    try:
        window = _disturb(pair, fault, rng.uniform(0, interval), pause)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        trial.error = f"{fault} failed: {exc!r}"
    finally:
        _undo(pair, fault)
        obs, samples = collect(pair, watch, trial)
    if window is not None and not trial.error:
        macs = {pair.host(name).mac: name for name in pair.nodes}
        trial.detail = measure(obs, samples, window, macs)
        trial.detail["tracebacks"] = [f"{name}: {line}" for name, tail in tails.items()
                                      for line in tracebacks(tail())]
        trial.error = _implausible(obs, window, macs)
    return trial


def _disturb(pair: PairLab, fault: str, phase: float, pause: float) -> Window:
    start = time.time()
    time.sleep(BASELINE + phase)
    fault_at = time.time()
    if fault == "clock-step":
        pair.step_clock(STANDBY, CLOCK_STEP)
        time.sleep(STEP_HOLD)
        ended = time.time()
        pair.step_clock(STANDBY, 0)
    elif fault in ("pause-standby", "pause-active"):
        node = STANDBY if fault == "pause-standby" else ACTIVE
        pair.pause(node)
        time.sleep(pause)
        ended = time.time()
        pair.resume(node)
    else:
        raise ValueError(f"unknown disturbance {fault!r}; expected one of "
                         f"{', '.join(DISTURBANCES)}")
    time.sleep(AFTER)
    return Window(start, fault_at, ended, time.time())


def _undo(pair: PairLab, fault: str) -> None:
    """After an error too: no daemon stays frozen, no clock stays stepped."""
    if fault == "clock-step":
        pair.step_clock(STANDBY, 0)
    for node in pair.nodes.values():
        if node.daemon is not None and node.daemon.poll() is None:
            pair.resume(node.name)


def collect(pair: PairLab, watch: ArpWatch, trial: Trial,
            settle: Callable[[], object] = lambda: None
            ) -> tuple[Observations, list[tuple[float, str | None]]]:
    """The end of a lab trial: ``settle`` (undo the fault, watch a while longer), then
    stop the ARP oracle and the UDP probe; a failure lands in ``trial.error`` and empty
    observations come back. The oracle is closed in any case."""
    obs, samples = Observations(), list[tuple[float, str | None]]()
    try:
        settle()
        obs = watch.stop()
        samples = pair.stop_probe()
    except (OSError, ValueError, RuntimeError, subprocess.SubprocessError) as exc:
        trial.error = trial.error or f"no observations: {exc!r}"
    finally:
        watch.close()
    return obs, samples


def log_tail(pair: PairLab, name: str) -> Callable[[], list[str]]:
    log = pair.nodes[name].log
    seen = len(log.read_text().splitlines()) if log.exists() else 0
    return lambda: pair.log_lines(name)[seen:]


# --- what the observations say --------------------------------------------------------

def measure(obs: Observations, samples: list[tuple[float, str | None]], w: Window,
            macs: dict[str, str]) -> dict[str, Any]:
    """The per-trial quantities of the module docstring, from the oracle's rows and the
    UDP probe's samples; ``macs`` maps each node's MAC to its name."""
    dual = [(t, nxt) for t, nxt, seen in obs.rounds(w.start, w.end) if len(seen) >= 2]
    points = obs.holders(w.start, w.end)
    longest, open_at_end = longest_unanswered(samples, w.fault)
    delays = [_garp_delay(obs, e) for e in obs.dual_episodes(w.start, w.end)]
    return {
        "dual_active_ms": _ms(sum(nxt - t for t, nxt in dual)),
        "dual_active_after_ms": _ms(sum(nxt - t for t, nxt in dual if t >= w.ended)),
        "dual_holder_ms": _ms(time_where(points, w.start, w.end, lambda s: len(s) > 1)),
        "dual_holder_after_ms": _ms(time_where(points, w.ended, w.end,
                                               lambda s: len(s) > 1)),
        "moves": moves(points),
        "holders": [[_ms(t - w.fault), sorted(s)] for t, s in points],
        "held_after_fault": sorted(set().union(*(s for t, s in points_from(points, w.fault)))),
        "garps_after_fault": {name: sum(1 for t, m in obs.garps if m == mac and t >= w.fault)
                              for mac, name in macs.items()},
        "garp_after_resolution_ms": [None if d is None else _ms(d) for d in delays],
        "longest_unanswered_ms": _ms(longest),
        "unanswered_at_end": open_at_end,
        "disturbance_ms": _ms(w.ended - w.fault),
    }


def longest_unanswered(samples: list[tuple[float, str | None]], since: float
                       ) -> tuple[float, bool]:
    """The longest run of unanswered UDP requests sent from ``since`` on (from the first
    unanswered one to the next answered one, as `vipd.demo.pairlab.failed_runs`), in
    seconds, and whether the last run was still open when the probe stopped; an open run
    counts up to the last request, a lower bound."""
    runs = failed_runs(samples, since)
    longest = max((r for r in runs if not math.isinf(r)), default=0.0)
    if not runs or not math.isinf(runs[-1]):
        return longest, False
    answered = [sent for sent, who in samples if who is not None and sent >= since]
    start = next(sent for sent, who in samples
                 if sent >= since and who is None and (not answered or sent > answered[-1]))
    return max(longest, samples[-1][0] - start), True


def _garp_delay(obs: Observations, episode: Episode) -> float | None:
    """From the resolution until the winner's GARP is the last one the client saw: 0 when
    it already was (the loser sent none after the winner's latest, e.g. a frozen node
    whose kernel answered ARP until its lease ran out, while clients followed the
    winner's takeover GARP); None when the winner sent none within the trial."""
    winner, resolved_at = episode.winner, episode.resolved_at
    if winner is None or resolved_at is None:
        return None
    since = [(t, mac) for t, mac in obs.garps if t >= episode.start]
    loser_last = max((t for t, mac in since if mac != winner), default=None)
    winner_before = max((t for t, mac in obs.garps if mac == winner and t <= resolved_at),
                        default=None)
    if winner_before is not None and (loser_last is None or loser_last < winner_before):
        return 0.0
    after = max(resolved_at, loser_last if loser_last is not None else resolved_at)
    return next((t - resolved_at for t, mac in obs.garps if mac == winner and t > after),
                None)


def points_from(points: list[tuple[float, frozenset[str]]], since: float
          ) -> list[tuple[float, frozenset[str]]]:
    """The change points from ``since`` on, starting with the set in force at ``since``."""
    before = [p for p in points if p[0] <= since]
    return before[-1:] + [p for p in points if p[0] > since]


def time_where(points: list[tuple[float, frozenset[str]]], start: float, end: float,
               pred: Callable[[frozenset[str]], bool]) -> float:
    """Seconds within [start, end] during which the holder set satisfied ``pred``."""
    total = 0.0
    bounds = [t for t, _ in points[1:]] + [end]
    for (t, held), until in zip(points, bounds, strict=True):
        lo, hi = max(t, start), min(until, end)
        if hi > lo and pred(held):
            total += hi - lo
    return total


def moves(points: list[tuple[float, frozenset[str]]]) -> int:
    """How often the sole holder changed (through a dual or empty spell or directly)."""
    sole = [next(iter(s)) for _, s in points if len(s) == 1]
    return sum(1 for a, b in pairwise(sole) if a != b)


def tracebacks(lines: list[str]) -> list[str]:
    """The exception line (the first unindented one) of each traceback in ``lines``."""
    found, inside = [], False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and line.strip() and not line[0].isspace():
            found.append(line.strip())
            inside = False
    return found


def _implausible(obs: Observations, w: Window, macs: dict[str, str]) -> str:
    """Why the baseline cannot be trusted, or "": node1 alone must hold the VIP and
    answer most probe rounds before the fault, or the oracle is not seeing the pair."""
    baseline = obs.rounds(w.start, w.fault)
    by_active = sum(1 for *_, seen in baseline if {macs.get(m) for m in seen} == {ACTIVE})
    if len(baseline) < 10 or by_active < 0.8 * len(baseline):
        return (f"the ARP oracle saw {ACTIVE} alone answer {by_active} of {len(baseline)} "
                f"probe rounds before the fault (expected most)")
    held = obs.holders(w.start, w.fault)
    if held[0][1] != {ACTIVE}:
        return f"holders {sorted(held[0][1])} at the start instead of [{ACTIVE}]"
    return ""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# --- summary and tables ---------------------------------------------------------------

def summarize(trials: list[Trial]) -> dict[str, Any]:
    ok = [t.detail for t in trials if not t.error]
    delays = [d for x in ok for d in x["garp_after_resolution_ms"]]
    late = [d for d in delays if d is not None and d > GARP_TARGET_MS]
    return {
        "n": len(ok), "failed": len(trials) - len(ok),
        **{key: _spread([x[key] for x in ok]) for key in (
            "dual_active_ms", "dual_active_after_ms", "dual_holder_ms",
            "dual_holder_after_ms")},
        "moves_max": max((x["moves"] for x in ok), default=None),
        "trials_with_move": sum(1 for x in ok if x["moves"]),
        "trials_standby_held": sum(1 for x in ok if STANDBY in x["held_after_fault"]),
        "standby_garps": sum(x["garps_after_fault"][STANDBY] for x in ok),
        "episodes": len(delays),
        "garp_within_target": len(delays) - len(late) - delays.count(None),
        "garp_late": len(late), "garp_missing": delays.count(None),
        "garp_max_ms": max((d for d in delays if d is not None), default=None),
        "longest_unanswered_ms": _spread([x["longest_unanswered_ms"] for x in ok]),
        "trials_unanswered_at_end": sum(1 for x in ok if x["unanswered_at_end"]),
        "tracebacks": sum(len(x["tracebacks"]) for x in ok),
        "errors": [t.error for t in trials if t.error],
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}


def _unanswered(detail: dict[str, Any]) -> str:
    """The longest unanswered run; ">= N, open" when it lasted to the end of the trial."""
    ms = f"{detail['longest_unanswered_ms']:g}"
    return f">= {ms}, open" if detail["unanswered_at_end"] else ms


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def spread(details: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Median and max of ``key`` over the trials' details that have it (a summary cell)."""
    values = [d[key] for d in details if d.get(key) is not None]
    return {"median": round(statistics.median(values), 1) if values else None,
            "max": round(max(values), 1) if values else None}


def median_max(stats: dict[str, Any], key: str) -> str:
    """A summary cell: "median / max" of ``stats[key]``."""
    return f"{_cell(stats[key]['median'])} / {_cell(stats[key]['max'])}"


def trial_row(t: Trial) -> str:
    """One markdown table row (TRIAL_HEADER) for a trial."""
    if t.error:
        return f"| {t.fault} | {t.index} | failed: {t.error} |||||||"
    d = t.detail
    garps = ", ".join("none" if x is None else f"{x:g}" for x in d["garp_after_resolution_ms"])
    return (f"| {t.fault} | {t.index} | {d['dual_active_ms']:g} ({d['dual_active_after_ms']:g})"
            f" | {d['dual_holder_ms']:g} ({d['dual_holder_after_ms']:g}) | {d['moves']}"
            f" | {'yes' if STANDBY in d['held_after_fault'] else 'no'}"
            f" / {d['garps_after_fault'][STANDBY]} | {garps or '-'}"
            f" | {_unanswered(d)} | {len(d['tracebacks'])} |")


TRIAL_HEADER = (
    "| fault | # | dual-active ms (after end) | dual-holder ms (after end) | moves "
    "| node2 held / GARPs | winner GARP after resolution, ms | longest unanswered ms "
    "| tracebacks |\n|---|---|---|---|---|---|---|---|---|")
SUMMARY_HEADER = (
    "| fault | n | failed | dual-active ms median / max | after end, max "
    "| dual-holder ms median / max | after end, max | trials with a move "
    "| trials node2 held | node2 GARPs | GARP <= 50 ms after resolution | longest "
    "unanswered ms, max | tracebacks |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def summary_row(fault: str, s: dict[str, Any]) -> str:
    def both(key: str) -> str:
        return median_max(s, key)

    return (f"| {fault} | {s['n']} | {s['failed']} | {both('dual_active_ms')} "
            f"| {_cell(s['dual_active_after_ms']['max'])} | {both('dual_holder_ms')} "
            f"| {_cell(s['dual_holder_after_ms']['max'])} | {s['trials_with_move']} "
            f"| {s['trials_standby_held']} | {s['standby_garps']} "
            f"| {s['garp_within_target']} of {s['episodes']} (late {s['garp_late']}, "
            f"none {s['garp_missing']}; max {_cell(s['garp_max_ms'])}) "
            f"| {_cell(s['longest_unanswered_ms']['max'])} (open at the end: "
            f"{s['trials_unanswered_at_end']}) | {s['tracebacks']} |")


def table(results: dict[str, list[Trial]], pause: float) -> str:
    lines = [f"disturbances (pause {pause:g} s; clock step {CLOCK_STEP:+g} s for "
             f"{STEP_HOLD:g} s; ARP probe every 10 ms; 'after end' = from the SIGCONT or "
             f"the step back on)", "", TRIAL_HEADER]
    lines += [trial_row(t) for trials in results.values() for t in trials]
    lines += ["", SUMMARY_HEADER]
    lines += [summary_row(kind, summarize(trials)) for kind, trials in results.items()]
    return "\n".join(lines)
