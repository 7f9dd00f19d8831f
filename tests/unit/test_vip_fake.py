"""FakeMover, announce_burst and the pure helpers of vipd.movers (no kernel needed)."""

from __future__ import annotations

import asyncio
import math
import time
from ipaddress import IPv4Interface, IPv6Interface

import pytest

from support.fakes import FakeMover
from vipd.errors import VipError
from vipd.movers.base import INFINITY_LIFE_TIME, VipMover, announce_burst, lifetime_seconds
from vipd.movers.netlink import NetlinkMover, vipd_label

V4 = IPv4Interface("198.51.100.200/32")
V6 = IPv6Interface("2001:db8:1::200/128")


def test_both_movers_satisfy_the_protocol():
    assert isinstance(FakeMover([V4]), VipMover)
    assert isinstance(NetlinkMover("eth0", [V4]), VipMover)


def test_netlink_mover_drops_duplicate_vips_keeping_order():
    assert NetlinkMover("eth0", [V6, V4, V6]).vips == (V6, V4)


@pytest.mark.parametrize(("lease", "expected"), [
    (0, INFINITY_LIFE_TIME), (0.0, INFINITY_LIFE_TIME), (0.2, 1), (1, 1), (2.5, 3),
    (3, 3), (1e12, INFINITY_LIFE_TIME - 1),
])
def test_lifetime_seconds_rounds_up(lease, expected):
    assert lifetime_seconds(lease) == expected


@pytest.mark.parametrize("lease", [-1, -0.1, math.inf, math.nan])
def test_lifetime_seconds_rejects_nonsense(lease):
    with pytest.raises(ValueError, match="lease"):
        lifetime_seconds(lease)


def test_label_only_when_it_fits_ifnamsiz():
    assert vipd_label("eth0") == "eth0:vipd"
    assert vipd_label("enp0s31f6a") == "enp0s31f6a:vipd"  # 15 characters
    assert vipd_label("enp0s31f6ab") is None


@pytest.mark.asyncio
async def test_fake_mover_tracks_addresses_and_calls():
    mover = FakeMover([V4, V6])
    assert await mover.held() == set()
    await mover.acquire(3)
    await mover.acquire(3)
    assert await mover.held() == {V4, V6}
    assert mover.lease == 3
    mover.expire()
    assert await mover.held() == set()
    await mover.acquire(0)
    await mover.announce()
    await mover.release()
    await mover.release()
    assert await mover.held() == set()
    assert mover.announcements == 1
    assert mover.call_names() == ["held", "acquire", "acquire", "held", "held", "acquire",
                                  "announce", "release", "release", "held"]
    assert mover.calls[1] == ("acquire", 3)


@pytest.mark.asyncio
async def test_fake_mover_held_ignores_foreign_addresses():
    mover = FakeMover([V4])
    mover.addresses.add(IPv4Interface("203.0.113.7/32"))
    await mover.release()
    assert await mover.held() == set()
    assert mover.addresses == {IPv4Interface("203.0.113.7/32")}


@pytest.mark.asyncio
async def test_fake_mover_fails_on_demand_and_heals():
    mover = FakeMover([V4])
    mover.fail("acquire")
    for _ in range(2):
        with pytest.raises(VipError, match="acquire"):
            await mover.acquire(3)
    assert await mover.held() == set()
    mover.heal("acquire")
    await mover.acquire(3)
    boom = VipError("interface eth9 vanished")
    mover.fail("release", boom, times=1)
    with pytest.raises(VipError) as caught:
        await mover.release()
    assert caught.value is boom
    await mover.release()
    assert mover.call_names() == ["acquire", "acquire", "held", "acquire", "release",
                                  "release"]


def test_fake_mover_rejects_unknown_methods():
    with pytest.raises(ValueError, match="no method"):
        FakeMover().fail("acquier")


@pytest.mark.asyncio
async def test_announce_burst_counts_and_spaces_rounds(monkeypatch):
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    mover = FakeMover([V4])
    await announce_burst(mover, 3, 0.1)
    assert mover.announcements == 3
    assert sleeps == [0.1, 0.1]
    await announce_burst(mover, 0, 0.1)
    assert mover.announcements == 3


@pytest.mark.asyncio
async def test_announce_burst_stops_when_it_wakes_late(monkeypatch):
    """A process frozen mid-burst (SIGSTOP, a paused VM) must not finish the burst when it
    resumes: another node may hold the VIPs by then."""
    async def stalled_sleep(delay: float) -> None:
        time.sleep(delay + 0.15)  # the whole process stops, the clock runs on

    mover = FakeMover([V4])
    assert await announce_burst(mover, 3, 0.01, late_limit=1.0) == 3
    monkeypatch.setattr(asyncio, "sleep", stalled_sleep)
    assert await announce_burst(mover, 3, 0.01, late_limit=0.1) == 1
    assert mover.announcements == 4


@pytest.mark.asyncio
async def test_announce_burst_keeps_going_after_a_failure():
    mover = FakeMover([V4])
    mover.fail("announce", times=2)
    with pytest.raises(VipError) as caught:
        await announce_burst(mover, 4, 0)
    assert mover.call_names() == ["announce"] * 4
    assert mover.announcements == 2
    assert "2 of 4 announcement rounds failed" in caught.value.__notes__


@pytest.mark.asyncio
async def test_announce_burst_rejects_negative_arguments():
    with pytest.raises(ValueError):
        await announce_burst(FakeMover(), -1, 0.1)
