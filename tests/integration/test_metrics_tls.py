"""A real Prometheus scrapes vipd over TLS with basic auth, configured as for any
exporter (metrics.web_config_file, docs/metrics.md), all on 127.0.0.1.

A node of the loopback pair (tests/support/daemons.py) serves /metrics behind a web config
that requires a client certificate of the test CA and a bcrypt-hashed password; a
`vipd witness` process serves /metrics and /healthz behind TLS and basic auth without
client certificates. Prometheus (Debian's, as in test_prometheus.py) scrapes four jobs:
the node and the witness as configured (up, with vipd's series in its query API), the
node with a wrong password and the node without a client certificate (both down, the
reason in the target's lastError). Direct requests check the same refusals and that
plain HTTP does not reach the TLS port. `promtool check web-config` accepts the shipped
example (configs/web-config.yml) with its paths pointed at this test's files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import pytest_asyncio
import yaml

from support.daemons import Pair, free_tcp_port
from support.pki import Pki, make_pki
from vipd.core.protocol import State

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "web-config.yml"
USER, PASSWORD = "prometheus", "scrape-secret-42"
SEEN = 30.0  # s for Prometheus to scrape every job (1 s interval) and report it

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None or
                                shutil.which("promtool") is None,
                                reason="needs Debian's prometheus (scripts/test-deps)")


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float, what: str,
                     detail: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{detail()}")
        await asyncio.sleep(0.2)


def client_context(pki: Pki, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Process:
    """A subprocess in its own process group, killed (and reaped) at close."""

    def __init__(self, argv: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                         start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Lab:
    """The files, the pair, the witness and Prometheus of the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "pki").mkdir(parents=True)
        self.pki = make_pki(root / "pki")
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
        tls = {"cert_file": str(self.pki.server_cert), "key_file": str(self.pki.server_key)}
        self.node_web = write_yaml(root / "node-web.yml", {
            "tls_server_config": {**tls, "client_auth_type": "RequireAndVerifyClientCert",
                                  "client_ca_file": str(self.pki.ca)},
            "basic_auth_users": {USER: hashed}})
        self.witness_web = write_yaml(root / "witness-web.yml", {
            "tls_server_config": tls, "basic_auth_users": {USER: hashed}})
        self.node_port, self.witness_port, self.prom_port = (free_tcp_port() for _ in "abc")
        self.processes: list[Process] = []

    @property
    def node_url(self) -> str:
        return f"https://127.0.0.1:{self.node_port}/metrics"

    @property
    def witness_url(self) -> str:
        return f"https://127.0.0.1:{self.witness_port}"

    def start_witness(self, pair: Pair) -> Process:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp_port = udp.getsockname()[1]
        udp.close()
        config = write_yaml(self.root / "witness.yaml", {
            "name": "w", "listen": f"127.0.0.1:{udp_port}",
            "metrics": {"listen": f"127.0.0.1:{self.witness_port}",
                        "web_config_file": str(self.witness_web)},
            "clusters": {"test": {"key_file": str(pair.key_file), "nodes": ["a", "b"]}}})
        process = Process([sys.executable, "-m", "vipd.cli", "witness", "--config",
                           str(config)], self.root / "witness.log", self.root)
        self.processes.append(process)
        return process

    def write_prometheus_config(self) -> Path:
        """Four jobs (see the module docstring), checked by promtool."""
        password = self.root / "password"
        password.write_text(PASSWORD)
        wrong = self.root / "wrong-password"
        wrong.write_text(PASSWORD + "x")
        pki = self.pki
        with_cert = {"ca_file": str(pki.ca), "cert_file": str(pki.client_cert),
                     "key_file": str(pki.client_key)}

        def job(name: str, port: int, tls: dict[str, str], password_file: Path,
                path: str = "/metrics") -> dict[str, Any]:
            return {"job_name": name, "scheme": "https", "metrics_path": path,
                    "tls_config": tls,
                    "basic_auth": {"username": USER, "password_file": str(password_file)},
                    "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}

        config = write_yaml(self.root / "prometheus.yml", {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [
                job("vipd", self.node_port, with_cert, password),
                job("witness", self.witness_port, {"ca_file": str(pki.ca)}, password),
                job("wrong-password", self.node_port, with_cert, wrong),
                job("no-client-cert", self.node_port, {"ca_file": str(pki.ca)}, password),
            ]})
        check = subprocess.run(["promtool", "check", "config", str(config)],
                               capture_output=True, text=True, timeout=30, check=False)
        assert check.returncode == 0, f"promtool check config:\n{check.stdout}{check.stderr}"
        return config

    def start_prometheus(self, config: Path) -> Process:
        process = Process(["prometheus", f"--config.file={config}",
                           f"--storage.tsdb.path={self.root / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{self.prom_port}",
                           "--log.level=warn"], self.root / "prometheus.log", self.root)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            process.close()


@pytest_asyncio.fixture
async def lab(tmp_path: Path) -> AsyncIterator[tuple[Lab, Pair]]:
    lab = Lab(tmp_path / "lab")
    pair = Pair(tmp_path)
    pair.a.settings["metrics"] = {"listen": f"127.0.0.1:{lab.node_port}",
                                  "web_config_file": str(lab.node_web)}
    try:
        yield lab, pair
    finally:
        lab.close()
        await pair.close()


async def fetch(session: aiohttp.ClientSession, url: str, ctx: ssl.SSLContext | bool,
                password: str | None = PASSWORD) -> tuple[int, dict[str, str], str]:
    headers = {} if password is None else {"Authorization": "Basic " + base64.b64encode(
        f"{USER}:{password}".encode()).decode()}
    async with session.get(url, ssl=ctx, headers=headers,
                           timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, dict(resp.headers), await resp.text()


@pytest.mark.asyncio
async def test_prometheus_scrapes_vipd_over_tls_with_basic_auth_and_refuses_the_rest(
        lab: tuple[Lab, Pair]) -> None:
    env, pair = lab
    pki = env.pki
    config = env.write_prometheus_config()  # before the pair: promtool blocks the loop
    pair.start()
    await pair.settled()
    witness = env.start_witness(pair)
    prometheus = env.start_prometheus(config)

    async with aiohttp.ClientSession() as http:
        async def answered() -> bool:
            with contextlib.suppress(aiohttp.ClientError, ssl.SSLError, TimeoutError):
                status, _, _ = await fetch(http, f"{env.witness_url}/healthz",
                                           client_context(pki, cert=False))
                return status == 200
            assert witness.proc.poll() is None, witness.output()
            return False

        await eventually(answered, 15.0, "the witness over TLS", witness.output)

        # The node: the right password and a client certificate get the metrics.
        status, _, body = await fetch(http, env.node_url, client_context(pki))
        assert status == 200, body
        assert 'vipd_state{state="ACTIVE"} 1.0' in body, body[:2000]
        # A wrong password, or none, is refused with a basic-auth challenge.
        for password in (PASSWORD + "x", "", None):
            status, headers, body = await fetch(http, env.node_url, client_context(pki),
                                                password)
            assert status == 401, (password, status, body)
            assert headers.get("WWW-Authenticate", "").startswith("Basic"), headers
            assert "vipd_" not in body
        # No client certificate, or one of another CA: the TLS handshake refuses it.
        other = client_context(pki, cert=False)
        other.load_cert_chain(pki.other_cert, pki.other_key)
        for ctx in (client_context(pki, cert=False), other):
            with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                await fetch(http, env.node_url, ctx)
        # Plain HTTP does not reach the TLS port.
        with pytest.raises(aiohttp.ClientError):
            await fetch(http, env.node_url.replace("https:", "http:"), False)

        # The witness: TLS without client certificates; /healthz is behind the password
        # as well.
        status, _, body = await fetch(http, f"{env.witness_url}/healthz",
                                      client_context(pki, cert=False), PASSWORD + "x")
        assert status == 401, body
        status, _, body = await fetch(http, f"{env.witness_url}/metrics",
                                      client_context(pki, cert=False))
        assert status == 200 and "vipd_witness_up 1.0" in body, body[:2000]

        # Prometheus: the two configured jobs up with vipd's series, the others down.
        api = f"http://127.0.0.1:{env.prom_port}/api/v1"

        def detail() -> str:
            return f"prometheus:\n{prometheus.output()}\nwitness:\n{witness.output()}"

        async def targets() -> dict[str, dict[str, Any]] | None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{api}/targets", timeout=aiohttp.ClientTimeout(
                        total=5)) as resp:
                    active = (await resp.json())["data"]["activeTargets"]
                found = {t["labels"]["job"]: t for t in active}
                if len(found) == 4 and all(t["health"] != "unknown" for t in found.values()):
                    return found
            assert prometheus.proc.poll() is None, detail()
            return None

        async def settled() -> dict[str, dict[str, Any]] | None:
            found = await targets()
            if found is None or found["vipd"]["health"] != "up" or \
                    found["witness"]["health"] != "up":
                return None
            return found

        found = await eventually(settled, SEEN, "both configured jobs up", detail)
        assert found["wrong-password"]["health"] == "down", found["wrong-password"]
        assert "401" in found["wrong-password"]["lastError"], found["wrong-password"]
        refused = found["no-client-cert"]
        assert refused["health"] == "down", refused
        # Refused in the handshake, before any HTTP (Go sees the connection close: EOF);
        # the "vipd" job differs from it only by the client certificate and is up.
        assert refused["lastError"] and "HTTP status" not in refused["lastError"], refused

        async def query(expr: str) -> list[dict[str, Any]]:
            async with http.get(f"{api}/query", params={"query": expr}) as resp:
                reply = await resp.json()
            assert reply["status"] == "success", reply
            result: list[dict[str, Any]] = reply["data"]["result"]
            return result

        async def value(expr: str) -> float | None:
            result = await query(expr)
            return float(result[0]["value"][1]) if len(result) == 1 else None

        assert await eventually(lambda: value('vipd_state{job="vipd", state="ACTIVE"}'),
                                SEEN, "vipd_state in Prometheus", detail) == 1.0
        assert await value('vipd_witness_up{job="witness"}') == 1.0
        assert await value('up{job="wrong-password"}') == 0.0
        assert await value('up{job="no-client-cert"}') == 0.0
        assert await query('vipd_state{job=~"wrong-password|no-client-cert"}') == []
        assert pair.a.state is State.ACTIVE


