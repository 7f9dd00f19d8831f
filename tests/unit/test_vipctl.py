"""vipctl against a real aiohttp server on 127.0.0.1 serving Api(FakeController).

The server runs on the test's event loop (aiohttp TestServer); `vipd.vipctl.main` runs in
a worker thread (it calls asyncio.run itself), so both talk over loopback TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from vipd.api import Api, Outcome
from vipd.audit import AuditLog
from vipd.config import ApiConfig
from vipd.control import tls_context
from vipd.core.election import CommandKind
from vipd.errors import ConfigError
from vipd.tokens import Role, authenticate, load_tokens, new_token
from vipd.view import CheckView, KeysView, PeerView, Status, VipView
from vipd.vipctl import (
    EXIT_AUTH,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    main,
    render_status,
)


def status_doc(*, state: str = "ACTIVE", handover: str | None = None,
               peer_state: str | None = "STANDBY", here_held: bool = True) -> dict[str, Any]:
    """The status document a node serves (the real `Status`, as JSON), for vm-a with
    peer vm-b."""
    peer = None if peer_state is None else PeerView(
        node="vm-b", state=peer_state, term=4, priority=100, effective_priority=100,
        healthy=True, flags=["HEALTHY"], last_heartbeat_seconds_ago=0.012, reachable=True,
        hears_us=True, eligible=True, rtt_ms=0.412, settings_match=True,
        clock_offset_seconds=0.001)
    return Status(
        node="vm-a", cluster="web", version="0.1.0", uptime_seconds=3605.2, state=state,
        term=4, pair_term=4, priority=150, effective_priority=150, preempt=False,
        preferred=True, maintenance=False, healthy=True, health_override=False,
        handover=handover, ready=True,
        checks=[CheckView("nginx", "http", True, "200 in 2 ms", 0.002, 3600.1)],
        interface="eth0",
        vips=[VipView("192.0.2.10/24", here_held), VipView("2001:db8::10/64", here_held)],
        vip_error=None, peer=peer, config_digest="9f" * 32, rejected_heartbeats={},
        socket_errors={"send": 0, "receive": 0}, fence="none").to_json()


@pytest.mark.parametrize(("keys", "says"), [
    (None, None),
    (KeysView([1], 1, None, None), "heartbeat keys: 1 loaded, signs with 1; peer not heard"),
    (KeysView([1], 1, 1, 1), "heartbeat keys: 1 loaded, signs with 1; peer signs with 1, "
                             "holds up to 1"),
    (KeysView([1, 2], 1, 1, 1), "heartbeat keys: 1, 2 loaded, signs with 1; peer signs "
                                "with 1, holds up to 1; rotation to key 2 not done (both "
                                "must sign with it)"),
    (KeysView([1, 2], 2, 1, 2), "rotation to key 2 not done"),
    (KeysView([1, 2, 3], 3, 3, 3), "both sign with 3: key 1, 2 may be removed"),
])
def test_status_says_which_heartbeat_key_each_node_signs_with(
        keys: KeysView | None, says: str | None) -> None:
    doc = {**status_doc(), "keys": None if keys is None else dataclasses.asdict(keys)}
    assert Status.from_json(doc).keys == keys
    lines = [ln for ln in render_status(doc).splitlines() if "heartbeat keys" in ln]
    if says is None:
        assert lines == []
    else:
        assert len(lines) == 1 and says in lines[0], lines


class FakeController:
    def __init__(self) -> None:
        self.commands: list[tuple[CommandKind, bool, int | None]] = []
        self.targets: list[str] = []
        self.outcome = Outcome(True, "handover to peer started", "ACTIVE", 4)
        self.before = status_doc()
        self.after: dict[str, Any] | None = None  # status once `flip_after` s passed
        self.flip_after = 0.1
        self.moved_at: float | None = None

    async def status(self) -> dict[str, Any]:
        if (self.after is not None and self.moved_at is not None
                and time.monotonic() - self.moved_at >= self.flip_after):
            return self.after
        return self.before

    async def command(self, kind: CommandKind, force: bool, expected_term: int | None,
                      target: str = "") -> Outcome:
        self.commands.append((kind, force, expected_term))
        self.targets.append(target)
        if self.outcome.accepted:
            self.moved_at = time.monotonic()
        return self.outcome

    def ready(self) -> bool:
        return True


@dataclass
class Env:
    controller: FakeController
    api: Api
    audit_file: Path
    read_file: Path
    operate_file: Path

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    monkeypatch.delenv("VIPCTL_TOKEN", raising=False)
    monkeypatch.delenv("VIPCTL_API", raising=False)
    read_token, read_line = new_token("grafana", "read")
    operate_token, operate_line = new_token("alice", "operate")
    tokens = write_private(tmp_path / "api.tokens", f"{read_line}\n{operate_line}\n")
    controller = FakeController()
    audit_file = tmp_path / "audit.jsonl"
    api = Api(controller, load_tokens(tokens), AuditLog(audit_file))
    return Env(controller, api, audit_file,
               write_private(tmp_path / "read.token", read_token + "\n"),
               write_private(tmp_path / "operate.token", operate_token + "\n"))


@contextlib.asynccontextmanager
async def serve(env: Env) -> AsyncIterator[str]:
    server = TestServer(env.api.app(), host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def vipctl(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


# --- status ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_status_prints_both_nodes_as_a_table(env: Env,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.read_file), "status")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert err == ""
    assert "cluster web, pair term 4" in out
    lines = out.splitlines()
    node_row = next(line for line in lines if line.strip().startswith("node "))
    assert "vm-a (this node)" in node_row and "vm-b (peer)" in node_row
    state_row = next(line for line in lines if line.strip().startswith("state "))
    assert state_row.split()[1:] == ["ACTIVE", "STANDBY"]
    assert "192.0.2.10/24, 2001:db8::10/64" in out
    assert "check nginx (http): yes - 200 in 2 ms" in out


@pytest.mark.asyncio
async def test_status_without_a_peer(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.controller.before = status_doc(peer_state=None)
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.read_file), "status")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert "vm-a (this node)" in out and "not heard" in out


@pytest.mark.asyncio
async def test_status_json_is_the_daemons_json(env: Env,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.read_file), "status",
                            "--json")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert json.loads(out) == env.controller.before


@pytest.mark.asyncio
async def test_token_from_environment(env: Env, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIPCTL_TOKEN", env.read_file.read_text().strip())
    async with serve(env) as url:
        code = await vipctl("--api", url, "status", "--json")
    assert code == EXIT_OK, capsys.readouterr().err


# --- moves -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_switchover_accepted(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file), "switchover")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert out == "switchover: handover to peer started (state ACTIVE, term 4)\n"
    assert env.controller.commands == [(CommandKind.SWITCHOVER, False, None)]


@pytest.mark.asyncio
async def test_switchover_to_names_the_member(env: Env,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file), "switchover",
                            "--to", "node3")
        assert code == EXIT_OK, capsys.readouterr().err
        code = await vipctl("--api", url, "--token-file", str(env.operate_file), "promote")
        assert code == EXIT_OK, capsys.readouterr().err
    assert env.controller.targets == ["node3", ""]


@pytest.mark.asyncio
async def test_promote_force_and_expected_term_are_sent(env: Env,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file), "promote",
                            "--force", "--expected-term", "4")
    assert code == EXIT_OK, capsys.readouterr().err
    assert env.controller.commands == [(CommandKind.PROMOTE, True, 4)]


@pytest.mark.asyncio
async def test_switchover_refused_409(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.controller.outcome = Outcome(False, "the peer vm-b is not healthy", "ACTIVE", 4)
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file), "switchover")
    out, err = capsys.readouterr()
    assert code == EXIT_REFUSED
    assert "409" in err and "the peer vm-b is not healthy" in err
    assert out == ""


@pytest.mark.asyncio
async def test_a_server_error_in_front_of_the_daemon_is_exit_1(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """Any other 4xx/5xx (a proxy's 503, say) is a refusal too, with its text shown."""
    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"error": "upstream unavailable"}, status=503)

    app = web.Application()
    app.router.add_post("/v1/switchover", unavailable)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        code = await vipctl("--api", f"http://127.0.0.1:{server.port}", "--token-file",
                            str(env.operate_file), "switchover")
    finally:
        await server.close()
    assert code == EXIT_REFUSED
    assert "503" in (err := capsys.readouterr().err) and "upstream unavailable" in err


