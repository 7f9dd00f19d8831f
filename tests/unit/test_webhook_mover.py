"""The webhook mover and the remote-mover runner against the reference receiver
(vipd.movers.webhook_receiver), a real aiohttp server on loopback with injected faults:
500s, slow answers (applied, but after the client gave up), a replayed request, a
resource moved by hand, a healed partition's older holder."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from vipd.movers.remote import MoverState, RemoteMoverRunner
from vipd.movers.webhook import WebhookMover
from vipd.movers.webhook_receiver import Holding, Receiver

SECRET = b"s3cret-for-tests-only"
VIPS = ["198.51.100.10/32", "2001:db8::10/128"]
RECONCILE = 0.2
TIMEOUT = 0.15


@dataclass
class Lab:
    receiver: Receiver
    url: str
    faults: list[str] = field(default_factory=list)  # one per request, in order
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    runners: list[tuple[RemoteMoverRunner, asyncio.Task[None], WebhookMover]] = field(
        default_factory=list)
    superseded: list[str] = field(default_factory=list)
    observed: list[tuple[str, str]] = field(default_factory=list)
    corrections: int = 0

    def runner(self, node: str, *, verify: bool = True,
               may_call: Any = lambda: True) -> RemoteMoverRunner:
        mover = WebhookMover(url=f"{self.url}/vip",
                             verify_url=f"{self.url}/vip" if verify else None,
                             secret=SECRET, cluster="web", node=node, vips=VIPS)

        def count() -> None:
            self.corrections += 1

        runner = RemoteMoverRunner(
            mover, node, reconcile=RECONCILE, timeout=TIMEOUT, may_call=may_call,
            on_superseded=self.superseded.append,
            observe=lambda op, code, took, err: self.observed.append((op, code)),
            on_verified=lambda took: None, on_correction=count)
        self.runners.append((runner, asyncio.create_task(runner.run()), mover))
        return runner

    def holders(self) -> set[tuple[str | None, int]]:
        return {(h.node, h.term) for h in self.receiver.state.values()}

    def accepted_twice(self) -> list[Any]:
        applied = self.receiver.applied
        return [a for i, a in enumerate(applied) if a in applied[:i]]


@pytest_asyncio.fixture
async def lab() -> AsyncIterator[Lab]:
    receiver = Receiver(SECRET)
    box: list[Lab] = []

    @web.middleware
    async def inject(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        box[0].requests.append((request.method, dict(request.headers), body))
        fault = box[0].faults.pop(0) if box[0].faults else None
        if fault == "500":
            return web.Response(status=500, text="injected")
        if fault == "slow":  # applied, but the answer comes after the client's timeout
            response = await handler(request)
            await asyncio.sleep(TIMEOUT * 2)
            return response
        return await handler(request)

    app = receiver.app()
    app.middlewares.append(inject)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    box.append(Lab(receiver, f"http://127.0.0.1:{port}"))
    try:
        yield box[0]
    finally:
        for _, task, mover in box[0].runners:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await mover.close()
        await runner.cleanup()


async def until(cond: Any, timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_acquire_is_verified_and_every_vip_points_at_the_holder(lab: Lab) -> None:
    a = lab.runner("a")
    a.hold(3)
    await until(lambda: a.state is MoverState.VERIFIED)
    assert lab.holders() == {("a", 3)}
    assert len(lab.receiver.applied) == len(VIPS) and lab.accepted_twice() == []
    assert a.status(time.monotonic()).holder == "a"


@pytest.mark.asyncio
async def test_500s_are_retried_until_accepted(lab: Lab) -> None:
    lab.faults += ["500", "500"]
    a = lab.runner("a")
    a.hold(3)
    await until(lambda: a.state is MoverState.VERIFIED)
    assert lab.holders() == {("a", 3)} and lab.accepted_twice() == []
    assert ("acquire", "http_500") in lab.observed


@pytest.mark.asyncio
async def test_an_answer_after_the_timeout_is_retried_and_applied_once(lab: Lab) -> None:
    lab.faults += ["slow"]
    a = lab.runner("a")
    a.hold(3)
    await until(lambda: a.state is MoverState.VERIFIED)
    assert ("acquire", "timeout") in lab.observed
    assert lab.holders() == {("a", 3)}
    assert lab.accepted_twice() == []  # the retry was the same term: no second change


@pytest.mark.asyncio
async def test_a_replayed_request_is_refused_and_changes_nothing(lab: Lab) -> None:
    a = lab.runner("a")
    a.hold(3)
    await until(lambda: a.state is MoverState.VERIFIED)
    b = lab.runner("b")
    b.hold(4)
    await until(lambda: lab.holders() == {("b", 4)})
    # an attacker replays a's signed acquire (term 3) byte for byte
    _, headers, body = next(r for r in lab.requests if r[0] == "POST" and b'"a"' in r[2])
    signed = {k: v for k, v in headers.items() if k.startswith("X-Vipd")}
    async with aiohttp.ClientSession() as session, session.post(
            f"{lab.url}/vip", data=body, headers=signed) as resp:
        assert resp.status == 401
    assert lab.receiver.refused[-1] == "replayed request"
    assert lab.holders() == {("b", 4)} and lab.accepted_twice() == []


@pytest.mark.asyncio
async def test_the_lower_term_holder_yields_after_a_healed_partition(lab: Lab) -> None:
    a = lab.runner("a")
    a.hold(3)
    await until(lambda: a.state is MoverState.VERIFIED)
    b = lab.runner("b")  # took over while a was cut off
    b.hold(4)
    await until(lambda: b.state is MoverState.VERIFIED)
    applied = len(lab.receiver.applied)
    await until(lambda: a.state is MoverState.SUPERSEDED)
    assert lab.superseded and "term 4" in lab.superseded[0]
    await asyncio.sleep(3 * RECONCILE)
    assert lab.holders() == {("b", 4)}  # a never re-asserted
    assert not any(node == "a" for _, _, node, _, _ in lab.receiver.applied[applied:])


@pytest.mark.asyncio
async def test_a_resource_moved_by_hand_is_moved_back_within_a_reconcile_period(
        lab: Lab) -> None:
    a = lab.runner("a")
    a.hold(3)
    await until(lambda: a.state is MoverState.VERIFIED)
    for key in list(lab.receiver.state):
        lab.receiver.state[key] = Holding("elsewhere", 3)  # someone's console
    moved = time.monotonic()
    await until(lambda: lab.holders() == {("a", 3)})
    # one reconcile period plus the calls; 3 x as the bound on a shared machine
    assert time.monotonic() - moved < 3 * RECONCILE
    await until(lambda: a.state is MoverState.VERIFIED)
    assert lab.corrections >= 1


@pytest.mark.asyncio
async def test_no_call_while_the_node_may_not_hold_and_a_release_when_it_drops(
        lab: Lab) -> None:
    allowed = [False]
    a = lab.runner("a", may_call=lambda: allowed[0])
    a.hold(3)
    await asyncio.sleep(0.2)
    assert a.state is MoverState.WAITING and lab.requests == []
    allowed[0] = True
    await until(lambda: a.state is MoverState.VERIFIED)
    a.drop()
    await until(lambda: lab.holders() == {(None, 3)})
    assert a.state is MoverState.IDLE


@pytest.mark.asyncio
async def test_a_wrong_secret_is_refused_and_reported(lab: Lab) -> None:
    a = lab.runner("a")
    a.mover._secret = b"wrong"  # type: ignore[attr-defined]
    a.hold(3)
    await until(lambda: a.state is MoverState.ERROR)
    assert lab.receiver.refused[0] == "bad signature" and lab.holders() == set()
    assert ("acquire", "http_401") in lab.observed
