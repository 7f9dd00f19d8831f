"""The daemon's side of the control API: status as JSON, operator commands into the
election, and the API server's lifecycle (with optional TLS and client certificates)."""

from __future__ import annotations

import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from vipd import __version__
from vipd.api import HTTP_SHUTDOWN_TIMEOUT, Api, Outcome
from vipd.audit import AuditLog
from vipd.config import ApiConfig
from vipd.core import election as el
from vipd.core.protocol import Flag
from vipd.errors import VipdError, VipError
from vipd.tokens import load_tokens

if TYPE_CHECKING:
    from vipd.daemon import Daemon

log = logging.getLogger(__name__)


class ApiError(VipdError):
    """The control API could not start (port in use, bad certificate)."""


class DaemonController:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def ready(self) -> bool:
        loop_now = self.d.loop_time()
        return self.d.election.ready(loop_now)

    def pair_term(self) -> int:
        e = self.d.election
        return max(e.term, e.peer_term_seen)

    async def command(self, kind: el.CommandKind, force: bool,
                      expected_term: int | None) -> Outcome:
        e = self.d.election
        if expected_term is not None and expected_term != self.pair_term():
            return Outcome(False, f"expected_term {expected_term} is stale: the pair is at "
                                  f"term {self.pair_term()}; check the status and retry",
                           e.state.name, e.term)
        results = [a for a in self.d.handle(el.Command(kind, force))
                   if isinstance(a, el.CommandResult)]
        result = results[0] if results else el.CommandResult(kind, False, "no result")
        return Outcome(result.accepted, result.message, e.state.name, e.term)

    async def status(self) -> dict[str, Any]:
        d, e = self.d, self.d.election
        now = d.loop_time()
        mono = time.monotonic()
        try:
            held = {str(v) for v in await d.mover.held()}
            vip_error = None
        except VipError as exc:
            held, vip_error = set(), str(exc)
        checks = [{"name": c.name, "kind": c.kind, "up": c.up, "detail": c.detail,
                   "duration_seconds": c.duration,
                   "last_change_seconds_ago": None if c.changed_at is None
                   else round(mono - c.changed_at, 3)} for c in d.check_status()]
        peer = None
        if e.peer is not None:
            hb = e.peer.heartbeat
            peer = {"node": hb.node, "state": hb.state.name, "term": hb.term,
                    "priority": hb.priority, "effective_priority": hb.effective_priority,
                    "healthy": Flag.HEALTHY in hb.flags,
                    "flags": [f.name for f in Flag if f and f in hb.flags],
                    "last_heartbeat_seconds_ago": round(now - e.peer.received_at, 3),
                    "reachable": e.peer_alive(now), "hears_us": e.peer_hears_us(now),
                    "rtt_ms": None if d.last_rtt is None else round(d.last_rtt * 1000, 3),
                    "settings_match": hb.settings_digest == e.cfg.digest}
        return {
            "node": d.config.node, "cluster": d.config.cluster, "version": __version__,
            "uptime_seconds": round(mono - d.started, 3),
            "state": e.state.name, "term": e.term, "pair_term": self.pair_term(),
            "priority": e.cfg.priority, "effective_priority": e.cfg.priority,
            "preempt": e.cfg.preempt, "preferred": e.preferred,
            "maintenance": e.maintenance, "healthy": e.health,
            "health_override": e.health_override,
            "handover": None if e.handover is None else e.handover.target.name,
            "ready": e.ready(now), "checks": checks, "interface": d.config.interface,
            "vips": [{"address": str(v), "held": str(v) in held} for v in d.config.vips],
            "vip_error": vip_error, "peer": peer,
            "config_digest": e.cfg.digest.hex(),
            "rejected_heartbeats": {reason: count for reason, count
                                    in d.metrics.hot.rejected.items() if count},
        }


def tls_context(api: ApiConfig) -> ssl.SSLContext | None:
    if api.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(api.tls.cert, api.tls.key)
        if api.tls.client_ca is not None:
            ctx.load_verify_locations(api.tls.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ApiError(f"api.tls: cannot load certificate/key/CA ({api.tls.cert}, "
                       f"{api.tls.key}, {api.tls.client_ca}): {exc}") from exc
    return ctx


async def start_api(daemon: Daemon) -> web.AppRunner | None:
    cfg = daemon.config
    if cfg.api.listen is None:
        return None
    tokens = load_tokens(cfg.api.tokens_file) if cfg.api.tokens_file is not None else None
    api = Api(DaemonController(daemon), tokens, AuditLog(cfg.effective_audit_file),
              on_request=lambda route, code: daemon.metrics.api_requests.labels(
                  route, str(code)).inc())
    daemon.api = api
    ssl_context = tls_context(cfg.api)  # before setup: a bad certificate leaves nothing open
    runner = web.AppRunner(api.app(), access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, str(cfg.api.listen.host), cfg.api.listen.port,
                       ssl_context=ssl_context, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ApiError(f"cannot listen on api.listen {cfg.api.listen}: "
                       f"{exc.strerror or exc}") from exc
    scheme = "https" if cfg.api.tls else "http"
    log.info("control API on %s://%s%s", scheme, cfg.api.listen,
             "" if tokens is not None else " (no tokens file: only /healthz and /readyz)")
    return runner