@pytest.mark.asyncio
async def test_read_token_cannot_switchover(env: Env,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.read_file), "switchover")
    err = capsys.readouterr().err
    assert code == EXIT_AUTH
    assert "403" in err and "operate" in err
    assert env.controller.commands == []


@pytest.mark.asyncio
async def test_unknown_token_is_exit_4(env: Env, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    other = write_private(tmp_path / "other.token", new_token("x", "operate")[0])
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(other), "status")
    assert code == EXIT_AUTH
    assert "401" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_no_token_is_usage_error(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "switchover")
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "no token" in err and "--token-file" in err and "VIPCTL_TOKEN" in err
    assert env.controller.commands == []


def test_unreadable_token_file_is_usage_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.token"
    code = main(["--api", "http://127.0.0.1:9", "--token-file", str(missing), "status"])
    assert code == EXIT_USAGE
    assert str(missing) in capsys.readouterr().err


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", [["status"], ["switchover"], ["maintenance", "on"]])
def test_daemon_unreachable_is_exit_3(env: Env, capsys: pytest.CaptureFixture[str],
                                      command: list[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    code = main(["--api", url, "--token-file", str(env.operate_file), *command])
    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE
    assert "cannot reach the daemon" in err and url in err


@pytest.mark.asyncio
async def test_switchover_wait_reports_where_the_vips_went(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.controller.before = status_doc(handover="STANDBY")
    env.controller.after = status_doc(state="STANDBY", peer_state="ACTIVE", here_held=False)
    env.controller.flip_after = 0.1
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file),
                            "switchover", "--wait")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    first, done = out.splitlines()
    assert first.startswith("switchover: handover to peer started")
    match = re.fullmatch(r"done: VIPs on vm-b after (\d+) ms", done)
    assert match, done
    assert 90 <= int(match.group(1)) < 5000


@pytest.mark.asyncio
async def test_promote_wait_reports_this_node(env: Env,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    env.controller.before = status_doc(state="STANDBY", peer_state="ACTIVE", here_held=False)
    env.controller.after = status_doc(state="ACTIVE", peer_state="STANDBY")
    env.controller.flip_after = 0.05
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file),
                            "promote", "--wait")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert re.search(r"^done: VIPs on vm-a after \d+ ms$", out, re.MULTILINE), out


