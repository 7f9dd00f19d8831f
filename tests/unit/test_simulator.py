"""The simulator proves the election under faults; a few hundred seeds must show no violation.

A failing seed found later (python -m simulations.simulate) belongs here as a regression.
"""

from __future__ import annotations

import argparse
import json

import pytest

from simulations import simulate
from vipd.core.events import DEFAULT_DEAD_AFTER, DEFAULT_INTERVAL


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
                              soak_hours=0.0, arbiter="none")
    count = 2 * len(simulate.KINDS)  # every kind twice
    outcomes = [simulate.scenario(3_000 + i, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER)
                for i in range(count)]
    report = simulate.build_report(outcomes, args)
    assert report["scenarios"] == count and report["violations"]["count"] == 0
    assert set(report["false_failovers_per_hour"]) == {"0.01", "0.05", "0.2"}
    assert report["failover_ms"]["crash"]["n"] == 2
    for kind in simulate.FLAPPING:
        assert report["flapping"][kind] == {"n": 2, "max_moves": 2,
                                            "scenarios_by_moves": {"2": 2}}
    assert report["heartbeat"]["dead_interval_ms"] == pytest.approx(320.0)


def _kind_seeds(kind: str, count: int, start: int = 0) -> list[int]:
    """Seeds whose scenario is `kind` (the kind is the seed modulo the number of kinds)."""
    n = len(simulate.KINDS)
    first = start - start % n + simulate.KINDS.index(kind)
    return [first + n * i for i in range(count)]


def _violations(seeds: list[int]) -> list[str]:
    return [v for seed in seeds
            for v in simulate.scenario(seed, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER).violations]


def test_the_checker_catches_a_standby_that_judges_its_peer_by_its_own_pause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the stall rule, a standby frozen for longer than its socket buffer holds
    (the newest heartbeats dropped, the queued ones stale) takes over on waking."""
    from vipd.core import election

    seeds = _kind_seeds("freeze_standby", 40)
    assert _violations(seeds) == []
    monkeypatch.setattr(election.Election, "_check_stall", lambda self, now: [])
    assert any("took over" in v and "freeze although" in v for v in _violations(seeds))


def test_the_checker_catches_a_holder_that_does_not_announce_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the re-announcement, after partitions and freezes the loser's gratuitous
    ARP is sometimes the last one clients saw."""
    from vipd.core import election

    seeds = [s for kind in ("partition", "oneway", "freeze_active")
             for s in _kind_seeds(kind, 40, start=1_000_000)]
    assert _violations(seeds) == []
    monkeypatch.setattr(election.Election, "_reannounce", lambda self, extra, now: "")
    assert any("announced them last" in v for v in _violations(seeds))


def test_the_checker_catches_liveness_that_depends_on_wall_clocks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule before issue 10: every datagram within max_skew of the receiver's wall
    clock. A clock step on one node then drops every heartbeat and moves the VIPs."""
    from vipd.core import protocol

    seeds = _kind_seeds("clock_step", 20)
    assert _violations(seeds) == []
    fresh_open = protocol.Session.open

    def wall_clock_open(self: protocol.Session, data: bytes, now: float, wall_ns: int,
                        source: object = None) -> protocol.Received:
        hb = protocol.decode(data, self.keys)
        if hb.node != self.node and abs(hb.send_time_ns - wall_ns) > 1e9:
            raise protocol.Rejected(protocol.Reject.STALE, "the old wall-clock rule")
        return fresh_open(self, data, now, wall_ns, source)

    monkeypatch.setattr(protocol.Session, "open", wall_clock_open)
    assert any("dropped as stale" in v for v in _violations(seeds))


# --- with a witness (--arbiter witness) -----------------------------------------------------

def test_forty_arbiter_scenarios_pass_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    """Two scenarios of every arbiter fault kind, through the command line."""
    argv = ["--arbiter", "witness", "--scenarios", "40", "--seed", "3", "--soak-hours", "0",
            "--json"]
    assert simulate.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["violations"]["count"] == 0
    assert report["arbiter"]["kinds"] == sorted(simulate.ARBITER_KINDS)
    assert report["failover_ms"]["isolate_active"]["n"] >= 1


def test_the_arbiter_seeds_that_found_the_one_way_vote_bugs_pass() -> None:
    """Votes granted to a node that could not hear them (tests/unit/test_election_votes.py)
    left the pair without a holder for as long as these partitions lasted."""
    for seed in (7_000_148, 7_000_208, 7_000_348, 7_000_448):
        out = simulate.scenario(seed, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER, "witness")
        assert out.violations == [], (seed, out.kind, out.notes.get("cut"))


def test_the_checker_catches_votes_counted_longer_than_the_voter_grants_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The vote rule broken: a candidate counts a vote for half a lease longer than the
    voter promised it. The first scenarios of every kind must then show two open gates."""
    from vipd.core import votes

    seeds = range(2 * len(simulate.ARBITER_KINDS))

    def violations() -> list[str]:
        return [v for seed in seeds for v in simulate.scenario(
            seed, DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER, "witness").violations]

    assert violations() == []
    monkeypatch.setattr(votes, "counted_lease", lambda lease: lease * 1.5)
    assert any("two nodes answer for the VIPs" in v for v in violations())
