"""The daemon with a remote mover (config `movers: [netlink, {webhook: ...}]`): the loopback
pair of tests/support/daemons.py moving the reference receiver's state
(vipd.movers.webhook_receiver), a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from support.daemons import VIPS, Pair, eventually
from vipd.cli import main
from vipd.keys import generate_key_line
from vipd.movers.webhook_receiver import Receiver
from vipd.vipctl import render_status

SECRET = "0123456789abcdef0123456789abcdef"


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rx = Receiver(SECRET.encode())
    runner = web.AppRunner(rx.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield rx, f"http://127.0.0.1:{port}/vip"
    finally:
        await runner.cleanup()


def with_webhook(pair: Pair, tmp_path: Path, url: str) -> None:
    secret = tmp_path / "webhook.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(SECRET + "\n")
    for node in pair.nodes:
        node.settings["movers"] = ["netlink", {"webhook": {
            "url": url, "verify_url": url, "secret_file": str(secret), "insecure": True,
            "timeout": "500ms", "reconcile": "200ms"}}]


@pytest.mark.asyncio
async def test_the_receiver_follows_the_holder_through_a_crash(
        pair: Pair, tmp_path: Path, receiver: tuple[Receiver, str]) -> None:
    rx, url = receiver
    with_webhook(pair, tmp_path, url)
    pair.start()
    await pair.settled()

    def holders() -> set[tuple[str | None, int]]:
        return {(h.node, h.term) for h in rx.state.values()}

    # one POST per VIP: both VIPs must be there (the first alone would match the set)
    await eventually(lambda: len(rx.state) == len(VIPS) and holders() == {("a", pair.a.term)},
                     what="receiver: a holds every VIP")
    await eventually(lambda: pair.a.daemon.worker.remotes[0].state.value == "verified",
                     what="a's webhook mover verified")
    status = await pair.a.daemon.status()
    assert [(m.name, m.state, m.holder) for m in status.movers] == [
        ("webhook", "verified", "a")]
    assert "mover webhook: verified (provider: a, term" in render_status(status.to_json())
    await pair.a.crash()
    await eventually(lambda: holders() == {("b", pair.b.term)}, what="receiver: b holds")
    assert pair.b.term > 0
    accepted = [a for a in rx.applied if a[3] == pair.b.term]
    assert len(accepted) == len(VIPS)  # one change per VIP, none twice
    took = pair.b.daemon.metrics.mover_verified.labels("webhook")
    await eventually(lambda: took._sum.get() > 0, what="time to verified ownership observed")
    await asyncio.sleep(0.5)  # reconcile rounds: the state stays with b
    assert holders() == {("b", pair.b.term)}


@pytest.mark.asyncio
async def test_check_config_refuses_a_webhook_secret_others_can_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "webhook.secret"
    secret.write_text(SECRET)
    secret.chmod(0o644)
    key = tmp_path / "web.key"
    key.write_text(generate_key_line(1) + "\n")
    key.chmod(0o600)
    config = tmp_path / "web.yaml"
    config.write_text(
        "node: a\ncluster: web\ninterface: eth0\nvips: [198.51.100.10/32]\n"
        "heartbeat: {bind: 198.51.100.1:5405, peers: [198.51.100.2:5405]}\n"
        f"auth: {{key_file: {key}}}\n"
        f"movers: [netlink, {{webhook: {{url: 'https://ipam.example/vip', "
        f"secret_file: {secret}}}}}]\n")
    assert main(["check-config", str(config)]) == 2
    assert f"{secret}: mode 0644 gives access to group/others" in capsys.readouterr().err
    secret.chmod(0o600)
    assert main(["check-config", str(config)]) == 0
    capsys.readouterr()
    config.write_text(config.read_text().replace("https://ipam", "http://ipam"))
    assert main(["check-config", str(config)]) == 2
    assert "movers[1].webhook.url: http://ipam.example/vip is not https" in \
        capsys.readouterr().err