@pytest.mark.asyncio
async def test_wait_that_never_completes_times_out(env: Env,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    env.controller.before = status_doc(handover="STANDBY")  # stays like this
    started = time.monotonic()
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file),
                            "switchover", "--wait", "--wait-timeout", "0.3")
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == EXIT_TIMEOUT
    assert "did not finish within 0.3 s" in err
    assert "done:" not in out
    assert 0.3 <= elapsed < 3


@pytest.mark.asyncio
@pytest.mark.parametrize(("mode", "kind", "enabled"), [
    ("on", CommandKind.MAINTENANCE_ON, True), ("off", CommandKind.MAINTENANCE_OFF, False)])
async def test_maintenance_sends_enabled(env: Env, capsys: pytest.CaptureFixture[str],
                                         mode: str, kind: CommandKind, enabled: bool) -> None:
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file),
                            "maintenance", mode, "--expected-term", "4")
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert out.startswith("maintenance: ")
    assert env.controller.commands == [(kind, False, 4)]
    [entry] = env.audit_lines()
    assert entry["params"] == {"enabled": enabled, "expected_term": 4}
    assert entry["token"] == "alice"


# --- token new ---------------------------------------------------------------------------


def test_token_new_prints_a_token_and_a_loadable_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "new", "alice", "operate"]) == EXIT_OK
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    match = re.fullmatch(r"token \(shown once, give it to alice\): (\S+)", lines[0])
    assert match, lines[0]
    token = match.group(1)
    line = lines[-1]
    assert token not in line
    tokens = load_tokens(write_private(tmp_path / "api.tokens", line + "\n"))
    assert [(t.name, t.role) for t in tokens] == [("alice", Role.OPERATE)]
    assert authenticate(tokens, token) == tokens[0]
    assert authenticate(tokens, token + "x") is None


def test_token_new_twice_gives_different_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    main(["token", "new", "bob", "read"])
    main(["token", "new", "bob", "read"])
    firsts = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith("token ")]
    assert len(firsts) == 2 and firsts[0] != firsts[1]


@pytest.mark.parametrize("name", ["bad name", "ål", "", "x" * 65, "a/b"])
def test_token_new_bad_name_is_usage_error(name: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "new", name, "operate"]) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert "token name" in err


def test_token_new_bad_role_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["token", "new", "alice", "admin"])
    assert exc.value.code == EXIT_USAGE
    assert "admin" in capsys.readouterr().err


# --- https ---------------------------------------------------------------------------


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.pem/key (IP:127.0.0.1) and client.pem/key signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(d, "req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=vipctl-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for serial, (name, ext) in enumerate([
            ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
            ("client", "extendedKeyUsage=clientAuth\n")], 1):
        (d / f"{name}.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                       "subjectKeyIdentifier=hash\n"
                                       "authorityKeyIdentifier=keyid\n" + ext)
        _openssl(d, "req", "-new", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
                 "-extfile", f"{name}.ext")
    return d


