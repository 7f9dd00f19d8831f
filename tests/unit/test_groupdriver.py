"""vipd/groupdriver.py: how the runtime carries out the group rule's etcd actions, against
a store that answers when the test says so (the real etcd is in tests/integration)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

import pytest

from support.fakes import FakeMover
from vipd.arbiter.etcd import EtcdError
from vipd.config import Config
from vipd.core import election as el
from vipd.core import group as g
from vipd.core.protocol import State
from vipd.groupdriver import GroupDriver, group_config
from vipd.hooks import HookRunner
from vipd.metrics import build_metrics
from vipd.statefile import StateFile
from vipd.systemd import Notifier
from vipd.vipworker import VipWorker

VIP = "198.51.100.10/32"


class GatedStore:
    """An etcd store whose calls wait until the test opens their gate; records calls."""

    timeout = 0.25

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()
        self.watches = 0
        self.in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}
        self.views: asyncio.Queue[g.Observed] = asyncio.Queue()

    def gate(self, call: str) -> asyncio.Event:
        return self.gates.setdefault(call, asyncio.Event())

    async def _answer(self, call: str, *args: Any) -> None:
        self.calls.append((call, *args))
        self.in_flight[call] = self.in_flight.get(call, 0) + 1
        self.most_in_flight[call] = max(self.most_in_flight.get(call, 0), self.in_flight[call])
        try:
            if call in self.gates:
                await self.gates[call].wait()
        finally:
            self.in_flight[call] -= 1
        if call in self.fail:
            raise EtcdError(f"etcd 198.51.100.5:2379: {call}: no answer within 250 ms")

    async def grant(self, ttl: float) -> tuple[int, float]:
        await self._answer("grant", ttl)
        return 0x10, 2.0  # etcd raised the TTL

    async def keep_alive(self, lease: int) -> float:
        await self._answer("keep-alive", lease)
        return 2.0

    async def publish(self, member: g.Member, lease: int) -> None:
        await self._answer("publish", member.state, member.healthy)

    async def claim(self, lease: int) -> tuple[bool, g.Holder | None]:
        await self._answer("claim", lease)
        return True, g.Holder("a", 7, lease)

    async def resign(self, revision: int, successor: str | None) -> bool:
        await self._answer("resign", revision, successor)
        return True

    async def revoke(self, lease: int) -> None:
        await self._answer("revoke", lease)

    async def watch(self, on_change: Any) -> None:
        self.watches += 1
        await self._answer("watch")
        while True:
            on_change(await self.views.get())

    async def close(self) -> None:
        pass


def group_driver(tmp_path: Path, store: GatedStore) -> GroupDriver:
    config = Config.model_validate({
        "node": "a", "cluster": "web", "interface": "fake0", "vips": [VIP],
        "arbiter": {"etcd": {"endpoints": ["198.51.100.5:2379"]}},
        "state_dir": str(tmp_path), "api": {"listen": None}, "metrics": {"listen": None}})
    metrics = build_metrics()
    worker = VipWorker(config, FakeMover([ip_interface(VIP)]), metrics, lambda ev: None)
    # no start wait: these tests are about the driver (tests/unit/test_group.py has it)
    election = g.GroupElection(replace(group_config(config), start_wait=0.0))
    return GroupDriver(config, election, store, worker,  # type: ignore[arg-type]
                       HookRunner(config, metrics, preexec=None), StateFile(tmp_path),
                       Notifier({}), metrics, on_finished=lambda: None)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_one_record_put_in_flight_and_the_newest_goes_next(tmp_path: Path,
                                                                 caplog: Any) -> None:
    store = GatedStore()
    driver = group_driver(tmp_path, store)
    driver.attach()
    driver.start()
    await settle()
    assert driver.granted_ttl == 2.0 and driver.election.ttl == 2.0
    assert "etcd granted a lease TTL of 2 s for the 1 s asked" in caplog.text
    publish = store.gate("publish")  # from now on puts wait for the test
    before = len(store.calls)
    driver.handle(el.HealthChanged(True))  # STANDBY healthy: a new record ...
    await settle()  # ... whose put is in flight now
    driver.handle(el.HealthChanged(False, "down"))  # FAULT: another record
    driver.handle(el.HealthChanged(True))  # and back: the newest
    await settle()
    assert store.calls[before:] == [("publish", State.STANDBY, True)]  # one in flight
    publish.set()
    await settle()
    # the FAULT record in between was never sent; the newest went after the first put
    assert store.calls[before:] == [("publish", State.STANDBY, True)] * 2
    assert store.most_in_flight["publish"] == 1
    driver.stop()


@pytest.mark.asyncio
async def test_a_clean_stop_revokes_the_lease_only_after_the_resign(tmp_path: Path) -> None:
    store = GatedStore()
    driver = group_driver(tmp_path, store)
    driver.attach()
    driver.start()
    driver.handle(el.HealthChanged(True))
    await settle()
    driver.handle(g.Observed(None, {"a": driver.election.member()}, revision=3))
    await settle()
    assert driver.election.state is State.ACTIVE
    resign = store.gate("resign")
    driver.handle(el.Shutdown())
    await settle()
    assert driver.election.finished
    names = [c[0] for c in store.calls]
    assert "resign" in names and "revoke" not in names  # the revoke waits for it
    resign.set()
    await settle()
    names = [c[0] for c in store.calls]
    assert names.count("revoke") == 1 and names.index("revoke") > names.index("resign")
    assert ("resign", 7, None) in store.calls
    await driver.close(0.5)


@pytest.mark.asyncio
async def test_failed_calls_are_a_named_state_and_the_watch_starts_over_after(
        tmp_path: Path, caplog: Any) -> None:
    store = GatedStore()
    driver = group_driver(tmp_path, store)
    driver.attach()
    watch = asyncio.ensure_future(driver.tasks()[0][0])
    driver.start()
    await settle()
    assert store.watches == 1 and driver.election.store is g.Store.OK
    store.fail.add("keep-alive")
    driver.election.timers.keepalive_due = driver.loop_time()  # a keep-alive now
    driver.handle(el.Tick())
    await settle()
    assert driver.election.store is g.Store.UNREACHABLE
    assert "etcd: ok -> unreachable (etcd 198.51.100.5:2379: keep-alive" in caplog.text
    assert driver.metrics.etcd_errors.labels("keep-alive")._value.get() == 1
    store.fail.clear()
    driver.election.timers.keepalive_due = driver.loop_time()
    driver.handle(el.Tick())
    for _ in range(30):  # the watch restarts after WATCH_RETRY (0.1 s)
        await asyncio.sleep(0.01)
    assert driver.election.store is g.Store.OK
    assert store.watches == 2  # a fresh read of the group
    watch.cancel()
    driver.stop()


@pytest.mark.asyncio
async def test_a_member_with_other_settings_is_reported_once(tmp_path: Path,
                                                           caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="vipd.groupdriver")
    store = GatedStore()
    driver = group_driver(tmp_path, store)
    driver.attach()
    watch = asyncio.ensure_future(driver.tasks()[0][0])
    driver.start()
    await settle()
    ours = driver.election.member()
    other = g.Member("b", 100, State.STANDBY, True, digest="0123456789abcdef")
    for revision in (5, 6):
        await store.views.put(g.Observed(None, {"a": ours, "b": other}, revision=revision))
        await settle()
    assert caplog.text.count("member b publishes other group settings") == 1
    fixed = g.Member("b", 100, State.STANDBY, True, digest=ours.digest)
    await store.views.put(g.Observed(None, {"a": ours, "b": fixed}, revision=7))
    await settle()
    assert "member b's group settings agree with ours again" in caplog.text
    watch.cancel()
    driver.stop()


@pytest.mark.asyncio
async def test_a_group_node_persists_its_running_mark_and_its_failures(tmp_path: Path,
                                                                       caplog: Any) -> None:
    """Flap damping's runtime side in a group: the mark a crash leaves, each failure
    written at once, one log line."""
    store = GatedStore()
    driver = group_driver(tmp_path, store)
    driver.attach()
    driver.start()
    await settle()
    assert StateFile(tmp_path).load()["running"] is True
    driver.handle(el.HealthChanged(True))
    driver.handle(el.HealthChanged(False, "probe web: 503"))
    saved = StateFile(tmp_path).load()
    assert [f["cause"] for f in saved["flaps"]] == ["health"]
    assert "flap damping: health check failed: probe web: 503" in caplog.text
    assert driver.metrics.flaps.labels("health")._value.get() == 1
    driver.stop()