def test_promtool_accepts_the_example_web_config(tmp_path: Path) -> None:
    """The shipped example, verbatim but for its three paths, which point at files made
    here (promtool loads the certificate and key, as the exporter-toolkit does)."""
    pki = make_pki(tmp_path)
    text = EXAMPLE.read_text()
    for example, real in (("/etc/vipd/metrics.crt", pki.server_cert),
                          ("/etc/vipd/metrics.key", pki.server_key),
                          ("/etc/vipd/scrapers-ca.pem", pki.ca)):
        assert example in text, example
        text = text.replace(example, str(real))
    path = tmp_path / "web-config.yml"
    path.write_text(text)
    check = subprocess.run(["promtool", "check", "web-config", str(path)],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout + check.stderr
    broken = tmp_path / "broken.yml"  # the check is real: a missing key fails it
    broken.write_text(text.replace(str(pki.server_key), str(tmp_path / "none.key")))
    check = subprocess.run(["promtool", "check", "web-config", str(broken)],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode != 0, check.stdout + check.stderr


START = """
import asyncio, logging, sys
from pathlib import Path
from aiohttp import web
from vipd.configtypes import Endpoint
from vipd.webconfig import start_http

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

async def main() -> None:
    web_file = Path(sys.argv[1]) if sys.argv[1] else None
    served = await start_http(web.Application(), Endpoint.parse("0.0.0.0:9441"), web_file,
                              "metrics.listen", 0.1)
    await served.runner.cleanup()

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare: 0.0.0.0 is bound in a fresh network "
                           "namespace that has only a loopback device, which is down")
def test_a_plain_listener_beyond_loopback_warns_once_at_start(tmp_path: Path) -> None:
    def start(web_file: Path | None) -> list[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        run = subprocess.run(["unshare", "--net", sys.executable, "-c", START,
                              str(web_file or "")], capture_output=True, text=True,
                             timeout=60, check=False, env=env)
        assert run.returncode == 0, run.stderr
        return run.stderr.splitlines()

    warnings = [line for line in start(None) if line.startswith("WARNING")]
    assert warnings == [
        "WARNING metrics.listen 0.0.0.0:9441 serves plain HTTP beyond loopback: anyone who "
        "reaches it reads it; set metrics.web_config_file with tls_server_config and "
        "basic_auth_users (docs/metrics.md)"]
    pki = make_pki(tmp_path)
    web_file = write_yaml(tmp_path / "web.yml", {"tls_server_config": {
        "cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}})
    lines = start(web_file)
    assert not [line for line in lines if line.startswith("WARNING")], lines
    assert "INFO metrics.listen on https://0.0.0.0:9441 (TLS)" in lines, lines
