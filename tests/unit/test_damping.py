"""Flap damping (vipd/core/damping.py): the pure rule, the election acting on it, the state
file that carries it across a crash, and a pair of real daemons."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations import simulate
from support.daemons import VIP_SET, Pair, eventually, exec_check
from vipd.config import Config, load_config
from vipd.core.damping import Cause, Damper, DampingConfig, Flap
from vipd.core.election import (
    Action,
    Command,
    CommandKind,
    DampingChanged,
    Election,
    ElectionConfig,
    HealthChanged,
    HeartbeatReceived,
    Start,
    Tick,
)
from vipd.core.protocol import Flag, Heartbeat, Received, State
from vipd.errors import ConfigError
from vipd.statefile import StateFile, flaps_from_json, flaps_to_json

INTERVAL = 0.04
HOLD = 30.0
T0 = 100.0


def cfg(**damping: Any) -> ElectionConfig:
    return ElectionConfig(node="a", priority=150, preempt=True, interval=INTERVAL,
                          dead_after=8, damping=DampingConfig(**damping))


def active_peer(now: float) -> HeartbeatReceived:
    """A heartbeat of the active peer b (priority 100) that echoes one of ours."""
    hb = Heartbeat(
        state=State.ACTIVE, flags=Flag.HEALTHY, key_id=1, newest_key_id=1, boot_id=7, seq=1,
        send_time_ns=0, term=1, priority=100, effective_priority=100, settings_digest=b"",
        echo_boot=0, echo_seq=0, echo_hold_us=0, cluster="web", node="b")
    return HeartbeatReceived(Received(heartbeat=hb, received_at=now,
                                      echo_sent_at=now - 0.001, rtt=None))


class Standby:
    """Node a (preferred) as a standby beside an active b that it hears and that hears it:
    it preempts (WANT_ACTIVE) unless damped."""

    def __init__(self, e: Election, *, crashed: bool = False, healthy: bool = True) -> None:
        self.e, self.now = e, T0
        self.actions: list[Action] = []
        self.step(Start(crashed=crashed))
        self.step(active_peer(self.now))
        if healthy:
            self.step(HealthChanged(True))

    def step(self, event: Any) -> list[Action]:
        got = self.e.handle(event, self.now)
        self.actions += got
        return got

    def run(self, seconds: float) -> None:
        """The peer's heartbeats every interval (echoing ours), for `seconds`."""
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + INTERVAL, 6)
            self.step(active_peer(self.now))

    def health(self, up: bool) -> None:
        self.step(HealthChanged(up, "" if up else "probe web: 503"))

    @property
    def wants(self) -> bool:
        return self.e.want_active

    def damping(self) -> list[DampingChanged]:
        return [a for a in self.actions if isinstance(a, DampingChanged)]


# --- the pure rule ---------------------------------------------------------------------

def test_one_failure_damps_until_healthy_for_the_hold_down() -> None:
    c, d = DampingConfig(failures=1, window=600, hold_down=HOLD), Damper()
    assert d.until(T0, c) is None
    d.failed(Flap(T0, Cause.HEALTH, "x"), c)
    assert d.until(T0 + 100, c) == float("inf")  # not healthy since: damped until it is
    d.healthy(T0 + 5)
    d.healthy(T0 + 7)  # still healthy: the hold-down counts from the first
    assert d.until(T0 + 6, c) == T0 + 5 + HOLD
    assert d.until(T0 + 5 + HOLD, c) is None


def test_failures_below_the_threshold_do_not_damp_and_old_ones_leave_the_window() -> None:
    c, d = DampingConfig(failures=2, window=60, hold_down=HOLD), Damper()
    d.failed(Flap(T0, Cause.HEALTH, "x"), c)
    d.healthy(T0 + 1)
    assert d.until(T0 + 2, c) is None
    d.failed(Flap(T0 + 61, Cause.RESTART, "y"), c)  # the first left the window
    d.healthy(T0 + 62)
    assert d.until(T0 + 63, c) is None and len(d.flaps) == 1
    d.failed(Flap(T0 + 70, Cause.HEALTH, "z"), c)
    d.healthy(T0 + 71)
    assert d.until(T0 + 72, c) == T0 + 71 + HOLD
    # A window shorter than the hold-down: damping ends when the failures leave it.
    short = DampingConfig(failures=2, window=20, hold_down=HOLD)
    assert d.until(T0 + 72, short) == T0 + 61 + 20


