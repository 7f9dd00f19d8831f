"""The group simulator (simulations/simgroup.py, simulate_group.py): the real group core
on a simulated etcd keeps at most one gate open, and the checker catches a broken rule."""

from __future__ import annotations

import pytest

from simulations import simulate_group
from vipd.core import group


def run(seeds: range) -> list[simulate_group.GroupOutcome]:
    return [simulate_group.scenario(seed) for seed in seeds]


def test_every_fault_kind_runs_without_a_violation() -> None:
    outcomes = run(range(10 * len(simulate_group.KINDS)))
    assert {o.kind for o in outcomes} == set(simulate_group.KINDS)
    bad = [(o.seed, o.kind, o.violations[:2]) for o in outcomes if o.violations]
    assert bad == []
    crash = [o.failover for o in outcomes if o.kind == "crash"]
    assert all(f is not None and 0.9 < f < 2 * simulate_group.TTL for f in crash), crash


def test_a_holder_counting_its_lease_longer_than_etcd_keeps_it_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation: a lease counted 1.6 x its TTL (etcd may expire it after 1 x)."""
    monkeypatch.setattr(group, "counted_lease", lambda ttl: 1.6 * ttl)
    outcomes = run(range(120))
    caught = [o for o in outcomes if any("two nodes answer" in v for v in o.violations)]
    assert caught, "the checker missed two open gates"


def test_a_group_without_the_start_wait_is_caught_electing_whoever_read_etcd_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutation: no start wait, so the first member to see the group claims."""
    monkeypatch.setattr(group.GroupElection, "_start_wait", lambda self: 0.0)
    outcomes = run(range(60))
    caught = [o for o in outcomes if any("started together" in v for v in o.violations)]
    assert caught, "the checker missed a group electing by arrival, not priority"


def test_simulate_main_runs_a_group_on_etcd(capsys: pytest.CaptureFixture[str]) -> None:
    from simulations import simulate
    assert simulate.main(["--arbiter", "etcd", "--nodes", "3", "--scenarios", "45",
                          "--seed", "2", "--json"]) == 0
    assert '"violations"' in capsys.readouterr().out
