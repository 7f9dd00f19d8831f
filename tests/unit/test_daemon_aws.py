"""The daemon with `movers: [netlink, {aws: ...}]` against moto (tests/support/cloud.py):
the loopback pair of tests/support/daemons.py; a crash moves the secondary IP and the
Elastic IP to the standby's ENI, and at every Describe sample at most one ENI holds the
address."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from support.cloud import REGION, VIP, Vpc, fake_credentials, moto_url, vpc
from support.daemons import Pair, eventually

__all__ = ["fake_credentials", "moto_url", "vpc"]  # fixtures used by name


@pytest_asyncio.fixture
async def aws_pair(pair: Pair, vpc: Vpc) -> AsyncIterator[Pair]:
    for node in pair.nodes:
        node.settings["vips"] = [f"{VIP}/32"]
        node.settings["movers"] = ["netlink", {"aws": {
            "region": REGION, "eni": vpc.enis[node.name], "endpoint_url": vpc.url,
            "elastic_ips": [{"allocation_id": vpc.allocation, "private_ip": VIP}],
            "timeout": "5s", "reconcile": "500ms"}}]
    yield pair


class Sampler:
    """Describe every 50 ms in a thread: every set of ENIs holding the VIP it saw."""

    def __init__(self, vpc: Vpc) -> None:
        self.vpc, self.seen = vpc, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.append((time.monotonic(), tuple(self.vpc.ip_holders())))
            self._stop.wait(0.05)

    def stop(self) -> list[tuple[float, tuple[str, ...]]]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


@pytest.mark.asyncio
async def test_a_crash_moves_the_secondary_ip_and_the_elastic_ip_to_the_standby(
        aws_pair: Pair, vpc: Vpc) -> None:
    pair = aws_pair
    pair.start()
    await pair.settled()
    sampler = Sampler(vpc)
    try:
        await eventually(lambda: vpc.ip_holders() == [vpc.enis["a"]]
                         and vpc.eip_holder() == vpc.enis["a"], timeout=10,
                         what="the VIP and the Elastic IP on a's ENI")
        await eventually(lambda: pair.a.daemon.worker.remotes[0].state.value == "verified",
                         timeout=10, what="a's aws mover verified")
        await pair.a.crash()
        crashed = time.monotonic()
        await eventually(lambda: vpc.ip_holders() == [vpc.enis["b"]]
                         and vpc.eip_holder() == vpc.enis["b"], timeout=10,
                         what="the VIP and the Elastic IP on b's ENI")
        moved = time.monotonic() - crashed
        await eventually(lambda: pair.b.daemon.worker.remotes[0].state.value == "verified",
                         timeout=10, what="b's aws mover verified")
        status = await pair.b.daemon.status()
        assert (status.movers[0].holder, status.movers[0].term) == ("b", pair.b.term)
        await asyncio.sleep(1.0)  # reconcile rounds on b: nothing moves back
    finally:
        samples = sampler.stop()
    assert vpc.ip_holders() == [vpc.enis["b"]] and vpc.eip_holder() == vpc.enis["b"]
    assert all(len(holders) <= 1 for _, holders in samples), \
        [s for s in samples if len(s[1]) > 1]
    assert len(samples) > 20
    assert moved < 10