def test_failures_zero_turns_damping_off() -> None:
    c, d = DampingConfig(failures=0), Damper()
    d.failed(Flap(T0, Cause.HEALTH, "x"), c)
    assert d.until(T0, c) is None and not c.enabled


@settings(max_examples=300, deadline=None)
@given(failures=st.integers(1, 3), window=st.floats(1, 100), hold=st.floats(0, 50),
       events=st.lists(st.tuples(st.floats(0, 0.5), st.floats(0.01, 30)), max_size=8),
       probe=st.floats(0, 200))
def test_damped_exactly_while_enough_recent_failures_and_not_yet_stable(
        failures: int, window: float, hold: float, events: list[tuple[float, float]],
        probe: float) -> None:
    """Failures at increasing times, each followed by recovery after `down` s: `until` at
    any later time agrees with the definition written out by hand."""
    c, d, t = DampingConfig(failures=failures, window=window, hold_down=hold), Damper(), 0.0
    times, healthy_at = [], None
    for gap, down in events:
        t += gap
        d.failed(Flap(t, Cause.HEALTH, ""), c)
        times.append(t)
        t += down
        d.healthy(t)
        healthy_at = t
    now = t + probe
    recent = [x for x in times if x > now - window]
    if len(recent) < failures:
        assert d.until(now, c) is None
    else:
        assert healthy_at is not None
        end = min(healthy_at + hold, times[-failures] + window)
        assert d.until(now, c) == (end if now < end else None)


# --- the election ----------------------------------------------------------------------

def test_a_recovered_node_preempts_only_after_the_hold_down() -> None:
    s = Standby(Election(cfg(hold_down=HOLD)))
    assert s.wants  # never failed: preempts at once
    s.health(False)
    assert s.e.state is State.FAULT and not s.wants
    damped = s.damping()
    assert len(damped) == 1 and damped[0].damped and damped[0].flap is not None
    assert damped[0].flap.cause is Cause.HEALTH and "probe web: 503" in damped[0].reason
    s.run(1.0)
    s.health(True)
    healthy_at = s.now
    assert s.e.state is State.STANDBY
    s.run(HOLD - 0.1)
    assert not s.wants and s.e.damped_until(s.now) == healthy_at + HOLD
    s.run(0.2)
    assert s.wants
    lifted = s.damping()[-1]
    assert not lifted.damped and "preemption allowed again" in lifted.reason


def test_the_timer_wakes_the_node_when_the_hold_down_ends() -> None:
    """No heartbeat needed: the hold-down's end is a deadline of its own."""
    s = Standby(Election(cfg(hold_down=HOLD)))
    s.health(False)
    s.health(True)
    end = s.now + HOLD
    deadline = s.e.next_deadline()
    assert deadline is not None and deadline <= end


def test_every_failure_restarts_the_hold_down() -> None:
    s = Standby(Election(cfg(hold_down=HOLD)))
    for _ in range(5):
        s.health(False)
        s.run(0.15)
        s.health(True)
        stable_at = s.now
        s.run(0.15)
    s.run(HOLD - 0.5)
    assert not s.wants
    s.run(0.6)
    assert s.wants
    assert s.e.damper.healthy_since == pytest.approx(stable_at)
    flaps = [a for a in s.damping() if a.flap is not None]
    assert len(flaps) == 5 and all(a.damped for a in flaps)


def test_a_start_after_a_crash_is_a_failure_a_clean_start_is_not() -> None:
    crashed = Standby(Election(cfg(hold_down=HOLD)), crashed=True)
    assert not crashed.wants
    flap = crashed.damping()[0].flap
    assert flap is not None and flap.cause is Cause.RESTART
    crashed.run(HOLD + 0.1)
    assert crashed.wants
    clean = Standby(Election(cfg(hold_down=HOLD)))
    assert clean.wants and not clean.damping()


def test_persisted_failures_damp_a_node_that_starts_cleanly() -> None:
    old = Damper([Flap(T0 - 20, Cause.HEALTH, "before the restart")])
    s = Standby(Election(cfg(hold_down=HOLD), damper=old))
    assert not s.wants
    assert s.damping()[0].damped and s.damping()[0].flap is None
    s.run(HOLD + 0.1)
    assert s.wants


def test_a_higher_threshold_lets_single_failures_through() -> None:
    s = Standby(Election(cfg(failures=2, hold_down=HOLD)))
    s.health(False)
    s.health(True)
    s.run(0.1)
    assert s.wants and not s.damping()[0].damped
    s.health(False)
    s.health(True)
    s.run(0.1)
    assert not s.wants and s.damping()[-1].damped


