"""The aws mover (vipd/movers/aws.py) against moto in server mode on loopback: a real HTTP
EC2 emulator, fake credentials, the instance-metadata lookup disabled. No test contacts
a real provider or a metadata address.

moto is laxer than EC2: it ignores AllowReassignment and would leave one address on two
ENIs. The tests therefore check exactly-one-holder through Describe after every step,
which holds because vipd removes the address from the other ENI before assigning it
(what EC2 does itself with AllowReassignment)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from support.cloud import REGION, ROUTED, VIP, Vpc, fake_credentials, moto_url, vpc
from vipd.movers.aws import AwsMover
from vipd.movers.remote import MoverError, MoverState, RemoteMoverRunner

__all__ = ["fake_credentials", "moto_url", "vpc"]  # fixtures used by name

@pytest.mark.asyncio
async def test_acquire_moves_the_secondary_ip_and_the_elastic_ip_never_to_two_enis(
        vpc: Vpc) -> None:
    a, b = vpc.mover("a"), vpc.mover("b")
    try:
        await a.acquire(3)
        assert vpc.ip_holders() == [vpc.enis["a"]] and vpc.eip_holder() == vpc.enis["a"]
        assert (await a.verify()).node == "a" and (await b.verify()).term == 3
        await b.acquire(4)  # b took over
        assert vpc.ip_holders() == [vpc.enis["b"]]  # one ENI, whatever moto allows
        assert vpc.eip_holder() == vpc.enis["b"]
        seen = await a.verify()
        assert (seen.node, seen.term) == ("b", 4)
        with pytest.raises(MoverError) as info:
            await a.acquire(3)  # the older holder after a healed partition: yields
        assert info.value.superseded
        assert vpc.ip_holders() == [vpc.enis["b"]] and vpc.eip_holder() == vpc.enis["b"]
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_a_route_outside_the_vpc_follows_the_holder(vpc: Vpc) -> None:
    kw: dict[str, Any] = {"secondary_ips": False, "elastic_ips": [],
                          "route_tables": [vpc.table], "vips": [f"{ROUTED}/32"]}
    a, b = vpc.mover("a", **kw), vpc.mover("b", **kw)
    try:
        await a.acquire(3)  # no route yet: created
        assert vpc.route_target() == vpc.enis["a"]
        await b.acquire(4)  # replaced
        assert vpc.route_target() == vpc.enis["b"]
        seen = await b.verify()
        assert (seen.node, seen.term) == ("b", 4)
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_the_holder_moves_back_what_was_moved_by_hand(vpc: Vpc) -> None:
    corrections: list[int] = []
    b = vpc.mover("b")
    runner = RemoteMoverRunner(
        b, "b", reconcile=0.2, timeout=5.0, may_call=lambda: True,
        on_superseded=lambda why: None, observe=lambda *args: None,
        on_verified=lambda took: None, on_correction=lambda: corrections.append(1))
    task = asyncio.create_task(runner.run())
    try:
        runner.hold(4)
        await _until(lambda: runner.state is MoverState.VERIFIED)
        assert vpc.ip_holders() == [vpc.enis["b"]] and vpc.eip_holder() == vpc.enis["b"]
        # someone in the console: the Elastic IP to a's ENI (whose address is its primary)
        vpc.ec2.associate_address(AllocationId=vpc.allocation,
                                  NetworkInterfaceId=vpc.enis["a"], AllowReassociation=True)
        assert vpc.eip_holder() == vpc.enis["a"]
        await _until(lambda: vpc.eip_holder() == vpc.enis["b"], timeout=5.0)
        assert corrections and vpc.ip_holders() == [vpc.enis["b"]]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await b.close()


@pytest.mark.asyncio
async def test_an_unreachable_endpoint_is_a_retried_named_error(vpc: Vpc) -> None:
    mover = AwsMover(region=REGION, eni=vpc.enis["a"], cluster="web", node="a",
                     vips=[f"{VIP}/32"], secondary_ips=True, elastic_ips=[],
                     route_tables=[], endpoint_url="http://127.0.0.1:9")
    try:
        with pytest.raises(MoverError) as info:
            await mover.acquire(3)
        assert info.value.retry and info.value.code == "EndpointConnectionError"
    finally:
        await mover.close()


async def _until(cond: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.05)