@contextlib.asynccontextmanager
async def serve_tls(env: Env, ctx: ssl.SSLContext | None) -> AsyncIterator[str]:
    runner = web.AppRunner(env.api.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_status_over_https_with_a_client_certificate(
        env: Env, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ApiConfig.model_validate({"tls": {"cert": str(pki / "server.pem"),
                                            "key": str(pki / "server.key"),
                                            "client_ca": str(pki / "ca.pem")}})
    base = ["--token-file", str(env.read_file), "--cacert", str(pki / "ca.pem")]
    async with serve_tls(env, tls_context(cfg)) as url:
        code = await vipctl("--api", url, *base, "--cert", str(pki / "client.pem"),
                            "--key", str(pki / "client.key"), "status", "--json")
        out, err = capsys.readouterr()
        assert code == EXIT_OK, err
        assert json.loads(out)["node"] == "vm-a"
        # without the client certificate the handshake fails: unreachable, not a traceback
        code = await vipctl("--api", url, *base, "status")
        assert code == EXIT_UNREACHABLE, capsys.readouterr().err
        # a server the CA did not sign: unreachable too
        code = await vipctl("--api", url, "--token-file", str(env.read_file),
                            "--cacert", str(pki / "client.pem"), "status")
        assert code == EXIT_UNREACHABLE, capsys.readouterr().err


def test_missing_cacert_is_usage_error(env: Env, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A --cacert/--cert file that cannot be read is bad usage (exit 2, naming the
    file), like an unreadable --token-file; not a Python traceback."""
    missing = tmp_path / "missing-ca.pem"
    code = main(["--api", f"https://127.0.0.1:{closed_port()}", "--token-file",
                 str(env.read_file), "--cacert", str(missing), "status"])
    assert code == EXIT_USAGE
    assert str(missing) in capsys.readouterr().err


def test_tokens_file_reports_every_bad_line_and_every_duplicate(tmp_path: Path) -> None:
    good = "0" * 64
    text = ("broken line\n"                 # a bad line must not hide what follows:
            f"ops operate {good}\n"
            f"ops read {good}\n"            # a duplicate name after it
            f"web read {good}\n")
    with pytest.raises(ConfigError) as caught:
        load_tokens(write_private(tmp_path / "api.tokens", text))
    message = str(caught.value)
    assert "line 1: expected 'NAME ROLE SHA256'" in message
    assert "line 3: token name 'ops' appears twice" in message
    assert "line 2" not in message and "line 4" not in message


def group_doc(holder: str, states: dict[str, str]) -> dict[str, Any]:
    """vm-a's status in a group on etcd: ``holder`` holds the key; members' states."""
    doc = status_doc(state=states["vm-a"], here_held=states["vm-a"] == "ACTIVE")
    doc["peer"] = None
    doc["group"] = {
        "endpoints": ["198.51.100.5:2379"], "prefix": "/vipd", "etcd": "ok",
        "etcd_detail": "lease 10 kept alive", "ttl_seconds": 1.0, "granted_ttl_seconds": 1.0,
        "lease": "10", "lease_remaining_seconds": 0.8, "holder": holder, "holder_term": 7,
        "successor": None, "revision": 9,
        "members": [{"node": n, "state": s, "priority": 100, "healthy": True,
                     "maintenance": False, "eligible": True, "wants": False,
                     "holder": n == holder, "version": "0.1.0",
                     "settings_match": n != "vm-c"} for n, s in sorted(states.items())]}
    return doc


def test_a_starting_member_is_marked_in_the_group_status() -> None:
    doc = group_doc("vm-a", {"vm-a": "ACTIVE", "vm-b": "STANDBY"})
    doc["group"]["members"][1]["starting"] = True
    assert Status.from_json(doc).group.members[1].starting  # type: ignore[union-attr]
    lines = render_status(doc).splitlines()
    vm_b = [ln for ln in lines if ln.strip().startswith("vm-b")]
    assert len(vm_b) == 1 and "starting: waits one TTL for the group" in vm_b[0], lines
    assert not any("starting" in ln for ln in lines if ln.strip().startswith("vm-a"))


@pytest.mark.asyncio
async def test_switchover_to_a_member_waits_until_it_holds(
        env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.controller.before = group_doc("vm-a", {"vm-a": "ACTIVE", "vm-b": "STANDBY",
                                               "vm-c": "STANDBY"})
    env.controller.after = group_doc("vm-c", {"vm-a": "STANDBY", "vm-b": "STANDBY",
                                              "vm-c": "ACTIVE"})
    env.controller.flip_after = 0.05
    async with serve(env) as url:
        code = await vipctl("--api", url, "--token-file", str(env.operate_file),
                            "switchover", "--to", "vm-c", "--wait")
        out, err = capsys.readouterr()
        assert code == EXIT_OK, err
        assert re.search(r"^done: VIPs on vm-c after \d+ ms$", out, re.MULTILINE), out
        code = await vipctl("--api", url, "--token-file", str(env.read_file), "status")
    text = capsys.readouterr().out
    assert code == EXIT_OK
    assert "holder: vm-c (term 7)" in text and "etcd 198.51.100.5:2379 (/vipd): ok" in text
    assert "SETTINGS DIFFER" in text and "WARNING: members' settings differ" in text
    assert env.controller.targets == ["vm-c"]
