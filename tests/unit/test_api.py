"""vipd.api: auth matrix, audit trail, request bodies, outcomes, one move at a time, TLS.

The Api is served by aiohttp's own test utilities (TestServer/TestClient) on 127.0.0.1
in front of a FakeController; TLS cases use a real TCPSite with certificates made by the
openssl CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from support.pki import Pki, make_pki
from vipd.api import MAX_BODY, Api, Outcome
from vipd.audit import AuditLog
from vipd.config import ApiConfig
from vipd.control import ApiError, tls_context
from vipd.core.election import CommandKind
from vipd.tokens import load_tokens, new_token

# --- fakes and fixtures ------------------------------------------------------------------


class FakeController:
    """The Controller protocol: records commands, answers with a configurable Outcome."""

    def __init__(self) -> None:
        self.commands: list[tuple[CommandKind, bool, int | None]] = []
        self.targets: list[str] = []
        self.events: list[tuple[str, CommandKind]] = []
        self.outcome = Outcome(True, "handover to peer started", "ACTIVE", 7)
        self.is_ready = True
        self.gate: asyncio.Event | None = None
        self.status_doc: dict[str, Any] = {"node": "vm-a", "state": "ACTIVE", "term": 7}

    async def status(self) -> dict[str, Any]:
        return self.status_doc

    async def command(self, kind: CommandKind, force: bool, expected_term: int | None,
                      target: str = "") -> Outcome:
        self.commands.append((kind, force, expected_term))
        self.targets.append(target)
        self.events.append(("start", kind))
        if self.gate is not None:
            await self.gate.wait()
        self.events.append(("end", kind))
        return self.outcome

    def ready(self) -> bool:
        return self.is_ready


@dataclass
class Env:
    controller: FakeController
    api: Api
    audit_file: Path
    tokens_file: Path
    read_token: str
    operate_token: str
    unknown_token: str = field(default_factory=lambda: new_token("nobody", "operate")[0])

    def audit_lines(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    read_token, read_line = new_token("grafana", "read")
    operate_token, operate_line = new_token("alice", "operate")
    tokens_file = tmp_path / "api.tokens"
    tokens_file.write_text(f"# name role sha256\n{read_line}\n{operate_line}\n")
    os.chmod(tokens_file, 0o600)
    controller = FakeController()
    audit_file = tmp_path / "audit" / "audit.jsonl"
    api = Api(controller, load_tokens(tokens_file), AuditLog(audit_file))
    return Env(controller, api, audit_file, tokens_file, read_token, operate_token)


@contextlib.asynccontextmanager
async def serve(api: Api, app: web.Application | None = None) -> AsyncIterator[TestClient]:
    client = TestClient(TestServer(app if app is not None else api.app(), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ROUTES = [
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/status"),
    ("POST", "/v1/switchover"), ("POST", "/v1/maintenance"), ("POST", "/v1/promote"),
]
VALID_BODY = {"/v1/switchover": {}, "/v1/promote": {"force": True},
              "/v1/maintenance": {"enabled": True}}
CREDENTIALS = ["none", "basic", "bearer-empty", "unknown", "read", "operate"]


def credential_headers(env: Env, credential: str) -> dict[str, str]:
    return {
        "none": {},
        "basic": {"Authorization": "Basic x"},
        "bearer-empty": {"Authorization": "Bearer"},
        "unknown": bearer(env.unknown_token),
        "read": bearer(env.read_token),
        "operate": bearer(env.operate_token),
    }[credential]


def expected_status(method: str, path: str, credential: str, ready: bool) -> int:
    if path == "/healthz":
        return 200
    if path == "/readyz":
        return 200 if ready else 503
    if credential in ("none", "basic", "bearer-empty", "unknown"):
        return 401
    if method == "POST" and credential == "read":
        return 403
    return 200


# --- 1. auth matrix ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("ready", [True, False], ids=["ready", "not-ready"])
async def test_auth_matrix(env: Env, method: str, path: str, credential: str,
                           ready: bool) -> None:
    env.controller.is_ready = ready
    async with serve(env.api) as client:
        resp = await client.request(method, path, headers=credential_headers(env, credential),
                                    json=VALID_BODY.get(path))
        body = await resp.json()
    want = expected_status(method, path, credential, ready)
    assert resp.status == want, body
    if want == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert body["error"]
    else:
        assert "WWW-Authenticate" not in resp.headers
    if want == 403:
        assert "operate" in body["error"] and "grafana" in body["error"]
    if path == "/readyz":
        assert body == {"ready": ready}
    if path == "/v1/status" and want == 200:
        assert body == env.controller.status_doc
    moved = method == "POST" and want == 200
    assert len(env.controller.commands) == (1 if moved else 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("credential", CREDENTIALS)
async def test_without_tokens_file_every_v1_route_is_401(tmp_path: Path, env: Env,
                                                         credential: str) -> None:
    api = Api(env.controller, None, AuditLog(env.audit_file))
    async with serve(api) as client:
        for method, path in ROUTES:
            resp = await client.request(method, path,
                                        headers=credential_headers(env, credential),
                                        json=VALID_BODY.get(path))
            body = await resp.json()
            if path in ("/healthz", "/readyz"):
                assert resp.status == 200
                continue
            assert resp.status == 401, (path, body)
            assert "api.tokens_file" in body["error"]
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert env.controller.commands == []
    assert [(e["action"], e["status"]) for e in env.audit_lines()] == [
        ("switchover", 401), ("maintenance", 401), ("promote", 401)]


@pytest.mark.asyncio
async def test_switchover_takes_a_target_member_and_validates_it(env: Env) -> None:
    op = bearer(env.operate_token)
    async with serve(env.api) as client:
        resp = await client.post("/v1/switchover", headers=op, json={"to": "node3"})
        assert resp.status == 200, await resp.text()
        for bad in ({"to": ""}, {"to": 3}, {"to": "x" * 65}):
            resp = await client.post("/v1/switchover", headers=op, json=bad)
            assert resp.status == 400, (bad, await resp.text())
            assert "to" in (await resp.json())["error"]
        resp = await client.post("/v1/promote", headers=op, json={"to": "node3"})
        assert resp.status == 400  # only a switchover has a target
    assert env.controller.targets == ["node3"]


# --- 2. audit ----------------------------------------------------------------------------

BASE_KEYS = {"time", "token", "source", "action", "result", "status"}


@pytest.mark.asyncio
async def test_every_post_writes_one_audit_line(env: Env) -> None:
    op = bearer(env.operate_token)
    big = b'{"force": false' + b" " * MAX_BODY + b"}"
    cases: list[tuple[str, dict[str, str], Any, Outcome | None, int]] = [
        ("/v1/switchover", {}, {}, None, 401),
        ("/v1/switchover", {"Authorization": "Basic x"}, {}, None, 401),
        ("/v1/promote", bearer(env.unknown_token), {}, None, 401),
        ("/v1/maintenance", bearer(env.read_token), {"enabled": True}, None, 403),
        ("/v1/switchover", op, b'{"force": tru', None, 400),
        ("/v1/maintenance", op, {"enabled": "yes"}, None, 400),
        ("/v1/switchover", op, big, None, 413),
        ("/v1/switchover", op, {"force": True, "expected_term": 3},
         Outcome(False, "expected_term 3 is stale", "ACTIVE", 7), 409),
        ("/v1/maintenance", op, {"enabled": False},
         Outcome(True, "maintenance off", "STANDBY", 8), 200),
    ]
    async with serve(env.api) as client:
        for i, (path, headers, body, outcome, status) in enumerate(cases):
            if outcome is not None:
                env.controller.outcome = outcome
            kwargs: dict[str, Any] = ({"data": body} if isinstance(body, bytes)
                                      else {"json": body})
            resp = await client.post(path, headers=headers, **kwargs)
            await resp.read()
            assert resp.status == status, (path, await resp.text())
            lines = env.audit_lines()
            assert len(lines) == i + 1, f"request {i} ({path} -> {status}) wrote " \
                                        f"{len(lines) - i} audit lines"
            entry = lines[-1]
            assert entry.keys() >= BASE_KEYS, entry
            assert entry["status"] == status
            assert entry["action"] == path.rsplit("/", 1)[-1]
            assert entry["source"] == "127.0.0.1"
            assert entry["result"] == ("accepted" if status == 200 else "refused")
            assert entry["time"].endswith("Z")
            if status in (200, 403, 400, 409, 413, 503):
                assert entry["token"] == ("grafana" if status == 403 else "alice")
            else:
                assert entry["token"] is None
            if status in (200, 409):
                assert {"params", "state", "term"} <= entry.keys(), entry
                assert entry["state"] == outcome.state and entry["term"] == outcome.term  # type: ignore[union-attr]
            if status == 409:
                assert entry["params"] == {"expected_term": 3, "force": True}
            if status == 200:
                assert entry["params"] == {"expected_term": None, "enabled": False}
    raw = env.audit_file.read_text()
    for token in (env.read_token, env.operate_token, env.unknown_token):
        assert token not in raw
        assert token.removeprefix("vipd_") not in raw


@pytest.mark.asyncio
async def test_audit_file_is_created_0600(env: Env) -> None:
    assert not env.audit_file.exists()
    old = os.umask(0)
    try:
        async with serve(env.api) as client:
            resp = await client.post("/v1/switchover", headers=bearer(env.operate_token))
            assert resp.status == 200
    finally:
        os.umask(old)
    assert stat.S_IMODE(env.audit_file.stat().st_mode) == 0o600


@pytest.mark.asyncio
async def test_bearer_scheme_is_case_insensitive_and_spaces_are_trimmed(env: Env) -> None:
    """'bearer' in any case, extra spaces around the token: still the same token."""
    async with serve(env.api) as client:
        resp = await client.post("/v1/promote",
                                 headers={"Authorization": f"bearer   {env.operate_token}  "})
        assert resp.status == 200
    assert env.audit_lines()[-1]["token"] == "alice"
    assert env.operate_token not in env.audit_file.read_text()


# --- 3. bodies ---------------------------------------------------------------------------


async def post(env: Env, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with serve(env.api) as client:
        resp = await client.post(path, headers=bearer(env.operate_token), **kwargs)
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, {"text": text}


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [b'{"force": tru', b"{", b'{"force": false,}', b"nope",
                                 b'{"a": 1} {"b": 2}'])
async def test_bad_json_is_400_naming_the_error(env: Env, raw: bytes) -> None:
    status, body = await post(env, "/v1/switchover", data=raw)
    assert status == 400
    with pytest.raises(json.JSONDecodeError) as exc:
        json.loads(raw)
    assert "not valid JSON" in body["error"] and exc.value.msg in body["error"]
    assert env.controller.commands == []
    assert len(env.audit_lines()) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [
    pytest.param(b'{"force": \xff}', id="invalid-utf8"),
    pytest.param(b"[" * 50_000, id="nested-50000-deep"),
    pytest.param(b'{"expected_term": ' + b"9" * 5000 + b"}", id="5000-digit-int"),
])
async def test_undecodable_body_is_400_and_audited(env: Env, raw: bytes) -> None:
    """A body json.loads rejects with something other than JSONDecodeError is still a bad
    body: 400 with one audit line, not a 500 with none."""
    assert len(raw) <= MAX_BODY
    status, body = await post(env, "/v1/switchover", data=raw)
    assert status == 400, body
    assert env.controller.commands == []
    assert len(env.audit_lines()) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "payload", "field"), [
    ("/v1/switchover", {"force": False, "forse": True}, "forse"),
    ("/v1/promote", {"bogus": 1}, "bogus"),
    ("/v1/maintenance", {"enabled": True, "reason": "patching"}, "reason"),
    ("/v1/maintenance", {"enabled": "yes"}, "enabled"),
    ("/v1/maintenance", {"enabled": 1}, "enabled"),
    ("/v1/switchover", {"force": 1}, "force"),
    ("/v1/promote", {"force": "true"}, "force"),
    ("/v1/switchover", {"expected_term": "3"}, "expected_term"),
    ("/v1/switchover", {"expected_term": True}, "expected_term"),
    ("/v1/switchover", {"expected_term": 1.5}, "expected_term"),
    ("/v1/promote", {"expected_term": -1}, "expected_term"),
    ("/v1/maintenance", {"enabled": False, "expected_term": -5}, "expected_term"),
    ("/v1/maintenance", {}, "enabled"),
    ("/v1/maintenance", {"expected_term": 2}, "enabled"),
])
async def test_invalid_body_is_400_naming_the_field(env: Env, path: str,
                                                    payload: dict[str, Any],
                                                    field: str) -> None:
    status, body = await post(env, path, json=payload)
    assert status == 400, body
    assert field in body["error"]
    assert field in [f["field"] for f in body["fields"]]
    assert env.controller.commands == []
    [entry] = env.audit_lines()
    assert entry["status"] == 400 and field in entry["message"]


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [b"[]", b"null", b'"switchover"', b"42"])
async def test_body_that_is_not_an_object_is_400(env: Env, raw: bytes) -> None:
    status, body = await post(env, "/v1/switchover", data=raw)
    assert status == 400, body
    assert env.controller.commands == []


@pytest.mark.asyncio
async def test_empty_maintenance_body_is_400(env: Env) -> None:
    status, body = await post(env, "/v1/maintenance", data=b"")
    assert status == 400 and "enabled" in body["error"]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "kind"), [("/v1/switchover", CommandKind.SWITCHOVER),
                                            ("/v1/promote", CommandKind.PROMOTE)])
@pytest.mark.parametrize("raw", [b"", b"  \n", b"{}"], ids=["empty", "blank", "object"])
async def test_empty_move_body_means_no_force(env: Env, path: str, kind: CommandKind,
                                              raw: bytes) -> None:
    status, _ = await post(env, path, data=raw)
    assert status == 200
    assert env.controller.commands == [(kind, False, None)]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "payload", "command"), [
    ("/v1/switchover", {"force": True}, (CommandKind.SWITCHOVER, True, None)),
    ("/v1/switchover", {"force": False, "expected_term": 0}, (CommandKind.SWITCHOVER, False, 0)),
    ("/v1/promote", {"force": True, "expected_term": 12}, (CommandKind.PROMOTE, True, 12)),
    ("/v1/promote", {"expected_term": 3}, (CommandKind.PROMOTE, False, 3)),
    ("/v1/maintenance", {"enabled": True}, (CommandKind.MAINTENANCE_ON, False, None)),
    ("/v1/maintenance", {"enabled": False, "expected_term": 9},
     (CommandKind.MAINTENANCE_OFF, False, 9)),
])
async def test_controller_gets_the_command(env: Env, path: str, payload: dict[str, Any],
                                           command: tuple[CommandKind, bool, int | None]
                                           ) -> None:
    status, body = await post(env, path, json=payload)
    assert status == 200, body
    assert env.controller.commands == [command]
    [entry] = env.audit_lines()
    assert entry["params"] == {"expected_term": None, **({"force": False}
                                                          if path != "/v1/maintenance"
                                                          else {}), **payload}


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/v1/switchover", "/v1/maintenance", "/v1/promote"])
async def test_body_over_64_kib_is_413(env: Env, path: str) -> None:
    payload = b'{"enabled": true}' if path == "/v1/maintenance" else b"{}"
    at_limit = payload + b" " * (MAX_BODY - len(payload))
    assert MAX_BODY == 64 * 1024 and len(at_limit) == MAX_BODY
    status, _ = await post(env, path, data=at_limit)
    assert status == 200
    status, body = await post(env, path, data=at_limit + b" ")
    assert status == 413
    assert "body" in body["error"]
    assert len(env.controller.commands) == 1
    assert [e["status"] for e in env.audit_lines()] == [200, 413]
    assert env.audit_lines()[1]["token"] == "alice"


# --- 4. outcomes -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_accepted_outcome_is_200(env: Env) -> None:
    env.controller.outcome = Outcome(True, "handover to vm-b started", "ACTIVE", 5)
    status, body = await post(env, "/v1/switchover", json={})
    assert status == 200
    assert body == {"accepted": True, "message": "handover to vm-b started",
                    "state": "ACTIVE", "term": 5}


@pytest.mark.asyncio
async def test_refused_outcome_is_409_with_the_reason(env: Env) -> None:
    env.controller.outcome = Outcome(False, "the peer is not healthy", "ACTIVE", 5)
    status, body = await post(env, "/v1/switchover", json={})
    assert status == 409
    assert body["error"] == "the peer is not healthy"
    assert body["accepted"] is False and body["state"] == "ACTIVE" and body["term"] == 5
    assert env.audit_lines()[-1]["message"] == "the peer is not healthy"


# --- 5. one at a time --------------------------------------------------------------------


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_mutating_requests_run_one_at_a_time(env: Env) -> None:
    env.controller.gate = asyncio.Event()
    arrived: list[str] = []

    @web.middleware
    async def count(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        arrived.append(request.path)
        return await handler(request)

    app = env.api.app()
    app.middlewares.append(count)  # inside the auth middleware: the request was accepted
    headers = bearer(env.operate_token)
    async with serve(env.api, app) as client:
        first = asyncio.create_task(client.post("/v1/switchover", headers=headers, json={}))
        await wait_for(lambda: len(env.controller.events) == 1)
        second = asyncio.create_task(client.post("/v1/maintenance", headers=headers,
                                                 json={"enabled": True}))
        await wait_for(lambda: len(arrived) == 2)
        await asyncio.sleep(0.1)  # ample time for the second handler to reach the command
        assert env.controller.events == [("start", CommandKind.SWITCHOVER)]
        env.controller.gate.set()
        r1, r2 = await asyncio.gather(first, second)
        assert (r1.status, r2.status) == (200, 200)
        r1.release()
        r2.release()
    assert env.controller.events == [
        ("start", CommandKind.SWITCHOVER), ("end", CommandKind.SWITCHOVER),
        ("start", CommandKind.MAINTENANCE_ON), ("end", CommandKind.MAINTENANCE_ON)]


@pytest.mark.asyncio
async def test_status_is_not_blocked_by_a_running_move(env: Env) -> None:
    env.controller.gate = asyncio.Event()
    async with serve(env.api) as client:
        move = asyncio.create_task(client.post("/v1/switchover",
                                               headers=bearer(env.operate_token)))
        await wait_for(lambda: len(env.controller.events) == 1)
        resp = await asyncio.wait_for(client.get("/v1/status",
                                                 headers=bearer(env.read_token)), 2)
        assert resp.status == 200
        resp.release()
        env.controller.gate.set()
        (await move).release()


# --- 6. TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def api_config(pki: Pki, client_ca: Path | None = None, **override: Path) -> ApiConfig:
    tls: dict[str, str] = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    if client_ca is not None:
        tls["client_ca"] = str(client_ca)
    tls.update({k: str(v) for k, v in override.items()})
    return ApiConfig.model_validate({"tls": tls})


@contextlib.asynccontextmanager
async def serve_tls(api: Api, ctx: ssl.SSLContext | None) -> AsyncIterator[str]:
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1"
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def client_ctx(cafile: Path | None, cert: Path | None = None,
               key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def get_healthz(url: str, ctx: ssl.SSLContext) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(url + "/healthz", ssl=ctx) as resp:
        await resp.read()
        return resp.status


def test_tls_context_is_none_without_tls() -> None:
    assert tls_context(ApiConfig.model_validate({})) is None


@pytest.mark.asyncio
async def test_tls_server_is_verified_by_its_ca(env: Env, pki: Pki) -> None:
    ctx = tls_context(api_config(pki))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_NONE
    async with serve_tls(env.api, ctx) as url:
        assert await get_healthz(url, client_ctx(pki.ca)) == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get_healthz(url, client_ctx(pki.other_ca))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get_healthz(url, client_ctx(None))  # the system store


@pytest.mark.asyncio
async def test_tls_with_client_ca_requires_a_client_cert_from_it(env: Env, pki: Pki) -> None:
    ctx = tls_context(api_config(pki, client_ca=pki.ca))
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    async with serve_tls(env.api, ctx) as url:
        assert await get_healthz(url, client_ctx(pki.ca, pki.client_cert, pki.client_key)) \
            == 200
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await get_healthz(url, client_ctx(pki.ca))
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await get_healthz(url, client_ctx(pki.ca, pki.other_cert, pki.other_key))
        # and the server still serves the right client afterwards
        assert await get_healthz(url, client_ctx(pki.ca, pki.client_cert, pki.client_key)) \
            == 200


@pytest.mark.parametrize("which", ["cert", "key", "client_ca"])
def test_tls_missing_file_is_api_error_naming_it(pki: Pki, tmp_path: Path,
                                                 which: str) -> None:
    missing = tmp_path / f"missing-{which}.pem"
    cfg = (api_config(pki, client_ca=missing) if which == "client_ca"
           else api_config(pki, **{which: missing}))
    with pytest.raises(ApiError) as exc:
        tls_context(cfg)
    assert str(missing) in str(exc.value)


def test_tls_garbage_cert_is_api_error_naming_it(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ApiError) as exc:
        tls_context(api_config(pki, cert=garbage))
    assert str(garbage) in str(exc.value)


def test_tls_key_not_matching_cert_is_api_error(pki: Pki) -> None:
    with pytest.raises(ApiError) as exc:
        tls_context(api_config(pki, key=pki.client_key))
    assert str(pki.client_key) in str(exc.value)


# --- headers that are not ASCII --------------------------------------------------------


@pytest.mark.asyncio
async def test_non_ascii_bearer_token_is_401_and_audited(env: Env) -> None:
    """A token the client sends as raw non-UTF-8 bytes is an unknown token, not a 500."""
    async with serve(env.api) as client:
        port = client.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/switchover HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Authorization: Bearer vipd_\xff\xfe\r\nContent-Length: 2\r\n"
                         b"Connection: close\r\n\r\n{}")
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
            await writer.wait_closed()
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line.split()[1] == b"401", response[:300]
    assert env.controller.commands == []
    assert len(env.audit_lines()) == 1


# --- request storage key --------------------------------------------------------------


def test_first_authenticated_request_under_warnings_as_errors(tmp_path: Path) -> None:
    """In a fresh process with -W error (as this project's pytest runs), the first
    authenticated request must still be a 200: api.py must not trigger aiohttp's
    NotAppKeyWarning by storing the token under a web.AppKey on the request."""
    read_token, line = new_token("grafana", "read")
    tokens_file = tmp_path / "api.tokens"
    tokens_file.write_text(line + "\n")
    os.chmod(tokens_file, 0o600)
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from aiohttp.test_utils import TestClient, TestServer
        from vipd.api import Api, Outcome
        from vipd.audit import AuditLog
        from vipd.tokens import load_tokens

        class Controller:
            async def status(self):
                return {{"node": "vm-a"}}
            async def command(self, kind, force, expected_term, target=""):
                return Outcome(True, "ok", "ACTIVE", 1)
            def ready(self):
                return True

        async def main():
            api = Api(Controller(), load_tokens({str(tokens_file)!r}),
                      AuditLog(Path({str(tmp_path / "audit.jsonl")!r})))
            async with TestClient(TestServer(api.app(), host="127.0.0.1")) as client:
                resp = await client.get("/v1/status",
                                        headers={{"Authorization": "Bearer {read_token}"}})
                print(resp.status)

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True,
                          text=True, timeout=30, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "200", proc.stderr[-2000:]
