"""The simulator proves the election under faults; a few hundred seeds must show no violation.

A failing seed found later (python -m simulations.simulate) belongs here as a regression.
"""

from __future__ import annotations

import argparse

import pytest

from simulations import simulate
from vipd.core.election import DEFAULT_DEAD_AFTER, DEFAULT_INTERVAL


def test_three_hundred_seeded_scenarios_have_no_violation() -> None:
    outcomes = [simulate.scenario(42_000 + i, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER)
                for i in range(300)]
    bad = [(o.seed, o.kind, o.violations[:2]) for o in outcomes if o.violations]
    assert not bad, f"violations (replay with --replay SEED): {bad}"
    kinds = {o.kind for o in outcomes}
    assert kinds == set(simulate.KINDS), "every fault kind must be exercised"


def test_crash_failover_stays_within_the_dead_interval_plus_two_intervals() -> None:
    outcomes = [simulate.scenario(len(simulate.KINDS) * (600 + i), DEFAULT_INTERVAL,
                                  DEFAULT_DEAD_AFTER) for i in range(30)]
    crashes = [o.failover for o in outcomes if o.kind == "crash"]
    assert len(crashes) == 30 and all(f is not None for f in crashes)
    bound = DEFAULT_INTERVAL * (DEFAULT_DEAD_AFTER + 2)
    assert max(f for f in crashes if f is not None) <= bound


def test_the_checker_catches_a_broken_election(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without split-brain resolution the simulator must report violations."""
    from vipd.core import election

    monkeypatch.setattr(election.Election, "_wins_dual", lambda self, hb: True)
    outcomes = [simulate.scenario(1_000_000 + i, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER)
                for i in range(0, 120)]
    assert any("both nodes ACTIVE" in v for o in outcomes for v in o.violations)


def test_report_has_the_promised_fields() -> None:
    args = argparse.Namespace(seed=3, interval=DEFAULT_INTERVAL, dead_after=DEFAULT_DEAD_AFTER,
                              soak_hours=0.0)
    outcomes = [simulate.scenario(3_000 + i, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER)
                for i in range(24)]
    report = simulate.build_report(outcomes, args)
    assert report["scenarios"] == 24 and report["violations"]["count"] == 0
    assert set(report["false_failovers_per_hour"]) == {"0.01", "0.05", "0.2"}
    assert report["failover_ms"]["crash"]["n"] == 2
    assert report["heartbeat"]["dead_interval_ms"] == pytest.approx(320.0)
