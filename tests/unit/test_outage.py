"""How the lab turns probe samples into a client-visible outage (vipd.demo.pairlab)."""

from __future__ import annotations

import math

from vipd.demo.pairlab import failed_runs, outage

# (time the request was sent, who answered or None)
SAMPLES: list[tuple[float, str | None]] = [
    (0.00, "node1"), (0.01, None), (0.02, "node1"),            # a blip before the fault
    (1.00, "node1"), (1.01, None), (1.02, None), (1.03, "node2"),
    (1.04, None), (1.05, "node2"),
]


def test_runs_after_the_fault_in_order() -> None:
    runs = failed_runs(SAMPLES, 1.0)
    assert [round(r, 3) for r in runs] == [0.02, 0.01]


def test_outage_is_the_first_run_after_the_fault_and_names_the_last_answer() -> None:
    gap, who = outage(SAMPLES, 1.0)
    assert round(gap, 3) == 0.02 and who == "node2"


def test_no_failure_is_no_outage_and_an_unended_one_is_infinite() -> None:
    assert outage(SAMPLES[:1], 0.0) == (0.0, "node1")
    gap, who = outage([*SAMPLES, (1.10, None)], 1.06)
    assert math.isinf(gap) and who == "node2"
    assert failed_runs([(2.0, None)], 0.0) == [math.inf]
