"""The `vipd witness` process: the third voter of many pairs, on a third host.

    UDP datagram --> Witness.receive(data, source, now, wall_ns)  (vipd/core/witness.py)
                        |--> replies: sent back to each request's source
                        '--> notices: logged (a vote moving, a give-back, a node boot,
                             refusals at their 1st, 2nd, 4th, 8th ... occurrence)
    GET /metrics, /healthz --> read from the same core
    SIGHUP --> reload (keys, clusters; ballots of clusters that stay are kept)
    SIGTERM / SIGINT --> stop

This module only does I/O: it reads the clocks, owns the socket and the HTTP server,
and handles signals (handlers only set flags). Every decision is in the core. State is in
memory only: a restarted witness grants nothing for one lease (the core's start-up rule).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vipd import __version__
from vipd.api import HTTP_SHUTDOWN_TIMEOUT
from vipd.configtypes import Endpoint
from vipd.core.witness import (
    Address,
    NodeBooted,
    Notice,
    Refused,
    VoteMoved,
    VoteReleased,
    Witness,
)
from vipd.errors import VipdError
from vipd.metrics import build_witness_metrics
from vipd.systemd import Notifier, watchdog
from vipd.webconfig import WebListener, load_web_config, start_http
from vipd.witnessconfig import WitnessConfig, cluster_specs, load_witness_config

log = logging.getLogger(__name__)


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: WitnessServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.server.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error queued on the socket (a node's port unreachable while it
        # restarts) surfaces here; counted, never fatal.
        self.server.socket_errors += 1


class WitnessServer:
    def __init__(self, config: WitnessConfig, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.monotonic()
        self.core = Witness(config.name, secrets.randbits(64),
                            max_skew=config.max_clock_skew)
        self.core.configure(cluster_specs(config), self.started)
        self.registry, self.collector = build_witness_metrics(self.core, time.monotonic)
        self.notifier = Notifier()
        self.socket_errors = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._web: WebListener | None = None  # /metrics and /healthz
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._fatal: BaseException | None = None

    # --- datagrams -------------------------------------------------------------------------

    def on_datagram(self, data: bytes, source: Address) -> None:
        replies = self.core.receive(data, source, time.monotonic(), time.time_ns())
        transport = self._transport
        if transport is not None:
            for reply, address in replies:
                transport.sendto(reply, cast(tuple[Any, ...], address))  # ours: (host, port)
        notices = self.core.take_notices()
        if notices:
            log_notices(notices)

    # --- HTTP --------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response(self.health())

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "name": self.core.name, "version": __version__,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "clusters": len(self.core.clusters),
                "holders": self.core.holders(time.monotonic())}

    async def _serve_http(self, listen: Endpoint | None,
                          web_config_file: Path | None) -> WebListener | None:
        """/metrics and /healthz, both behind the web config's TLS and basic auth."""
        if listen is None:
            return None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        return await start_http(app, listen, web_config_file, "metrics.listen",
                                HTTP_SHUTDOWN_TIMEOUT)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0); raise on a fatal error."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_exception)
        cfg = self.config
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self), local_addr=(str(cfg.listen.host), cfg.listen.port))
        except OSError as exc:
            raise VipdError(f"cannot bind the witness socket to listen {cfg.listen}: "
                            f"{exc.strerror or exc}") from exc
        self._transport = transport
        try:
            self._web = await self._serve_http(cfg.metrics.listen, cfg.metrics.web_config_file)
        except VipdError:
            transport.close()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        log.info("vipd %s witness started: %s (%s), vote requests on udp %s, metrics %s",
                 __version__, _clusters(len(self.core.clusters)), ", ".join(self.core.clusters),
                 cfg.listen, f"on {cfg.metrics.listen}"
                 if cfg.metrics.listen is not None else "off")
        self.notifier.notify(READY=1, STATUS=self._status())
        try:
            await self._serve()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._transport = None
            transport.close()
            if self._web is not None:
                await self._web.runner.cleanup()
            self.notifier.close()
            log.info("stopped")
        if self._fatal is not None:
            raise self._fatal
        return 0

    async def _serve(self) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        pings = None
        if self.notifier.watchdog:  # the pings come from the loop: a wedged loop stops them
            pings = asyncio.ensure_future(watchdog(self.notifier, self.notifier.watchdog,
                                                   lambda: True))
        try:
            while not self._stop.is_set():
                reload = asyncio.ensure_future(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    await self.reload()
                reload.cancel()
        finally:
            stop.cancel()
            if pings is not None:
                pings.cancel()

    async def reload(self) -> None:
        """Re-read the config, key and web config files; on any error keep serving the
        old ones."""
        if self.config_path is None:
            return
        self.notifier.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)
        try:
            new = load_witness_config(self.config_path)
            specs = cluster_specs(new)
            web_file = self.config.metrics.web_config_file
            if self._web is not None and web_file is not None:
                await self._web.apply(load_web_config(web_file))
        except VipdError as exc:  # ConfigError too
            log.error("reload refused, keeping the running config: %s", exc)
            self.collector.reloads["error"] += 1
            self.notifier.notify(READY=1, STATUS=self._status())
            return
        old = self.config
        for key, before, after in (("listen", old.listen, new.listen),
                                   ("metrics.listen", old.metrics.listen, new.metrics.listen),
                                   ("metrics.web_config_file", old.metrics.web_config_file,
                                    new.metrics.web_config_file)):
            if before != after:
                log.warning("reload: %s changed from %s to %s; it takes effect at the next "
                            "restart", key, before, after)
        before_clusters = set(self.core.clusters)
        self.core.configure(specs, time.monotonic(), name=new.name,
                            max_skew=new.max_clock_skew)
        self.config = new.model_copy(update={"listen": old.listen, "metrics": old.metrics})
        added = sorted(set(specs) - before_clusters)
        removed = sorted(before_clusters - set(specs))
        log.info("config reloaded: %s (added: %s; removed: %s)", _clusters(len(specs)),
                 ", ".join(added) or "none", ", ".join(removed) or "none")
        self.collector.reloads["ok"] += 1
        self.notifier.notify(READY=1, STATUS=self._status())

    def _status(self) -> str:
        return f"serving {_clusters(len(self.core.clusters))}"

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        """A crash in a callback (a datagram, a signal) must end the process loudly."""
        exc = context.get("exception")
        log.critical("unexpected error: %s; exiting", context.get("message"), exc_info=exc)
        self._fatal = exc if isinstance(exc, BaseException) else RuntimeError(
            str(context.get("message")))
        self._stop.set()