def test_damping_off_preempts_right_after_recovery() -> None:
    s = Standby(Election(cfg(failures=0)))
    s.health(False)
    s.health(True)
    s.run(0.1)
    assert s.wants and not s.damping()


def test_an_operator_promote_is_not_damped() -> None:
    s = Standby(Election(cfg(hold_down=HOLD)), crashed=True)
    s.step(Command(CommandKind.PROMOTE))
    assert s.e.timers.promote_until is not None or s.e.state is State.ACTIVE
    assert Flag.PROMOTE in s.e.advert().flags


def test_a_failing_active_still_loses_the_vips() -> None:
    """Damping never keeps a sick node active."""
    e = Election(cfg(hold_down=HOLD), damper=Damper([Flap(T0 - 1, Cause.HEALTH, "")]))
    e.handle(Start(), T0)
    e.handle(HealthChanged(True), T0)
    e.handle(Tick(), T0 + 8 * INTERVAL)  # no peer: takes over alone after the hold-down
    assert e.state is State.ACTIVE
    e.handle(HealthChanged(False, "probe web: 503"), T0 + 1)
    assert e.state is State.FAULT


# --- the state file --------------------------------------------------------------------

def test_flaps_survive_the_state_file_across_clocks(tmp_path: Path) -> None:
    """Loop times are per process; the file holds wall-clock times."""
    flaps = [Flap(50.0, Cause.HEALTH, "probe web: 503"), Flap(80.0, Cause.RESTART, "")]
    sf = StateFile(tmp_path)
    sf.save(term=3, maintenance=False)
    sf.save(flaps=flaps_to_json(flaps, now=100.0, wall=1_000_000.0))
    sf.save(running=True)
    saved = StateFile(tmp_path).load()
    assert saved["term"] == 3 and saved["running"] is True  # each save kept the others
    # The next process: its loop clock reads 7.0 at wall time 1_000_010.
    back = flaps_from_json(saved["flaps"], now=7.0, wall=1_000_010.0)
    assert back == [Flap(-53.0, Cause.HEALTH, "probe web: 503"), Flap(-23.0, Cause.RESTART, "")]


def test_malformed_flap_records_are_skipped() -> None:
    records = [{"at": 5, "cause": "health"}, {"at": "x", "cause": "health"},
               {"cause": "restart"}, {"at": 1, "cause": "meteor"}, "junk"]
    assert flaps_from_json(records, now=10.0, wall=10.0) == [Flap(5.0, Cause.HEALTH, "")]
    assert flaps_from_json({"not": "a list"}, now=0.0, wall=0.0) == []


# --- the simulator ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(simulate.FLAPPING))
def test_simulated_flapping_moves_the_vips_at_most_twice(kind: str) -> None:
    """With damping off the same seeds move the VIPs more often: the invariant bites."""
    seeds = [simulate.KINDS.index(kind) + i * len(simulate.KINDS) for i in range(12)]
    damped = [simulate.scenario(s, INTERVAL, 8) for s in seeds]
    assert all(o.kind == kind and not o.violations for o in damped), \
        [o.violations for o in damped]
    assert max(o.notes["moves"] for o in damped) <= simulate.FLAPPING_MOVES
    free = [simulate.scenario(s, INTERVAL, 8, damping=DampingConfig(failures=0))
            for s in seeds]
    assert max(o.notes["moves"] for o in free) > simulate.FLAPPING_MOVES


# --- a pair of daemons -----------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_crash_counts_as_a_failure_a_clean_stop_does_not(
        pair: Pair) -> None:
    hold_down = 1.5
    pair.a.settings["damping"] = {"hold_down": f"{hold_down}s"}
    pair.start()
    await pair.settled()
    state_file = Path(pair.a.settings["state_dir"]) / "state.json"
    assert json.loads(state_file.read_text())["running"] is True

    await pair.a.crash()  # the file still says running
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b holds the VIPs")
    pair.a.start()
    await eventually(lambda: pair.a.state is State.STANDBY, what="a STANDBY")
    status = await pair.a.daemon.status()
    assert status.damping is not None and status.damping.damped
    assert status.damping.last_failure is not None
    assert status.damping.last_failure.startswith("restart")
    assert pair.b.state is State.ACTIVE
    await pair.settled()  # back after the hold-down
    record = json.loads(state_file.read_text())
    assert [f["cause"] for f in record["flaps"]] == ["restart"]

    await pair.a.stop()  # clean: hands over, marks the file
    assert json.loads(state_file.read_text())["running"] is False
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b holds the VIPs")
    pair.a.start()
    await eventually(lambda: pair.a.state is not State.INIT, what="a started")
    # No new failure; the old one is still within the window, so the new process proves
    # itself for the hold-down too (docs/election.md).
    status = await pair.a.daemon.status()
    assert status.damping is not None and status.damping.failures == 1
    await pair.settled()
    record = json.loads(state_file.read_text())
    assert [f["cause"] for f in record["flaps"]] == ["restart"]


