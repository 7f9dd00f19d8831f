"""The control API (aiohttp): status for everyone with a token, moves for operators.

Routes (docs/api.md, docs/openapi.yaml):
  GET  /healthz           liveness, no auth
  GET  /readyz            200 once the first election decision is made, no auth
  GET  /v1/status         role read or operate
  POST /v1/switchover     role operate  {"force": bool, "expected_term": int}
  POST /v1/maintenance    role operate  {"enabled": bool, "expected_term": int}
  POST /v1/promote        role operate  {"force": bool, "expected_term": int}

Every mutating request, accepted or refused (401, 403, 400, 409 ...), writes one audit
line. Mutating requests are handled one at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vipd.audit import AuditLog
from vipd.core.election import CommandKind
from vipd.tokens import Role, Token, authenticate

HTTP_SHUTDOWN_TIMEOUT = 0.2
"""How long open HTTP requests (API, /metrics) may delay exit: SIGTERM must end vipd
within a second, and aiohttp's own default is 60 s."""

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
# The authenticated token of the request being handled (set by the auth middleware; a
# context variable works with every aiohttp version, request keys do not).
_current_token: ContextVar[Token | None] = ContextVar("vipd_api_token", default=None)


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool
    message: str
    state: str
    term: int


class Controller(Protocol):
    """What the API needs from the daemon."""

    async def status(self) -> dict[str, Any]: ...
    async def command(self, kind: CommandKind, force: bool, expected_term: int | None,
                      target: str = "") -> Outcome: ...
    def ready(self) -> bool: ...


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    expected_term: int | None = Field(default=None, ge=0)


class MoveBody(_Body):
    force: bool = False


class SwitchoverBody(MoveBody):
    to: str | None = Field(default=None, min_length=1, max_length=64)


class MaintenanceBody(_Body):
    enabled: bool


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _body_problem(exc: Exception) -> tuple[str, list[dict[str, str]] | None]:
    """What is wrong with a request body, for the client and the audit log; the fields
    when the JSON was fine but did not fit the model."""
    if isinstance(exc, UnicodeDecodeError):
        return f"body is not UTF-8 (byte {exc.start})", None
    if isinstance(exc, json.JSONDecodeError):
        return (f"body is not valid JSON: {exc.msg} at line {exc.lineno} column "
                f"{exc.colno}"), None
    if isinstance(exc, ValidationError):
        fields = [{"field": ".".join(map(str, e["loc"])) or "(body)", "message": e["msg"]}
                  for e in exc.errors()]
        return "; ".join(f"{f['field']}: {f['message']}" for f in fields), fields
    # e.g. 50,000 nested '[' (RecursionError) or a 5000-digit int (ValueError)
    return f"body cannot be parsed as JSON: {type(exc).__name__}", None


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


class Api:
    def __init__(self, controller: Controller, tokens: list[Token] | None,
                 audit: AuditLog, on_request: Callable[[str, int], None] | None = None) -> None:
        self.controller = controller
        self.tokens = tokens
        self.audit = audit
        self.on_request = on_request  # (route, status) for the request counter
        self._mutating = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._count, self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/v1/switchover", self.switchover)
        app.router.add_post("/v1/maintenance", self.maintenance)
        app.router.add_post("/v1/promote", self.promote)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if self.on_request is not None:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self.on_request(route, status)

    # --- auth ----------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in ("/healthz", "/readyz"):
            return await handler(request)
        mutating = request.method == "POST"
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        token = None
        if self.tokens is None:
            problem = (401, "the API has no tokens file configured (api.tokens_file)")
        elif scheme.lower() != "bearer" or not presented.strip():
            problem = (401, "missing bearer token (Authorization: Bearer TOKEN)")
        else:
            token = authenticate(self.tokens, presented.strip())
            problem = (401, "unknown token") if token is None else (0, "")
        if token is not None and mutating and token.role is not Role.OPERATE:
            problem = (403, f"token {token.name!r} has role {token.role}, "
                            "this request needs 'operate'")
        if problem[0]:
            if mutating:
                self._audit(request, token, result="refused", status=problem[0],
                            message=problem[1])
            response = _error(problem[0], problem[1])
            if problem[0] == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="vipd"'
            return response
        reset = _current_token.set(token)
        try:
            return await handler(request)
        finally:
            _current_token.reset(reset)

    # --- routes --------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.controller.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self.controller.status())

    async def switchover(self, request: web.Request) -> web.Response:
        return await self._move(request, "switchover", SwitchoverBody, lambda b: (
            CommandKind.SWITCHOVER, b.force))

    async def promote(self, request: web.Request) -> web.Response:
        return await self._move(request, "promote", MoveBody, lambda b: (
            CommandKind.PROMOTE, b.force))

    async def maintenance(self, request: web.Request) -> web.Response:
        return await self._move(request, "maintenance", MaintenanceBody, lambda b: (
            CommandKind.MAINTENANCE_ON if b.enabled else CommandKind.MAINTENANCE_OFF, False))

    async def _move(self, request: web.Request, action: str, model: type[_Body],
                    to_command: Callable[[Any], tuple[CommandKind, bool]]) -> web.Response:
        token = _current_token.get()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._audit(request, token, action, result="refused", status=413,
                        message=f"body over {MAX_BODY} bytes")
            return _error(413, f"request body over {MAX_BODY} bytes")
        try:
            body = model.model_validate(json.loads(raw.decode("utf-8")) if raw.strip() else {})
        except (ValueError, RecursionError) as exc:  # ValidationError is a ValueError too
            message, fields = _body_problem(exc)
            self._audit(request, token, action, result="refused", status=400, message=message)
            if fields is not None:
                return _error(400, f"invalid request body: {message}", fields=fields)
            return _error(400, message)
        # a switchover's target goes in the audit line only when one was named
        params = {k: v for k, v in body.model_dump().items() if k != "to" or v is not None}
        kind, force = to_command(body)
        async with self._mutating:
            outcome = await self.controller.command(kind, force, body.expected_term,
                                                    getattr(body, "to", None) or "")
        status = 200 if outcome.accepted else 409
        self._audit(request, token, action, params=params,
                    result="accepted" if outcome.accepted else "refused", status=status,
                    message=outcome.message, state=outcome.state, term=outcome.term)
        payload = {"accepted": outcome.accepted, "message": outcome.message,
                   "state": outcome.state, "term": outcome.term}
        if not outcome.accepted:
            payload["error"] = outcome.message
        return web.json_response(payload, status=status)

    def _audit(self, request: web.Request, token: Token | None, action: str | None = None,
               **fields: Any) -> None:
        self.audit.write(token=token.name if token else None, role=token.role if token else None,
                         source=request.remote, action=action or request.path.rsplit("/", 1)[-1],
                         **fields)
