"""The daemon runtime (vipd/daemon.py) on the loopback pair of tests/support/daemons.py:
two Daemons in one event loop, heartbeating over UDP on 127.0.0.1, each with its own
FakeMover (a crash, a stop and reloads are driven as that module describes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from support.daemons import LEASE, VIP_SET, VIPS, Pair, eventually, exec_check
from vipd.core.protocol import Advert, Flag, KeyRing, Session, State
from vipd.health import ProbeResult
from vipd.keys import load_keys
from vipd.movers.base import VipInterface
from vipd.vipworker import RECONCILE_EVERY

# ---------------------------------------------------------------------------- helpers


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def messages(caplog: pytest.LogCaptureFixture, *, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("vipd") and r.levelno >= level]


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# ---------------------------------------------------------------------------- start


@pytest.mark.asyncio
async def test_start_elects_the_higher_priority_node(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    await asyncio.sleep(0.3)  # several dead intervals: still one active
    assert (pair.a.state, pair.b.state) == (State.ACTIVE, State.STANDBY)
    assert pair.a.mover.addresses == VIP_SET
    assert pair.b.mover.addresses == set()
    assert ("b", "acquire") not in pair.journal
    assert pair.a.mover.lease == LEASE


@pytest.mark.asyncio
async def test_start_removes_stale_vips_of_a_previous_run(pair: Pair) -> None:
    pair.b.mover.addresses.update(VIP_SET)
    pair.start()
    await pair.settled()
    assert pair.b.mover.calls[0] == ("release",)
    assert pair.a.mover.calls[0] == ("release",)
    assert pair.b.mover.addresses == set()


# ---------------------------------------------------------------------------- failover


@pytest.mark.asyncio
async def test_crash_of_the_active_makes_the_peer_active_and_renew_its_lease(
        pair: Pair) -> None:
    pair.start()
    await pair.settled()
    old_term = pair.a.term
    await pair.a.crash()
    await eventually(lambda: pair.b.state is State.ACTIVE, what="b ACTIVE")
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b holds the VIPs")
    assert pair.b.mover.lease == LEASE
    assert pair.b.term > old_term

    def acquires() -> int:
        return pair.b.mover.call_names().count("acquire")

    before = acquires()
    await eventually(lambda: acquires() >= before + 3, timeout=2.0, what="lease renewals")
    assert {call[1] for call in pair.b.mover.calls if call[0] == "acquire"} == {LEASE}
    assert pair.b.state is State.ACTIVE


@pytest.mark.asyncio
async def test_graceful_stop_hands_over_before_releasing(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    mark = len(pair.journal)
    started = time.monotonic()
    pair.a.daemon._on_stop_signal()
    code = await asyncio.wait_for(pair.a.task, 1.0)
    assert code == 0
    assert time.monotonic() - started < 1.0
    assert pair.b.state is State.ACTIVE
    assert pair.b.mover.addresses == VIP_SET
    assert pair.a.mover.addresses == set()
    after = pair.journal[mark:]
    assert ("a", "release") in after
    assert ("b", "acquire") in after
    assert after.index(("b", "acquire")) < after.index(("a", "release")), after


@pytest.mark.asyncio
async def test_health_failure_faults_and_recovery_takes_the_vips_back_after_hold_down(
        pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Flap damping at its default of one failure: a recovers, then waits `hold_down`
    healthy before it preempts (by handover)."""
    hold_down = 1.0
    flag = tmp_path / "healthy"
    flag.touch()
    pair.a.settings["health"] = [exec_check(flag)]
    pair.a.settings["damping"] = {"hold_down": f"{hold_down:g}s"}
    pair.start()
    await pair.settled()

    flag.unlink()
    await eventually(lambda: pair.a.state is State.FAULT and pair.b.state is State.ACTIVE,
                     what="a FAULT, b ACTIVE")
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b holds the VIPs")
    assert pair.a.mover.addresses == set()
    b_term = pair.b.term
    assert (await pair.a.daemon.status()).damping.damped  # type: ignore[union-attr]

    flag.touch()
    await eventually(lambda: pair.a.state is State.STANDBY, what="a STANDBY again")
    standby_at = time.monotonic()
    damping = (await pair.a.daemon.status()).damping
    assert damping is not None and damping.damped and damping.failures == 1
    assert damping.last_failure is not None and damping.last_failure.startswith("health")
    await pair.settled()  # preempt (default on): a takes the VIPs back by handover
    assert time.monotonic() - standby_at >= hold_down * 0.9
    assert pair.a.term > b_term
    assert any(m.startswith("FAULT -> STANDBY") for m in messages(caplog))
    assert any("preemption allowed again" in m for m in messages(caplog))
    assert not (await pair.a.daemon.status()).damping.damped  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_vip_failure_faults_until_vip_retry_has_passed(pair: Pair) -> None:
    pair.a.mover.fail("acquire")
    pair.start()
    await eventually(lambda: pair.a.state is State.FAULT and pair.b.state is State.ACTIVE,
                     what="a FAULT after its acquire failed, b ACTIVE")
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b holds the VIPs")
    assert pair.a.mover.addresses == set()
    pair.a.mover.heal()
    retry = pair.a.daemon.election.cfg.vip_retry
    await eventually(lambda: pair.a.state is not State.FAULT, timeout=retry + 2.0,
                     what="a out of FAULT")
    await pair.settled()


