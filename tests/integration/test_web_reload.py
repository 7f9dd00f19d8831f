"""A reload (SIGHUP) reads the web config of /metrics again, as the Prometheus
exporter-toolkit re-reads its file: a renewed certificate, other users, TLS turned on take
effect without a restart, the port never shut; a broken web config keeps the running one.
All on 127.0.0.1 with real TLS (a throwaway PKI made with openssl) and bcrypt hashes."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml
from aiohttp import web

from support.daemons import Pair, eventually, free_tcp_port, free_udp_ports
from support.pki import Pki, make_pki
from vipd.configtypes import Endpoint
from vipd.errors import VipdError
from vipd.keys import generate_key_line
from vipd.webconfig import WebListener, load_web_config, start_http

REPO = Path(__file__).resolve().parents[2]
ALICE, BOB = ("alice", "alice-secret-1"), ("bob", "bob-secret-2")


def pki_in(d: Path) -> Pki:
    d.mkdir(parents=True)
    return make_pki(d)


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


def web_config(path: Path, pki: Pki | None, *users: tuple[str, str]) -> Path:
    doc: dict[str, Any] = {"basic_auth_users": {u: hashed(p) for u, p in users}}
    if pki is not None:
        doc["tls_server_config"] = {"cert_file": str(pki.server_cert),
                                    "key_file": str(pki.server_key)}
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


async def get(url: str, user: tuple[str, str], ca: Path | None = None) -> int | str:
    """The status of GET ``url`` as ``user``, trusting only ``ca``; or the error's name."""
    ctx: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else False
    auth = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    try:
        async with aiohttp.ClientSession() as session, session.get(
                url, ssl=ctx, headers={"Authorization": auth},
                timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def serve(file: Path, port: int) -> WebListener:
    app = web.Application()
    app.router.add_get("/metrics", hello)
    return await start_http(app, Endpoint.parse(f"127.0.0.1:{port}"), file,
                            "metrics.listen", 0.1)


@pytest.mark.asyncio
async def test_a_renewed_certificate_and_new_users_apply_without_a_restart(
        tmp_path: Path) -> None:
    old_pki, new_pki = pki_in(tmp_path / "old"), pki_in(tmp_path / "new")
    file = web_config(tmp_path / "web.yml", old_pki, ALICE)
    port = free_tcp_port()
    url = f"https://127.0.0.1:{port}/metrics"
    served = await serve(file, port)
    try:
        assert await get(url, ALICE, old_pki.ca) == 200
        assert await get(url, BOB, old_pki.ca) == 401
        web_config(file, new_pki, BOB)
        await served.apply(load_web_config(file))
        assert await get(url, BOB, new_pki.ca) == 200
        assert await get(url, ALICE, new_pki.ca) == 401  # alice is gone
        assert await get(url, BOB, old_pki.ca) == "ClientConnectorCertificateError"
    finally:
        await served.runner.cleanup()


@pytest.mark.asyncio
async def test_tls_turned_on_by_a_reload_and_the_port_never_shut(tmp_path: Path) -> None:
    pki = pki_in(tmp_path / "pki")
    file = web_config(tmp_path / "web.yml", None, ALICE)
    port = free_tcp_port()
    served = await serve(file, port)
    refused: list[str] = []
    done = asyncio.Event()

    async def connect_all_the_time() -> None:
        while not done.is_set():
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                refused.append(str(exc))
            else:
                # not at once: a client gone during asyncio's TLS accept leaves a
                # transport that only the garbage collector closes (pytest reports it)
                await asyncio.sleep(0.005)
                writer.close()
                await writer.wait_closed()

    probe = asyncio.create_task(connect_all_the_time())
    try:
        assert await get(f"http://127.0.0.1:{port}/metrics", ALICE) == 200
        web_config(file, pki, ALICE)
        await served.apply(load_web_config(file))
        assert await get(f"https://127.0.0.1:{port}/metrics", ALICE, pki.ca) == 200
        assert await get(f"http://127.0.0.1:{port}/metrics", ALICE) != 200
        assert served.scheme == "https"
    finally:
        done.set()
        await probe
        await served.runner.cleanup()
    assert refused == []


@pytest.mark.asyncio
async def test_sighup_reloads_the_web_config_and_a_broken_one_keeps_the_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pki = pki_in(tmp_path / "pki")
    file = web_config(tmp_path / "web.yml", pki, ALICE)
    port = free_tcp_port()
    url = f"https://127.0.0.1:{port}/metrics"
    pair = Pair(tmp_path)
    pair.a.settings["metrics"] = {"listen": f"127.0.0.1:{port}", "web_config_file": str(file)}
    try:
        pair.start()
        await pair.settled()
        assert await get(url, ALICE, pki.ca) == 200

        web_config(file, pki, BOB)
        pair.a.daemon._on_reload_signal()
        await eventually(lambda: "web config reloaded" in caplog.text)
        assert await get(url, BOB, pki.ca) == 200
        assert await get(url, ALICE, pki.ca) == 401

        file.write_text("basic_auth_users: {carol: not-a-hash}\n")
        pair.a.daemon._on_reload_signal()
        await eventually(lambda: "reload failed" in caplog.text)
        assert str(file) in caplog.text and "basic_auth_users.carol" in caplog.text
        assert await get(url, BOB, pki.ca) == 200  # still the last good one
    finally:
        await pair.close()


@pytest.mark.asyncio
async def test_a_reload_whose_socket_cannot_listen_keeps_the_old_one(tmp_path: Path) -> None:
    file = web_config(tmp_path / "web.yml", None, ALICE)
    port = free_tcp_port()
    served = await serve(file, port)
    try:
        served.listen = Endpoint.parse("198.51.100.77:9")  # not an address of this host
        web_config(file, None, BOB)
        with pytest.raises(VipdError, match=r"cannot listen on metrics\.listen"):
            await served.apply(load_web_config(file))
        assert await get(f"http://127.0.0.1:{port}/metrics", ALICE) == 200
    finally:
        await served.runner.cleanup()


@pytest.mark.asyncio
async def test_the_witness_reads_its_web_config_again_on_sighup(tmp_path: Path) -> None:
    file = web_config(tmp_path / "web.yml", None, ALICE)
    key = tmp_path / "web.key"
    key.write_text(generate_key_line(1) + "\n")
    key.chmod(0o600)
    port, udp = free_tcp_port(), free_udp_ports(1)[0]
    config = tmp_path / "witness.yaml"
    config.write_text(yaml.safe_dump({
        "name": "w", "listen": f"127.0.0.1:{udp}",
        "metrics": {"listen": f"127.0.0.1:{port}", "web_config_file": str(file)},
        "clusters": {"web": {"key_file": str(key), "nodes": ["vm-a", "vm-b"]}}}))
    log = tmp_path / "witness.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vipd.cli", "witness", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        await eventually(lambda: "witness started" in log.read_text(), timeout=15)
        assert await get(url, ALICE) == 200 and await get(url, BOB) == 401
        web_config(file, None, BOB)
        proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "web config reloaded" in log.read_text())
        assert await get(url, BOB) == 200 and await get(url, ALICE) == 401
    finally:
        proc.terminate()
        proc.wait(10)
    assert "Traceback" not in log.read_text()


