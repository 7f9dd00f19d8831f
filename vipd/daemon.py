"""The supervisor: builds the runtime, starts it in order, and stops it within a second.

    datagram / timer / command / probe  ->  Driver  ->  Election (pure)  ->  actions
                                               |-> session + socket   (heartbeats)
                                               |-> VipWorker          (addresses, ARP/NA)
                                               |-> HookRunner         (operator programs)
                                               '-> StateFile, Notifier, Metrics

Start order: identity and privileges (here, never in a constructor), stale VIPs of a
crashed run removed, the heartbeat socket, the API and /metrics, signal handlers, then
every long-lived task in one `asyncio.TaskGroup` (the VIP worker, the health checks,
the watchdog, the reload loop) and the election's Start. Signal handlers only set flags
(uvicorn's habit); the lifecycle acts on them. A task that crashes ends the group: the
VIPs are released and the error re-raised, so systemd restarts vipd.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from vipd import __version__, flaps
from vipd.api import Api
from vipd.arbiter.etcd import EtcdStore, store_for
from vipd.checks import CheckRunner
from vipd.config import Config, MoverConfig, format_duration
from vipd.control import start_api
from vipd.core import election as el
from vipd.core import group as g
from vipd.core.protocol import KeyRing, Session, settings_digest
from vipd.driver import Driver, new_session, new_witness_client
from vipd.errors import VipdError, VipError
from vipd.fence import HeartbeatFilter, KernelFence
from vipd.groupdriver import GroupDriver, group_config
from vipd.hooks import HookRunner
from vipd.keys import load_keys
from vipd.metrics import StatusCollector, build_metrics, serve_metrics
from vipd.movers.aws import AwsMover
from vipd.movers.base import VipMover
from vipd.movers.netlink import NetlinkMover
from vipd.movers.remote import RemoteMover, RemoteMoverRunner
from vipd.movers.webhook import WebhookMover, load_secret
from vipd.privileges import resolve_exec_user
from vipd.reload import ReloadError, read_reload
from vipd.statefile import StateFile
from vipd.systemd import Notifier, watchdog
from vipd.transport import HeartbeatTransport
from vipd.view import Status, group_snapshot, keys_view, snapshot
from vipd.vipworker import RECONCILE_WATCHED, VipWorker
from vipd.webconfig import Listener, WebListener

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 0.8  # SIGTERM must end the process within a second
def election_config(cfg: Config) -> el.ElectionConfig:
    hb = cfg.pair
    return el.ElectionConfig(
        node=cfg.node, priority=cfg.priority, preempt=cfg.preempt,
        preempt_delay=cfg.preempt_delay, interval=hb.interval, dead_after=hb.dead_after,
        digest=settings_digest(cfg.cluster, [str(v) for v in cfg.vips], hb.interval,
                               hb.dead_after, cfg.vote_lease if cfg.arbiter else 0.0),
        witnesses=tuple(str(w) for w in cfg.arbiter.witnesses) if cfg.arbiter else (),
        lease=cfg.vote_lease if cfg.arbiter else 0.0,
        damping=cfg.damping.rule())


def heartbeat_filter(cfg: Config) -> HeartbeatFilter | None:
    """A pair's heartbeat socket takes datagrams from the peers and the witnesses only
    (both fixed while running: vipd/reload.py refuses changes); a group has none."""
    if cfg.heartbeat is None:
        return None
    witnesses = cfg.arbiter.witnesses if cfg.arbiter is not None else []
    return HeartbeatFilter(cfg.heartbeat.bind, tuple(
        e.host for e in [*cfg.heartbeat.peers, *witnesses]))


class Daemon:
    def __init__(self, config: Config, *, config_path: Path | None = None,
                 mover: VipMover | None = None, store: EtcdStore | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.mover: VipMover = mover or NetlinkMover(config.interface, config.vips)
        self.started = time.monotonic()
        self.metrics = build_metrics()
        self.collector = StatusCollector()
        self.metrics.registry.register(self.collector)
        self.notifier = Notifier()
        state_file = StateFile(config.effective_state_dir)
        saved = state_file.load()
        term, maintenance = int(saved.get("term", 0)), bool(saved.get("maintenance", False))
        damper, crashed = flaps.restored(saved)
        self.worker = VipWorker(config, self.mover, self.metrics, self._report)
        self.hooks = HookRunner(config, self.metrics, preexec=None)
        self.driver: Driver | GroupDriver
        if config.etcd is not None:  # a group: etcd decides who holds
            self.driver = GroupDriver(
                config, g.GroupElection(group_config(config), maintenance=maintenance,
                                        term=term, damper=damper),
                store or store_for(config.etcd, config.cluster, config.node), self.worker,
                self.hooks, state_file, self.notifier, self.metrics, on_finished=self._finish,
                crashed=crashed)
        else:  # a pair: heartbeats (and a witness's votes)
            election = el.Election(election_config(config), term=term,
                                   maintenance=maintenance, damper=damper)
            keys, boot_id = KeyRing(load_keys(config.key_file)), secrets.randbits(64)
            self.driver = Driver(
                config, election, new_session(config, keys, boot_id, election.cfg.digest),
                self.worker, self.hooks, state_file, self.notifier, self.metrics,
                on_finished=self._finish,
                witnesses=new_witness_client(config, keys, boot_id, election.cfg.digest),
                crashed=crashed)
        # The gate never stays open past the votes or the etcd lease held (loop time is
        # time.monotonic()).
        self.worker.gate_limit = self.driver.gate_limit
        self.worker.remotes = [self._remote(m) for m in config.remote_movers]
        self.checks = CheckRunner(config, self.metrics, self._report)
        self.api: Api | None = None
        self._metrics_web: WebListener | None = None
        self._api_listener: Listener | None = None
        self._held: set[str] = set()  # the VIPs the kernel had at the last status
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._done = asyncio.Event()  # the lifecycle ends: stopped, or a second signal
        self._stop_requested = False
        self._stop_at = 0.0  # time.monotonic() of the first stop signal
        self._reload_requested = asyncio.Event()
        self._fatal: BaseException | None = None
        self._filter_unreadable = False  # said once (status, metrics scrapes)

    def _remote(self, spec: MoverConfig) -> RemoteMoverRunner:
        """A remote mover of config `movers` and the task that drives it."""
        cfg, m = self.config, self.metrics
        vips = [str(v) for v in cfg.vips]
        mover: RemoteMover
        if spec.webhook is not None:
            hook = spec.webhook
            mover = WebhookMover(url=hook.url, verify_url=hook.verify_url,
                                 secret=load_secret(hook.secret_file), cluster=cfg.cluster,
                                 node=cfg.node, vips=vips)
            reconcile, timeout = hook.reconcile, hook.timeout
        else:
            aws = spec.aws
            assert aws is not None
            mover = AwsMover(region=aws.region, eni=aws.eni, cluster=cfg.cluster,
                             node=cfg.node, vips=vips, secondary_ips=aws.secondary_ips,
                             elastic_ips=[(e.allocation_id, str(e.private_ip))
                                          for e in aws.elastic_ips],
                             route_tables=list(aws.route_tables),
                             endpoint_url=aws.endpoint_url,
                             credentials_file=aws.credentials_file)
            reconcile, timeout = aws.reconcile, aws.timeout
        name = mover.name

        def observe(operation: str, code: str, took: float, error: str | None) -> None:
            m.mover_latency.labels(name, operation).observe(took)
            if error is not None:
                m.mover_errors.labels(name, operation, code).inc()

        return RemoteMoverRunner(
            mover, cfg.node, reconcile=reconcile, timeout=timeout,
            may_call=self._may_call_remote, on_superseded=self._superseded, observe=observe,
            on_verified=m.mover_verified.labels(name).observe,
            on_correction=m.mover_corrections.labels(name).inc)

    def _may_call_remote(self) -> bool:
        """With an arbiter, a remote mover moves the VIPs only while this node holds its
        votes or its etcd lease (the same bound as the kernel gate)."""
        return self.config.arbiter is None or (
            self._loop is not None and self.driver.gate_limit(self.loop_time()) is not None)

    def _superseded(self, detail: str) -> None:
        """A provider says a newer term holds the VIPs: the election re-validates."""
        log.warning("%s", detail)
        self.driver.handle(el.VipsLost(detail))

    # --- what observers read (API, metrics, tests) ----------------------------------------

    @property
    def pair(self) -> Driver:
        """The pair's driver (heartbeats, votes); only called on a pair."""
        assert isinstance(self.driver, Driver), "a group (arbiter etcd) has no pair driver"
        return self.driver

    @property
    def group(self) -> GroupDriver:
        """The group's driver (arbiter etcd); only called on a group."""
        assert isinstance(self.driver, GroupDriver), "a pair has no group driver"
        return self.driver

    @property
    def election(self) -> el.Election:
        return self.pair.election

    @property
    def session(self) -> Session:
        return self.pair.session

    @property
    def transport(self) -> HeartbeatTransport | None:
        return self.driver.transport if isinstance(self.driver, Driver) else None

    def loop_time(self) -> float:
        return self.driver.loop_time()

    def ready(self) -> bool:
        return self.driver.ready(self.loop_time())

    async def status(self) -> Status:
        """The one view of this node for the API, vipctl and metrics. The VIPs are read
        from the kernel; when that fails, the last known ones with the error."""
        vip_error = None
        try:
            self._held = {str(v) for v in await asyncio.wait_for(self.mover.held(), 0.5)}
        except (VipError, TimeoutError) as exc:
            vip_error = str(exc) or "reading the VIPs timed out"
            log.warning("status: cannot read VIPs (%s); reporting the last known", vip_error)
        return self.view(self._held, vip_error)

    def view(self, held: set[str], vip_error: str | None = None) -> Status:
        """The snapshot itself, for VIPs read already (``held``), with the remote
        movers' verified state."""
        now = time.monotonic()
        return dataclasses.replace(self._view(held, vip_error),
                                   movers=[r.status(now) for r in self.worker.remotes],
                                   heartbeat_filtered=self._filtered())

    def _filtered(self) -> int | None:
        """The kernel's count of heartbeats from elsewhere (None: no filter, or the
        table cannot be read: a status must not fail for it)."""
        fence = self.worker.fence
        try:
            count = fence.filtered() if fence is not None else None
        except VipError as exc:
            if not self._filter_unreadable:  # once until it reads again: scrapes repeat
                log.warning("status: cannot read the heartbeat filter's counter: %s", exc)
            self._filter_unreadable = True
            return None
        if self._filter_unreadable:
            log.info("status: the heartbeat filter's counter reads again")
        self._filter_unreadable = False
        return count

    def _view(self, held: set[str], vip_error: str | None) -> Status:
        if isinstance(self.driver, GroupDriver):
            return group_snapshot(
                self.config, self.driver.election, self.checks.status(),
                now=self.loop_time(), mono=time.monotonic(), started=self.started, held=held,
                vip_error=vip_error, fence=self.worker.gate(time.monotonic()),
                ready=self.ready(), granted_ttl=self.driver.granted_ttl)
        transport = self.transport
        errors = ({"send": transport.send_errors, "receive": transport.receive_errors}
                  if transport is not None else {"send": 0, "receive": 0})
        return snapshot(self.config, self.election,
                        self.checks.status(),
                        now=self.loop_time(), mono=time.monotonic(), started=self.started,
                        held=held, vip_error=vip_error, last_rtt=self.pair.last_rtt,
                        clock_offset=self.session.clock_offset,
                        rejected=self.metrics.hot.rejected, socket_errors=errors,
                        fence=self.worker.gate(time.monotonic()),
                        witness_replies=self.pair.witness_replies(),
                        keys=keys_view(self.session.keys, self.session.peer_newest_key,
                                       None if self.election.peer is None
                                       else self.election.peer.heartbeat))

    def handle(self, event: el.Event) -> list[Any]:
        """For the control API: an operator command is just another event."""
        return self.driver.handle(event)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal error (raised after releasing)."""
        self._loop = loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_exception)
        cfg = self.config
        exec_user = resolve_exec_user(cfg.exec_user)  # privileges: here, once
        self.hooks.preexec = self.checks.preexec = exec_user.preexec()
        log.info("vipd %s starting: node %s, cluster %s, VIPs %s on %s, priority %d",
                 __version__, cfg.node, cfg.cluster, ", ".join(map(str, cfg.vips)),
                 cfg.interface, cfg.priority)
        if cfg.arbiter is None:
            log.warning("no arbiter: a partition of the heartbeat path makes both nodes "
                        "active (configure `arbiter: {witness: [HOST:PORT]}`)")
        elif cfg.arbiter.etcd is not None:
            etcd = cfg.arbiter.etcd
            log.info("arbiter: etcd %s, prefix %s, lease TTL %s%s: the holder of %s/%s/holder "
                     "holds the VIPs", ", ".join(map(str, etcd.endpoints)), etcd.prefix,
                     format_duration(etcd.ttl), " over TLS" if etcd.tls else "",
                     etcd.prefix.rstrip("/"), cfg.cluster)
        else:
            log.info("arbiter: witness %s, vote lease %s: a node holds the VIPs only with "
                     "%d of %d votes", ", ".join(map(str, cfg.arbiter.witnesses)),
                     format_duration(cfg.vote_lease), election_config(cfg).voters // 2 + 1,
                     election_config(cfg).voters)
        if cfg.fence == "kernel":  # shut before anything: a previous run's gate goes too
            self.worker.fence = KernelFence(cfg.cluster, cfg.vips,
                                            heartbeat=heartbeat_filter(cfg))
            self.worker.fence.install()
        try:
            await self.mover.release()  # stale VIPs of a crashed previous run
        except VipError as exc:
            log.error("cannot remove stale VIPs: %s", exc)
        transport = None
        if isinstance(self.driver, Driver):
            transport = await HeartbeatTransport.open(cfg.pair.bind, self.driver.on_datagrams)
            self.driver.attach(transport)
        else:
            self.driver.attach()
        runners: list[web.AppRunner] = []
        try:
            started = await start_api(cfg, self, self.metrics)
            if started is not None:
                self._api_listener, self.api = started
                runners.append(self._api_listener.runner)
            self._metrics_web = await serve_metrics(
                cfg.metrics.listen, self.metrics, self.collector, self.status,
                cfg.metrics.web_config_file)
            runners += [self._metrics_web.runner] if self._metrics_web is not None else []
        except VipdError:
            if transport is not None:
                transport.close()
            for runner in runners:
                await runner.cleanup()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            await self._supervise()
        finally:
            await self._shutdown(runners)
        if self._fatal is not None:
            raise self._fatal
        return 0

    async def _supervise(self) -> None:
        """All long-lived tasks in one group, until the lifecycle is done or one of them
        crashes (then the first error is kept for run() to raise)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._start(tg, self.worker.run(), "vip worker")
                if isinstance(self.mover, NetlinkMover):  # VIPs added or deleted: at once
                    self.worker.reconcile_every = RECONCILE_WATCHED
                    self._start(tg, self.mover.watch_addresses(self.worker.address_changed),
                                "address watch")
                self._start(tg, self.checks.run(), "health checks")
                if self.notifier.watchdog:
                    stale = max(1.0, 4 * self.config.interval)
                    self._start(tg, watchdog(self.notifier, self.notifier.watchdog,
                                             lambda: self.driver.timer_works(stale)),
                                "watchdog")
                self._start(tg, self._reloads(), "reload")
                for coro, name in self.driver.tasks():
                    self._start(tg, coro, name)
                for remote in self.worker.remotes:
                    self._start(tg, remote.run(), f"mover {remote.mover.name}")
                self.driver.start()
                await self._done.wait()
                for task in self._tasks:
                    task.cancel()
        except* Exception as group:
            first = group.exceptions[0]
            log.critical("task crashed: %r; releasing VIPs and exiting", first, exc_info=first)
            self._fatal = self._fatal or first

    def _start(self, tg: asyncio.TaskGroup, coro: Any, name: str) -> asyncio.Task[Any]:
        task = tg.create_task(coro, name=name)
        self._tasks.append(task)
        return task

    async def _shutdown(self, runners: list[web.AppRunner]) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        self.driver.stop()
        await self.hooks.finish(self._stop_budget())
        # The VIPs first: nothing below (probes, open HTTP requests) may delay that.
        try:
            await asyncio.wait_for(self.mover.release(), 1.0)
        except (VipError, TimeoutError) as exc:
            log.error("releasing VIPs at exit failed: %s", exc)
        if self.worker.fence is not None:
            try:
                self.worker.fence.remove()
            except VipError as exc:
                log.error("removing the kernel fence at exit failed: %s", exc)
        if isinstance(self.driver, GroupDriver):  # the resign and the revoke may be in flight
            await self.driver.close(self._stop_budget())
        await self.checks.close()
        for remote in self.worker.remotes:
            await remote.mover.close()
        for runner in runners:
            await runner.cleanup()
        self.notifier.close()
        log.info("stopped")

    def _stop_budget(self) -> float:
        """What is left of the one-second stop budget for hooks to finish."""
        start = self._stop_at if self._stop_requested else time.monotonic()
        return start + SHUTDOWN_GRACE - time.monotonic()

    def _finish(self) -> None:
        self._done.set()

    def _report(self, event: el.Event) -> None:
        """Events the VIP worker raises (a failed or lapsed VIP) go to the election."""
        self.driver.handle(event)

    # --- signals: they only set flags ----------------------------------------------------

    def _on_stop_signal(self) -> None:
        if self._stop_requested:
            log.warning("second stop signal: exiting now")
            self._done.set()
            return
        self._stop_requested, self._stop_at = True, time.monotonic()
        log.info("stop requested: handing over and releasing VIPs")
        self.notifier.notify(STOPPING=1, STATUS="stopping: handing over")
        assert self._loop is not None
        self._loop.call_soon(self.driver.handle, el.Shutdown())
        self._loop.call_later(SHUTDOWN_GRACE, self._done.set)

    def _on_reload_signal(self) -> None:
        self._reload_requested.set()

    # --- reload --------------------------------------------------------------------------

    async def _reloads(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            if self.config_path is None:
                continue
            self.notifier.notify(RELOADING=1,  # MONOTONIC_USEC: needed by Type=notify-reload
                                 MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                                 // 1000)
            try:
                await self._reload(self.config_path)
            finally:
                self.notifier.notify(READY=1, STATUS=self.driver.status_line())

    async def _reload(self, path: Path) -> None:
        try:
            new = read_reload(path, self.config)
        except ReloadError as exc:
            log.error("%s", exc)
            self.metrics.reloads.labels(exc.result).inc()
            return
        try:  # first: if a new socket cannot listen, the rest of the reload waits
            if new.api_tls is not None and self._api_listener is not None:
                await self._api_listener.serve(new.api_tls)  # a renewed certificate
                log.info("api.listen: TLS certificate, key and client CA read again")
            if new.web is not None and self._metrics_web is not None:
                await self._metrics_web.apply(new.web)
        except VipdError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self.metrics.reloads.labels("error").inc()
            return
        if self.api is not None:
            self.api.tokens = new.tokens
        self.config = new.config
        if new.health_changed:
            self.checks.reload(new.config)
        if isinstance(self.driver, Driver):
            assert new.keys is not None  # a pair's config has its key file
            self.driver.reconfigure(new.config, election_config(new.config), new.keys)
        else:
            self.driver.reconfigure(new.config)
        log.info("config reloaded: priority %d, preempt %s%s", new.config.priority,
                 new.config.preempt, f", keys {new.keys.ids}" if new.keys else "")
        self.metrics.reloads.labels("ok").inc()

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        """A crash in a callback (datagram, timer, signal) must not be swallowed. A report
        without an exception (a library's task collected while pending, an unclosed
        transport) is no crash: it is logged."""
        exc = context.get("exception")
        if exc is None:
            what = context.get("task") or context.get("future") or context.get("handle")
            # gRPC's aio stream leaves its request-iterator task pending when a channel
            # closes under a watch (grpc/grpc#37355): expected at every etcd fail-over.
            known = "_consume_request_iterator" in repr(what)
            log.log(logging.DEBUG if known else logging.WARNING, "event loop: %s%s",
                    context.get("message"), f" ({what!r})" if what is not None else "")
            return
        log.critical("unexpected error: %s; releasing VIPs and exiting", context.get("message"),
                     exc_info=exc)
        self._fatal = exc if isinstance(exc, BaseException) else RuntimeError(
            str(context.get("message")))
        self._done.set()