@pytest.mark.asyncio
async def test_health_flapping_of_the_preferred_daemon_moves_the_vips_twice(
        pair: Pair, tmp_path: Path) -> None:
    """The issue's case on real daemons: a flapping check, preempt on, default damping
    (a short hold-down to keep the test short)."""
    flag = tmp_path / "healthy"
    flag.touch()
    pair.a.settings["health"] = [exec_check(flag)]
    pair.a.settings["damping"] = {"hold_down": "1s"}
    pair.start()
    await pair.settled()
    mark = len(pair.journal)
    for _ in range(6):
        flag.unlink()
        await eventually(lambda: pair.a.state is State.FAULT, what="a FAULT")
        flag.touch()
        await eventually(lambda: pair.a.state is State.STANDBY, what="a STANDBY")
    await pair.settled()
    acquires = [node for node, call in pair.journal[mark:] if call == "acquire"]
    moves = sum(1 for x, y in zip(["a", *acquires], acquires, strict=False) if x != y)
    assert moves == 2, pair.journal[mark:]


def test_config_damping_section(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "node": "a", "cluster": "web", "interface": "eth0", "vips": ["198.51.100.10/24"],
        "heartbeat": {"bind": "198.51.100.1:5405", "peers": ["198.51.100.2:5405"]},
        "auth": {"key_file": str(tmp_path / "k")}}

    def load(**extra: Any) -> Config:
        path = tmp_path / "vipd.yaml"
        path.write_text(yaml.safe_dump({**base, **extra}))
        return load_config(path)

    assert load().damping.hold_down == 30.0
    cfg = load(damping={"failures": 3, "window": "5m", "hold_down": "2m"})
    assert (cfg.damping.failures, cfg.damping.window, cfg.damping.hold_down) == (3, 300, 120)
    with pytest.raises(ConfigError, match=r"damping\.failures"):
        load(damping={"failures": -1})
    with pytest.raises(ConfigError, match=r"damping\.hold_down"):
        load(damping={"hold_down": "soon"})


def test_an_active_that_stalled_past_the_dead_interval_is_damped() -> None:
    """A paused active (SIGSTOP, a frozen VM) whose peer took over must not take the
    VIPs straight back when it wakes: the fault campaign saw two moves per pause."""
    e = Election(cfg(hold_down=HOLD))
    e.handle(Start(), T0)
    e.handle(HealthChanged(True), T0)
    now = T0 + 0.01
    e.handle(active_peer(now), now)
    assert e.state is State.STANDBY
    # node a (150) preempts b (100): WANT_ACTIVE; b hands over (RESIGNING) -> a ACTIVE
    hb = active_peer(now + 0.05)
    resigning = dataclasses.replace(hb.received.heartbeat,
                                    flags=Flag.HEALTHY | Flag.RESIGNING)
    e.handle(HeartbeatReceived(dataclasses.replace(hb.received, heartbeat=resigning)),
             now + 0.05)
    assert e.state is State.ACTIVE
    stall = 8 * INTERVAL * 3  # three dead intervals
    actions = e.handle(active_peer(now + 0.1 + stall), now + 0.1 + stall)
    flaps = [a.flap for a in actions if isinstance(a, DampingChanged) and a.flap]
    assert len(flaps) == 1 and flaps[0].cause is Cause.STALL
    assert "stalled for" in flaps[0].detail and e.damped_until(now + 0.2 + stall) is not None


def test_a_short_stall_or_a_standbys_stall_is_no_failure() -> None:
    s = Standby(Election(cfg(hold_down=HOLD)))
    s.now += 8 * INTERVAL * 3
    s.step(active_peer(s.now))  # the standby stalled: nothing of ours was at stake
    assert not [a for a in s.damping() if a.flap is not None]