@pytest.mark.asyncio
async def test_a_renewed_api_certificate_is_served_after_a_reload(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """api.tls's files replaced in place (as certbot or a Vault agent does), then SIGHUP:
    the API serves the new certificate and trusts the new client CA."""
    caplog.set_level(logging.INFO)
    old, new = pki_in(tmp_path / "old"), pki_in(tmp_path / "new")
    files = {"cert": tmp_path / "api.crt", "key": tmp_path / "api.key",
             "client_ca": tmp_path / "clients.pem"}

    def install(pki: Pki) -> None:
        for name, source in (("cert", pki.server_cert), ("key", pki.server_key),
                             ("client_ca", pki.ca)):
            files[name].write_bytes(source.read_bytes())
            files[name].chmod(0o600)

    async def healthz(pki: Pki) -> int | str:
        ctx = ssl.create_default_context(cafile=pki.ca)
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
        try:
            async with aiohttp.ClientSession() as session, session.get(
                    f"https://127.0.0.1:{port}/healthz", ssl=ctx,
                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    install(old)
    port = free_tcp_port()
    pair = Pair(tmp_path)
    pair.a.settings["api"] = {"listen": f"127.0.0.1:{port}",
                              "tls": {name: str(path) for name, path in files.items()}}
    try:
        pair.start()
        await pair.settled()
        assert await healthz(old) == 200
        assert await healthz(new) == "ClientConnectorCertificateError"
        install(new)
        pair.a.daemon._on_reload_signal()
        await eventually(lambda: "config reloaded" in caplog.text)
        assert await healthz(new) == 200
        assert await healthz(old) == "ClientConnectorCertificateError"
    finally:
        await pair.close()
