"""The daemon's side of the control API: status as JSON, operator commands into the
election, and the API server's lifecycle (with optional TLS and client certificates)."""

from __future__ import annotations

import logging
import ssl
from typing import Any, Protocol

from aiohttp import web

from vipd.api import HTTP_SHUTDOWN_TIMEOUT, Api, Outcome
from vipd.audit import AuditLog
from vipd.config import ApiConfig, Config
from vipd.core import election as el
from vipd.errors import VipdError
from vipd.metrics import Metrics
from vipd.tokens import load_tokens
from vipd.view import Status
from vipd.webconfig import Listener, server_tls_context

log = logging.getLogger(__name__)


class ApiError(VipdError):
    """The control API could not start (port in use, bad certificate)."""


class Node(Protocol):
    """What the control API needs of the running node."""

    async def status(self) -> Status: ...
    def ready(self) -> bool: ...
    def handle(self, event: el.Event) -> list[Any]: ...


class NodeController:
    """The API's `Controller`: status from the one view, commands as election events."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def ready(self) -> bool:
        return self.node.ready()

    async def command(self, kind: el.CommandKind, force: bool, expected_term: int | None,
                      target: str = "") -> Outcome:
        before = await self.node.status()
        if expected_term is not None and expected_term != before.pair_term:
            return Outcome(False, f"expected_term {expected_term} is stale: the pair is at "
                                  f"term {before.pair_term}; check the status and retry",
                           before.state, before.term)
        results = [a for a in self.node.handle(el.Command(kind, force, target))
                   if isinstance(a, el.CommandResult)]
        result = results[0] if results else el.CommandResult(kind, False, "no result")
        after = await self.node.status()
        return Outcome(result.accepted, result.message, after.state, after.term)

    async def status(self) -> dict[str, Any]:
        return (await self.node.status()).to_json()


def tls_context(api: ApiConfig) -> ssl.SSLContext | None:
    if api.tls is None:
        return None
    try:
        ctx = server_tls_context(api.tls.cert, api.tls.key, api.tls.client_ca,
                                 ssl.CERT_REQUIRED)
    except (OSError, ssl.SSLError) as exc:
        raise ApiError(f"api.tls: cannot load certificate/key/CA ({api.tls.cert}, "
                       f"{api.tls.key}, {api.tls.client_ca}): {exc}") from exc
    return ctx


async def start_api(cfg: Config, node: Node, metrics: Metrics
                    ) -> tuple[Listener, Api] | None:
    """The control API on api.listen; the listener takes a renewed certificate on reload
    (`Listener.serve`)."""
    if cfg.api.listen is None:
        return None
    tokens = load_tokens(cfg.api.tokens_file) if cfg.api.tokens_file is not None else None
    api = Api(NodeController(node), tokens, AuditLog(cfg.effective_audit_file),
              on_request=lambda route, code: metrics.api_requests.labels(
                  route, str(code)).inc())
    ssl_context = tls_context(cfg.api)  # before setup: a bad certificate leaves nothing open
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT)
    await runner.setup()
    listener = Listener(runner, cfg.api.listen, "api.listen")
    try:
        await listener.serve(ssl_context)
    except VipdError as exc:
        await runner.cleanup()
        raise ApiError(str(exc)) from exc
    log.info("control API on %s://%s%s", listener.scheme, cfg.api.listen,
             "" if tokens is not None else " (no tokens file: only /healthz and /readyz)")
    return listener, api