def log_notices(notices: list[Notice]) -> None:
    for notice in notices:
        match notice:
            case VoteMoved(cluster=cluster, node=node, previous=None):
                log.info("cluster %s: vote granted to %s (the first since the cluster was "
                         "set up here)", cluster, node)
            case VoteMoved(cluster=cluster, node=node, previous=previous,
                           ended_ago=ago, released=released):
                log.info("cluster %s: vote granted to %s (was %s, %s %.0f ms ago)", cluster,
                         node, previous, "released" if released else "lease ran out",
                         (ago or 0.0) * 1000)
            case VoteReleased(cluster=cluster, node=node):
                log.info("cluster %s: %s gave its vote back", cluster, node)
            case NodeBooted(cluster=cluster, node=node, boot_id=boot, source=source,
                            first=first):
                log.info("cluster %s: node %s %s (boot %#x) from %s", cluster, node,
                         "first heard" if first else "restarted", boot, _address(source))
            case Refused(reason=reason, detail=detail, source=source, count=count):
                if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th ...
                    log.warning("datagram from %s refused (%s, %d so far): %s",
                                _address(source), reason, count, detail)


def _clusters(count: int) -> str:
    return f"{count} cluster" if count == 1 else f"{count} clusters"


def _address(source: Address) -> str:
    if isinstance(source, tuple) and len(source) >= 2:
        host, port = source[0], source[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(source)


def main(config_path: Path, log_format: str = "text") -> int:
    from vipd import logs

    config = load_witness_config(config_path)
    logs.setup(config.name, log_format)
    return asyncio.run(_run(config, config_path))


async def _run(config: WitnessConfig, config_path: Path) -> int:
    return await WitnessServer(config, config_path=config_path).run()