@pytest.mark.asyncio
async def test_standby_removes_vips_added_behind_its_back(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    pair.start()
    await pair.settled()
    pair.b.mover.addresses |= VIP_SET
    await eventually(lambda: not pair.b.mover.addresses, timeout=3.5,
                     what="reconcile removed the VIPs from b")
    assert pair.b.state is State.STANDBY
    assert pair.a.mover.addresses == VIP_SET
    assert any("while not active" in m for m in messages(caplog, level=logging.WARNING))


@pytest.mark.asyncio
async def test_a_takeover_during_the_standbys_stray_vip_check_keeps_its_vips(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standby's check for stray VIPs and a takeover both go through the one VIP
    worker: VIPs acquired while a slow check runs are not removed by it."""
    for node in pair.nodes:
        node.settings["vip_lease"] = 0  # no renewal that would put removed VIPs back
    pair.start()
    await pair.settled()
    checking, proceed = asyncio.Event(), asyncio.Event()
    plain_held = pair.b.mover.held

    async def slow_held() -> set[VipInterface]:
        checking.set()
        await proceed.wait()
        return await plain_held()

    monkeypatch.setattr(pair.b.mover, "held", slow_held)
    await asyncio.wait_for(checking.wait(), 4.0)  # b's periodic check is under way
    await pair.a.stop()  # a hands over to b, whose takeover now waits for the check
    await asyncio.sleep(0.2)
    assert pair.b.state is State.ACTIVE
    proceed.set()
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b holds the VIPs")
    await asyncio.sleep(0.3)
    assert pair.b.mover.addresses == VIP_SET, "the stray-VIP check removed b's new VIPs"
    assert pair.b.state is State.ACTIVE


@pytest.mark.asyncio
async def test_no_announcement_follows_a_release_queued_behind_a_slow_acquire(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    pair.start()
    await pair.settled()
    await pair.a.stop()
    await eventually(lambda: pair.b.mover.addresses == VIP_SET, what="b took over")
    await pair.b.stop()
    # a alone again: its acquire is slow, and a health failure queues a release
    # behind it before the acquire has finished.
    plain_acquire = pair.a.mover.acquire

    async def slow_acquire(lease: float) -> None:
        await asyncio.sleep(0.2)
        await plain_acquire(lease)

    monkeypatch.setattr(pair.a.mover, "acquire", slow_acquire)
    pair.a.start()
    await eventually(lambda: pair.a.state is State.ACTIVE, what="a ACTIVE")
    pair.a.daemon.checks._on_verdict(False, "web", ProbeResult(False, "503", 0.0))
    await eventually(lambda: ("release",) in pair.a.mover.calls
                     and not pair.a.mover.addresses, what="a released")
    await asyncio.sleep(0.3)  # past a whole announce burst
    calls = pair.a.mover.calls
    last_release = len(calls) - 1 - calls[::-1].index(("release",))
    assert ("announce",) not in calls[last_release:], calls


# ---------------------------------------------------------------------------- reload


@pytest.mark.asyncio
async def test_reload_applies_a_new_priority(pair: Pair,
                                             caplog: pytest.LogCaptureFixture) -> None:
    pair.start()
    await pair.settled()
    pair.a.write(priority=200)
    pair.a.daemon._on_reload_signal()
    await eventually(lambda: pair.a.daemon.election.cfg.priority == 200, what="reloaded")
    assert pair.a.daemon.config.priority == 200
    assert any(m.startswith("config reloaded: priority 200") for m in messages(caplog))
    await asyncio.sleep(0.1)
    assert (pair.a.state, pair.b.state) == (State.ACTIVE, State.STANDBY)


@pytest.mark.asyncio
async def test_reload_of_broken_yaml_keeps_the_running_config(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    pair.start()
    await pair.settled()
    before = pair.a.daemon.config
    pair.a.config_path.write_text("node: [a\npriority: 200\n")
    pair.a.daemon._on_reload_signal()
    await eventually(lambda: any(m.startswith("reload failed")
                                 for m in messages(caplog, level=logging.ERROR)),
                     what="reload failure logged")
    assert pair.a.daemon.config is before
    assert pair.a.daemon.election.cfg.priority == 150
    await asyncio.sleep(0.1)
    assert not pair.a.task.done()
    assert (pair.a.state, pair.b.state) == (State.ACTIVE, State.STANDBY)


@pytest.mark.asyncio
async def test_reload_refuses_to_change_the_vips(pair: Pair,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    pair.start()
    await pair.settled()
    before = pair.a.daemon.config
    pair.a.write(vips=["192.0.2.99/32"], priority=200)
    pair.a.daemon._on_reload_signal()
    await eventually(lambda: any(m.startswith("reload refused: vips")
                                 for m in messages(caplog, level=logging.ERROR)),
                     what="reload refusal logged")
    assert pair.a.daemon.config is before
    assert pair.a.daemon.election.cfg.priority == 150
    assert pair.a.mover.addresses == VIP_SET
    assert not pair.a.task.done()


@pytest.mark.asyncio
async def test_reload_does_not_claim_to_apply_new_health_checks_it_ignores(
        pair: Pair, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reload that adds a failing health check must either run it (a goes FAULT) or be
    refused with an error; the daemon logs "config reloaded" and keeps its old monitor."""
    pair.start()
    await pair.settled()
    pair.a.write(health=[exec_check(tmp_path / "does-not-exist")])
    pair.a.daemon._on_reload_signal()
    await eventually(lambda: any(m.startswith(("config reloaded", "reload refused"))
                                 for m in messages(caplog)), what="reload outcome logged")
    refused = any(m.startswith("reload refused") and "health" in m for m in messages(caplog))
    if not refused:
        await eventually(lambda: pair.a.state is State.FAULT, timeout=2.0,
                         what="a FAULT from the health check added by the reload")


@pytest.mark.asyncio
@pytest.mark.parametrize("change", [{"exec_user": "nobody"}, {"audit": {"file": "/x.jsonl"}},
                                    {"fence": "kernel"},
                                    {"arbiter": {"witness": ["198.51.100.3:5406"]}}])
async def test_reload_refuses_settings_fixed_at_start(
        pair: Pair, caplog: pytest.LogCaptureFixture, change: dict[str, Any]) -> None:
    pair.start()
    await pair.settled()
    before = pair.a.daemon.config
    (key,) = change
    if before.exec_user == change.get("exec_user"):
        change = {"exec_user": "daemon"}
    pair.a.write(**change, priority=200)
    pair.a.daemon._on_reload_signal()
    await eventually(lambda: any(m.startswith(f"reload refused: {key}")
                                 for m in messages(caplog, level=logging.ERROR)),
                     what=f"reload refusal of {key} logged")
    assert pair.a.daemon.config is before
    assert pair.a.daemon.election.cfg.priority == 150


@pytest.mark.asyncio
async def test_reload_applies_track_interface(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    d = pair.a.daemon
    assert [c.name for c in d.checks.status()] == []
    pair.a.write(track_interface=True)
    d._on_reload_signal()
    await eventually(lambda: [c.name for c in d.checks.status()] == ["link.fake0"],
                     what="the link check added by the reload")


# ---------------------------------------------------------------------------- hooks


@pytest.mark.asyncio
async def test_on_active_hook_gets_the_state_in_its_environment(
        pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT_DIR", str(out))
    hook = write_script(tmp_path / "hook.sh", 'env > "$OUT_DIR/.env.$$"\n'
                        'mv "$OUT_DIR/.env.$$" "$OUT_DIR/hook.$VIPD_STATE"\n')
    pair.a.settings["hooks"] = {"on_active": [str(hook)], "timeout": "2s"}
    pair.start()
    await pair.settled()
    await eventually(lambda: any(m == f"hook on_active {hook} exited 0"
                                 for m in messages(caplog)), what="hook exited 0")
    lines = (out / "hook.ACTIVE").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["VIPD_STATE"] == "ACTIVE"
    assert env["VIPD_TERM"] == str(pair.a.term)
    assert env["VIPD_NODE"] == "a"
    assert env["VIPD_CLUSTER"] == "test"
    assert env["VIPD_VIPS"] == " ".join(VIPS)
    assert env["OUT_DIR"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["hook.ACTIVE"]


@pytest.mark.asyncio
async def test_slow_hook_is_killed_while_heartbeats_keep_flowing(
        pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OUT_DIR", str(tmp_path))
    hook = write_script(tmp_path / "slow.sh", 'echo $$ > "$OUT_DIR/.pid"\n'
                        'mv "$OUT_DIR/.pid" "$OUT_DIR/pid"\nexec /bin/sleep 30\n')
    pair.a.settings["hooks"] = {"on_active": [str(hook)], "timeout": "0.2s"}
    pair.start()
    await pair.settled()
    term = pair.a.term
    await eventually(lambda: (tmp_path / "pid").exists(), what="hook started")
    pid = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 0.6  # > hook timeout + dead interval (100 ms)
    while time.monotonic() < deadline:
        assert (pair.a.state, pair.b.state, pair.a.term) == (State.ACTIVE, State.STANDBY, term)
        await asyncio.sleep(0.01)
    assert pair.b.daemon.election.peer_alive(asyncio.get_running_loop().time())
    assert f"hook on_active {hook} killed after 0.2s" in messages(caplog, level=logging.ERROR)
    await eventually(lambda: gone(pid), what="hook process killed")


@pytest.mark.asyncio
async def test_hook_of_the_final_transition_finishes_before_run_returns(
        pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A graceful stop runs on_standby (ACTIVE -> STOPPED), a hook well within both
    hooks.timeout and the shutdown grace; run() must not return before it has finished
    and its exit is logged (not cancel it and leave the process unsupervised)."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT_DIR", str(out))
    hook = write_script(tmp_path / "hook.sh", 'sleep 0.1\n: > "$OUT_DIR/hook.$VIPD_STATE"\n')
    pair.a.settings["hooks"] = {"on_standby": [str(hook)], "timeout": "0.5s"}
    pair.start()
    await pair.settled()
    assert await pair.a.stop() == 0
    finished_at_exit = (out / "hook.STOPPED").exists()
    logged = [m for m in messages(caplog) if m.startswith("hook on_standby")]
    await asyncio.sleep(0.5)  # let an abandoned hook end while the loop still runs
    assert finished_at_exit, "run() returned before the on_standby hook finished"
    assert logged == [f"hook on_standby {hook} exited 0"]


# ---------------------------------------------------------------------------- rejections


@pytest.mark.asyncio
async def test_foreign_datagrams_are_counted_and_change_nothing(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    before = (pair.a.state, pair.a.term, pair.b.state, pair.b.term)
    # A third node "c" with the right key: authentic, but not the peer a knows.
    intruder = Session(cluster="test", node="c", keys=KeyRing(load_keys(pair.key_file)),
                       boot_id=0xC0FFEE, digest=pair.a.daemon.election.cfg.digest)
    forged = intruder.seal(Advert(state=State.ACTIVE, flags=Flag.HEALTHY, term=before[1] + 9,
                                  priority=254, effective_priority=254), 0.0, time.time_ns())
    datagrams = [b"garbage", b"\x00" * 64, forged]
    target = ("127.0.0.1", pair.a.daemon.config.heartbeat.bind.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for data in datagrams:
            sock.sendto(data, target)
    rejects = pair.a.daemon.metrics.hot.rejected
    await eventually(lambda: sum(rejects.values()) >= len(datagrams), what="rejections counted")
    assert rejects.get("unknown_peer") == 1, rejects
    assert rejects.get("malformed") == 2, rejects
    await asyncio.sleep(0.2)
    assert (pair.a.state, pair.a.term, pair.b.state, pair.b.term) == before
    assert sum(rejects.values()) == len(datagrams)


# ---------------------------------------------------------------------------- logging


@pytest.mark.asyncio
async def test_a_transition_is_logged_once_and_steady_state_is_quiet(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    pair.start()
    await pair.settled()
    to_active = [m for m in messages(caplog) if "-> ACTIVE" in m]
    assert len(to_active) == 1, to_active
    match = re.fullmatch(r"STANDBY -> ACTIVE \((.+)\), term (\d+)(, .*)?", to_active[0])
    assert match is not None, to_active[0]
    assert int(match.group(2)) == pair.a.term
    await asyncio.sleep(0.5)  # let the takeover's announce burst finish
    caplog.clear()
    await asyncio.sleep(1.0)
    assert messages(caplog) == []
    assert (pair.a.state, pair.b.state) == (State.ACTIVE, State.STANDBY)


def test_state_file_is_written_only_when_its_values_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vipd import statefile as statefile_module
    writes: list[str] = []
    real_replace = os.replace

    def counting_replace(src: Any, dst: Any) -> None:
        writes.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(statefile_module.os, "replace", counting_replace)
    state = statefile_module.StateFile(tmp_path / "state")
    state.save(term=3, maintenance=False)
    state.save(term=3, maintenance=False)
    assert len(writes) == 1
    again = statefile_module.StateFile(tmp_path / "state")
    assert again.load() == {"term": 3, "maintenance": False}
    again.save(term=3, maintenance=False)  # what is on disk already
    assert len(writes) == 1
    again.save(term=4, maintenance=False)
    assert len(writes) == 2 and again.load()["term"] == 4


@pytest.mark.asyncio
async def test_a_vip_the_kernel_reports_added_on_the_standby_is_removed_at_once(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """`VipWorker.address_changed(vip, present=True)` (the netlink watch of RTM_NEWADDR):
    a standby with address events checks for stray VIPs only every RECONCILE_WATCHED,
    but an event makes it check now; the holder ignores its own additions."""
    for node in pair.nodes:
        node.settings["vip_lease"] = 0
    pair.start()
    await pair.settled()
    pair.b.daemon.worker.reconcile_every = 3600.0  # as with the watch: no poll soon
    await asyncio.sleep(2 * RECONCILE_EVERY)  # the last short poll is over
    pair.b.mover.addresses |= VIP_SET
    await asyncio.sleep(0.3)
    assert pair.b.mover.addresses == VIP_SET  # nothing polls
    releases = pair.a.mover.call_names().count("release")
    pair.a.daemon.worker.address_changed(str(next(iter(VIP_SET))), True)
    pair.b.daemon.worker.address_changed(str(next(iter(VIP_SET))), True)
    await eventually(lambda: not pair.b.mover.addresses, timeout=1.0,
                     what="b removed the VIPs on the event")
    assert any("while not active" in m for m in messages(caplog, level=logging.WARNING))
    assert pair.a.mover.addresses == VIP_SET
    assert pair.a.mover.call_names().count("release") == releases


@pytest.mark.asyncio
async def test_a_vip_the_kernel_reports_deleted_is_put_back_by_the_holder_only(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """`VipWorker.address_changed` (fed by the netlink watch of RTM_DELADDR): with permanent
    addresses nothing else would ever put the VIP back; a standby does nothing."""
    for node in pair.nodes:
        node.settings["vip_lease"] = 0
    pair.start()
    await pair.settled()
    gone = next(iter(VIP_SET))
    pair.a.mover.addresses.discard(gone)
    acquires = pair.b.mover.call_names().count("acquire")
    pair.a.daemon.worker.address_changed(str(gone), False)
    pair.b.daemon.worker.address_changed(str(gone), False)
    await eventually(lambda: pair.a.mover.addresses == VIP_SET, timeout=1.0,
                     what="a put the deleted VIP back")
    assert any("was missing from" in m and str(gone) in m for m in messages(caplog))
    await asyncio.sleep(0.1)
    assert pair.b.mover.call_names().count("acquire") == acquires  # the standby adds nothing
    # Without the event it stays gone: no renewal of permanent addresses.
    pair.a.mover.addresses.discard(gone)
    await asyncio.sleep(1.0)
    assert gone not in pair.a.mover.addresses
