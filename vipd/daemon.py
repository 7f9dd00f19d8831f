"""The daemon: wires the pure election to the clock, the UDP socket, the VIP mover,
the health monitor, hooks and signals. The only module that reads the clock.

One timer is armed at a time (the election's next deadline). Actions that touch the
kernel or run programs go to tasks, so a slow netlink call, probe or hook never delays a
heartbeat; VIP add/remove run one at a time in the order the election decided them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from vipd import __version__
from vipd.api import Api
from vipd.config import Check, Config, LinkCheck, load_config
from vipd.control import start_api
from vipd.core import election as el
from vipd.core.events import UNPLANNED_TAKEOVERS
from vipd.core.protocol import KeyRing, Reject, Rejected, Session, State, settings_digest
from vipd.errors import VipdError, VipError
from vipd.health import HealthMonitor, ProbeResult
from vipd.keys import load_keys
from vipd.metrics import DaemonCollector, build_metrics, serve_metrics
from vipd.privileges import resolve_exec_user
from vipd.systemd import Notifier
from vipd.tokens import load_tokens
from vipd.transport import HeartbeatTransport
from vipd.vip import NetlinkMover, VipMover, announce_burst, lifetime_seconds

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 0.8  # SIGTERM must end the process within a second
RECONCILE_EVERY = 2.0  # a standby checks this often that none of its VIPs is on the interface
# The kernel removes an address up to about 0.4 s before its lifetime runs out (measured:
# 2.6-2.9 s for 3 s), so a renewal this close to the lifetime may come too late.
LAPSE_MARGIN = 0.5


def election_config(cfg: Config) -> el.ElectionConfig:
    hb = cfg.heartbeat
    return el.ElectionConfig(
        node=cfg.node, priority=cfg.priority, preempt=cfg.preempt,
        preempt_delay=cfg.preempt_delay, interval=hb.interval, dead_after=hb.dead_after,
        digest=settings_digest(cfg.cluster, [str(v) for v in cfg.vips], hb.interval,
                               hb.dead_after))


class StateFile:
    """Term and maintenance flag survive restarts (term: fencing; maintenance: drain)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "state.json"
        self._warned = False
        self._saved: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        self._saved = data
        return data

    def save(self, **values: Any) -> None:
        """Write only what changed: this runs on the loop at every transition, on a
        takeover's way to acquiring the VIPs."""
        if values == self._saved:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(values))
            os.replace(tmp, self.path)
            self._saved = values
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write state file %s: %s (term and maintenance will not "
                            "survive a restart)", self.path, exc)
                self._warned = True


class Daemon:
    def __init__(self, config: Config, *, config_path: Path | None = None,
                 mover: VipMover | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.mover: VipMover = mover or NetlinkMover(config.interface, config.vips)
        self.keys = KeyRing(load_keys(config.auth.key_file))
        self.state_file = StateFile(config.effective_state_dir)
        self.boot_id = secrets.randbits(64)
        self.started = time.monotonic()
        self.last_rtt: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._vip_queue: asyncio.Queue[el.AcquireVips | el.ReleaseVips] = asyncio.Queue()
        self._holding = False  # what the VIP worker last applied (acquired, released)
        self.notifier = Notifier()
        self._ready_sent = False
        self._last_timer_fire = time.monotonic()
        self._last_renew = self._last_announce = self._last_reconcile = time.monotonic()
        self._quiet_until = 0.0  # after a stall the upkeep waits for the election
        self._announcer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hooks: set[asyncio.Task[None]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._stop_at: float | None = None
        self._done = asyncio.Event()
        self._fatal: BaseException | None = None
        self._took_over_at: float | None = None
        self._offset_warned = False
        saved = self.state_file.load()
        self.election = el.Election(election_config(config), term=int(saved.get("term", 0)),
                                    maintenance=bool(saved.get("maintenance", False)))
        self.session = self._new_session()
        self.exec_user = resolve_exec_user(config.exec_user)
        self.metrics = build_metrics()
        self.collector = DaemonCollector(self)
        self.metrics.registry.register(self.collector)
        self.health = self._new_health_monitor()
        self.transport: HeartbeatTransport | None = None
        self._metrics_runner: web.AppRunner | None = None
        self.api: Api | None = None
        self._api_runner: web.AppRunner | None = None

    def _new_session(self) -> Session:
        hb = self.config.heartbeat
        # (host, port) tuples made once: the send path runs for every heartbeat.
        self._peer_addresses = [(str(p.host), p.port) for p in hb.peers]
        return Session(cluster=self.config.cluster, node=self.config.node, keys=self.keys,
                       boot_id=self.boot_id, digest=self.election.cfg.digest,
                       peer_sources={str(p.host) for p in hb.peers},
                       max_skew=hb.max_clock_skew)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a fatal error (raised after releasing)."""
        self._loop = loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_exception)
        log.info("vipd %s starting: node %s, cluster %s, VIPs %s on %s, priority %d",
                 __version__, self.config.node, self.config.cluster,
                 ", ".join(map(str, self.config.vips)), self.config.interface,
                 self.config.priority)
        try:
            await self.mover.release()  # stale VIPs of a crashed previous run
        except VipError as exc:
            log.error("cannot remove stale VIPs: %s", exc)
        self.transport = await HeartbeatTransport.open(self.config.heartbeat.bind,
                                                       self._on_datagrams)
        try:
            self._api_runner = await start_api(self)
            self._metrics_runner = await serve_metrics(self, self.collector)
        except VipdError:
            self.transport.close()
            if self._api_runner is not None:
                await self._api_runner.cleanup()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            self._spawn(self._vip_worker(), "vip worker")
            self._health_task = self._spawn(self.health.run(), "health monitor")
            if self.notifier.watchdog:
                self._spawn(self._watchdog_loop(self.notifier.watchdog), "watchdog")
            self._handle(el.Start())
            await self._done.wait()
        finally:
            await self._shutdown()
        if self._fatal is not None:
            raise self._fatal
        return 0

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if self._timer is not None:
            self._timer.cancel()
        if self._hooks:  # let the last hooks finish within the one-second stop budget
            budget = (self._stop_at or time.monotonic()) + SHUTDOWN_GRACE - time.monotonic()
            await asyncio.wait(self._hooks, timeout=max(budget, 0.05))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The VIPs first: nothing below (probes, open HTTP requests) may delay that.
        try:
            await asyncio.wait_for(self.mover.release(), 1.0)
        except (VipError, TimeoutError) as exc:
            log.error("releasing VIPs at exit failed: %s", exc)
        if self.transport is not None:
            self.transport.close()
        await self.health.close()
        for runner in (self._api_runner, self._metrics_runner):
            if runner is not None:
                await runner.cleanup()
        self.notifier.close()
        log.info("stopped")

    def _on_stop_signal(self) -> None:
        if self.election.stopping:
            log.warning("second stop signal: exiting now")
            self._done.set()
            return
        log.info("stop requested: handing over and releasing VIPs")
        self.notifier.notify(STOPPING=1, STATUS="stopping: handing over")
        self._stop_at = time.monotonic()
        self._handle(el.Shutdown())
        assert self._loop is not None
        self._loop.call_later(SHUTDOWN_GRACE, self._done.set)

    def _on_reload_signal(self) -> None:
        self._spawn(self._reload(), "reload")

    async def _reload(self) -> None:
        if self.config_path is None:
            return
        self.notifier.notify(RELOADING=1,  # MONOTONIC_USEC: needed by Type=notify-reload
                             MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            await self._reload_config(self.config_path)
        finally:
            self.notifier.notify(READY=1, STATUS=self._status_line())

    async def _reload_config(self, path: Path) -> None:
        try:
            new = load_config(path)
            keys = KeyRing(load_keys(new.auth.key_file))
            tokens = (load_tokens(new.api.tokens_file)
                      if new.api.tokens_file is not None else None)
        except (VipdError, ValueError) as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self.metrics.reloads.labels("error").inc()
            return
        # exec_user is resolved against vipd's own privileges once, at start.
        fixed = ("cluster", "node", "interface", "vips", "heartbeat", "state_dir", "metrics",
                 "audit", "exec_user")
        changed = [k for k in fixed if getattr(new, k) != getattr(self.config, k)]
        if (new.api.listen, new.api.tls) != (self.config.api.listen, self.config.api.tls):
            changed.append("api.listen/api.tls")
        if changed:
            log.error("reload refused: %s cannot change while running; restart vipd",
                      ", ".join(changed))
            self.metrics.reloads.labels("refused").inc()
            return
        if self.api is not None:
            self.api.tokens = tokens
        health_changed = ((new.health, new.track_interface)
                          != (self.config.health, self.config.track_interface))
        self.config, self.keys = new, keys
        self.session.keys = keys
        if health_changed:
            await self._restart_health()
        self.election.cfg = election_config(new)
        log.info("config reloaded: priority %d, preempt %s, keys %s", new.priority,
                 new.preempt, keys.ids)
        self.metrics.reloads.labels("ok").inc()
        self._handle(el.Tick())

    async def _restart_health(self) -> None:
        """New checks start unknown; the election holds its last verdict until they report."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        await self.health.close()
        self.health = self._new_health_monitor()
        self._health_task = self._spawn(self.health.run(), "health monitor")
        log.info("health checks reloaded: %s",
                 ", ".join(c.name for c in self.config.health) or "none")

    def _new_health_monitor(self) -> HealthMonitor:
        checks: list[Check] = list(self.config.health)
        if self.config.track_interface:
            checks.append(LinkCheck(interface=self.config.interface))
        return HealthMonitor(checks, self._on_health, on_probe=self._on_probe,
                             exec_preexec=self.exec_user.preexec())

    def _on_probe(self, check: str, result: ProbeResult) -> None:
        self.metrics.check_duration.labels(check).observe(result.duration)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop,
                           context: dict[str, Any]) -> None:
        """A crash in a callback (datagram, timer, signal) must not be swallowed."""
        exc = context.get("exception")
        log.critical("unexpected error: %s; releasing VIPs and exiting", context.get("message"),
                     exc_info=exc)
        self._fatal = exc if isinstance(exc, BaseException) else RuntimeError(
            str(context.get("message")))
        self._done.set()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("task %s crashed: %r; releasing VIPs and exiting", task.get_name(), exc,
                         exc_info=exc)
            self._fatal = exc
            self._done.set()

    # --- the core loop -------------------------------------------------------------------

    def _handle(self, event: el.Event) -> list[el.Action]:
        assert self._loop is not None
        now = self._loop.time()
        actions = self.election.handle(event, now)
        for action in actions:
            self._apply(action, now)
        self._rearm()
        if self.election.finished:
            self._done.set()
        elif not self._ready_sent and self.election.ready(now):
            self._ready_sent = True
            self.notifier.notify(READY=1, STATUS=self._status_line())
        return actions

    def _status_line(self) -> str:
        e = self.election
        peer = e.peer.heartbeat if e.peer is not None else None
        seen = f"peer {peer.node} {peer.state.name}" if peer is not None else "peer not heard"
        return f"{e.state.name} term {e.term}, {seen}"

    async def _watchdog_loop(self, period: float) -> None:
        """WATCHDOG=1 at half the period, but only while the election timer works: a
        wedged runtime (timer gone or overdue) stops the pings and systemd restarts it."""
        stale = max(1.0, 4 * self.config.heartbeat.interval)
        while True:
            if self._timer_works(stale):
                self.notifier.notify(WATCHDOG=1)
            await asyncio.sleep(period / 2)

    def _timer_works(self, stale: float) -> bool:
        """The timer fired lately, or is armed for a deadline not long past. A node that
        answers its peer's heartbeats sends them without its timer ever firing (the
        timer is only its fallback), so "fired lately" alone would call it wedged."""
        now = time.monotonic()
        if now - self._last_timer_fire <= stale:
            return True
        return self._timer is not None and self._timer.when() >= now - stale

    handle = _handle  # for the control API: an operator command is just another event

    def loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _rearm(self) -> None:
        assert self._loop is not None
        deadline = self.election.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() == deadline:
                return  # usually so after a heartbeat arrives: keep the armed timer
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        assert self._loop is not None
        self._timer = None
        self._last_timer_fire = time.monotonic()
        self.metrics.hot.lateness.observe(max(self._loop.time() - deadline, 0.0))
        if self.transport is not None:
            self.transport.drain()  # after a stall the peer's heartbeats are heard first
        self._handle(el.Tick())

    def _on_datagrams(self, batch: list[tuple[bytes, str]]) -> None:
        """Authenticate the whole batch, then let the election act on each in order: a
        heartbeat sent in reaction to the first already echoes the newest. (After a
        stall the peer then sees at once that we hear it again.)"""
        assert self._loop is not None
        now, wall_ns = self._loop.time(), time.time_ns()
        events = [event for data, source in batch
                  if (event := self._open(data, source, now, wall_ns)) is not None]
        for event in events:
            self._handle(event)

    def _open(self, data: bytes, source: str, now: float,
              wall_ns: int) -> el.HeartbeatReceived | el.DuplicateNode | None:
        try:
            rx = self.session.open(data, now, wall_ns, source)
        except Rejected as exc:
            rejected = self.metrics.hot.rejected
            count = rejected[exc.reason.value] + 1
            rejected[exc.reason.value] = count
            if exc.reason is Reject.DUPLICATE_NODE:
                return self._duplicate_node(source, count)
            if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th ...: visible, not spam
                log.warning("heartbeat from %s rejected (%d so far): %s", source, count, exc)
            return None
        hot = self.metrics.hot
        hot.received += 1
        if rx.rtt is not None:
            self.last_rtt = rx.rtt
            hot.rtt.observe(rx.rtt)
        if rx.clock_offset is not None:
            self._watch_clock_offset(rx.clock_offset)
        return el.HeartbeatReceived(rx)

    def _duplicate_node(self, source: str, count: int) -> el.DuplicateNode:
        """Another live node sends heartbeats under our name: a configuration error that
        would otherwise leave both nodes ACTIVE. The election goes FAULT while it lasts."""
        node, bind = self.config.node, self.config.heartbeat.bind
        detail = (f"duplicate node name {node!r}: the node at {source} uses it too (this "
                  f"node sends from {bind}); give each node its own name")
        if count & (count - 1) == 0:
            log.error("%s; FAULT and no VIPs here while it is heard (%d heartbeats so far)",
                      detail, count)
        return el.DuplicateNode(detail)

    def _watch_clock_offset(self, offset: float) -> None:
        """The wall clocks may disagree (heartbeats stay fresh by the echo); say so once
        when the offset crosses max_clock_skew, and once when it is back."""
        limit = self.config.heartbeat.max_clock_skew
        far = abs(offset) > limit
        if far == self._offset_warned:
            return
        self._offset_warned = far
        if far:
            log.warning("the peer's wall clock is %+.3f s from ours (more than "
                        "max_clock_skew %g s): check NTP on both nodes; heartbeats stay "
                        "valid, their freshness is proven by the echo", offset, limit)
        else:
            log.info("the peer's wall clock agrees with ours again (%+.3f s)", offset)

    def _on_health(self, healthy: bool, check: str, result: ProbeResult) -> None:
        detail = f"{check}: {result.detail}" if check else result.detail
        self._handle(el.HealthChanged(healthy, detail))

    def _apply(self, action: el.Action, now: float) -> None:
        match action:
            case el.SendHeartbeat(advert=advert):
                assert self.transport is not None
                data = self.session.seal(advert, now, time.time_ns())
                self.metrics.hot.sent += self.transport.send(data, self._peer_addresses)
            case el.Transition(old=old, new=new, why=why, reason=reason, term=term):
                self._log_transition(old, new, reason, term, now)
                self.notifier.notify(STATUS=f"{new.name} term {term} ({reason})")
                self.metrics.transitions.labels(old.name, new.name, why.value).inc()
                peer = self.election.peer
                if new is State.ACTIVE and peer is not None and why in UNPLANNED_TAKEOVERS:
                    self.metrics.detection.observe(max(now - peer.received_at, 0.0))
                self.state_file.save(term=term, maintenance=self.election.maintenance)
            case el.AcquireVips():
                self._took_over_at = now
                self._vip_queue.put_nowait(action)
            case el.ReleaseVips():
                self._vip_queue.put_nowait(action)
            case el.Announce(reason=reason):
                log.info("re-announcing VIPs: %s", reason)
                self._start_announcer()
            case el.RunHook():
                hook = self._spawn(self._run_hook(action), f"hook {action.hook}")
                self._hooks.add(hook)
                hook.add_done_callback(self._hooks.discard)
            case el.CommandResult(kind=kind, accepted=ok, message=message):
                log.info("command %s %s: %s", kind, "accepted" if ok else "refused", message)
                self.state_file.save(term=self.election.term,
                                     maintenance=self.election.maintenance)
            case el.Warn(message=message):
                log.warning("%s", message)

    def _log_transition(self, old: State, new: State, reason: str, term: int,
                        now: float) -> None:
        detail = ""
        peer = self.election.peer
        if new is State.ACTIVE and peer is not None:
            detail = f", peer last heard {1000 * (now - peer.received_at):.0f} ms ago"
        log.info("%s -> %s (%s), term %d%s", old.name, new.name, reason, term, detail)

    # --- VIPs ----------------------------------------------------------------------------

    async def _vip_worker(self) -> None:
        """The one task that changes the kernel's addresses. It applies acquire and
        release strictly in order and, while none is queued, keeps up what it applied
        (`_upkeep`). With a single owner a renewal cannot race a release, nor the stray
        VIP cleanup a takeover. A failure turns into FAULT."""
        while True:
            op: el.AcquireVips | el.ReleaseVips | None = None
            now = time.monotonic()
            delay = self._upkeep_delay(now)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    op = await self._vip_queue.get()
            try:
                if op is None:
                    assert delay is not None  # only a timeout leaves op unset
                    woke = time.monotonic()
                    # Loop lag seen by a timer that runs on every node, also on one that
                    # answers heartbeats and so seldom fires its election timer.
                    late = max(woke - (now + delay), 0.0)
                    self.metrics.hot.lateness.observe(late)
                    await self._upkeep(woke, late)
                elif isinstance(op, el.AcquireVips):
                    await self._acquire()
                else:
                    if self._announcer is not None:  # never announce what is released
                        self._announcer.cancel()
                    self._holding = False
                    await self.mover.release()
                    log.info("VIPs removed from %s", self.config.interface)
            except VipError as exc:
                log.error("%s", exc)
                self.metrics.vip_errors.inc()
                self._handle(el.VipFailed(str(exc)))

    async def _acquire(self) -> None:
        started = time.monotonic()
        await self.mover.acquire(self.config.vip_lease)
        self._holding = True
        self._last_renew = self._last_announce = time.monotonic()
        self._quiet_until = 0.0
        if self._took_over_at is not None:
            self.metrics.acquisition.observe(self.loop_time() - self._took_over_at)
        log.info("VIPs added on %s in %.1f ms: %s", self.config.interface,
                 1000 * (self._last_renew - started), ", ".join(map(str, self.config.vips)))
        self._start_announcer()

    def _start_announcer(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        ann = self.config.announce
        self._announcer = self._spawn(self._announce(ann.count, ann.interval), "announce")

    async def _announce(self, count: int, interval: float) -> None:
        try:
            late_limit = el.STALL_INTERVALS * self.config.heartbeat.interval
            sent = await announce_burst(self.mover, count, interval, late_limit)
            self.metrics.announcements.inc(sent)
        except VipError as exc:
            self.metrics.vip_errors.inc()
            log.error("announcing VIPs failed: %s", exc)

    def renew_period(self) -> float:
        """How often the active renews the VIP lease.

        The kernel counts lifetimes in whole seconds, so renewing every 40 ms buys
        nothing over a few times a second; and a hung daemon's VIPs vanish at most one
        lease after its last renewal, so renewing less often never keeps them longer.
        Three chances per lease, at most every second, never more often than heartbeats.
        """
        return max(self.config.heartbeat.interval, min(self.config.vip_lease / 3, 1.0))

    def _upkeep_delay(self, now: float) -> float | None:
        """Seconds until `_upkeep` is due (None: nothing to keep up). A holder renews and
        re-announces; a standby looks for stray VIPs every RECONCILE_EVERY, so it does
        not wake every heartbeat."""
        if self._holding:
            due = []
            if self.config.vip_lease:
                due.append(self._last_renew + self.renew_period())
            if self.config.announce.refresh:
                due.append(self._last_announce + self.config.announce.refresh)
            if not due:
                return None
        else:
            due = [self._last_reconcile + RECONCILE_EVERY]
        return max(max(min(due), self._quiet_until) - now, 0.0)

    async def _upkeep(self, now: float, late: float) -> None:
        """While holding: renew the lease, re-announce every `refresh`. While not: a
        standby that finds its VIPs on the interface removes them. ``late``: how late
        this wake-up is; a stall means another node may have taken over meanwhile."""
        stalled = late > el.STALL_INTERVALS * self.config.heartbeat.interval
        if not self._holding:
            if now >= self._last_reconcile + RECONCILE_EVERY:
                self._last_reconcile = now
                if await self.mover.held():
                    log.warning("found VIPs on %s while not active: removing them",
                                self.config.interface)
                    self.metrics.vip_corrections.labels("removed").inc()
                    await self.mover.release()
            return
        lease = self.config.vip_lease
        if lease and now - self._last_renew >= lifetime_seconds(lease) - LAPSE_MARGIN:
            await self._lost(f"lease lapsed: last renewal {1000 * (now - self._last_renew):.0f}"
                             f" ms ago, lease {lease:g} s")
            return
        if stalled:
            # The peer may hold the VIPs by now: leave the election one dead interval to
            # hear it (and release) before renewing, which would re-add a VIP that is
            # gone. The lease has that long left (it did not lapse, and it outlives the
            # dead interval by the config's own rule); a refresh waits as well.
            wait = self.config.heartbeat.dead_interval
            if lease:
                left = self._last_renew + lifetime_seconds(lease) - LAPSE_MARGIN - now
                wait = min(wait, left / 2)
            self._quiet_until = now + wait
            return
        if now < self._quiet_until:
            return
        if lease and now >= self._last_renew + self.renew_period():
            self._last_renew = now
            added = await self.mover.acquire(lease)
            if added:
                log.warning("VIP %s was missing from %s while ACTIVE (removed by someone "
                            "else): re-added", ", ".join(map(str, added)),
                            self.config.interface)
                self.metrics.vip_corrections.labels("readded").inc(len(added))
        refresh = self.config.announce.refresh
        if refresh and now >= self._last_announce + refresh:
            self._last_announce = now
            self._start_announcer()

    async def _lost(self, detail: str) -> None:
        """The VIPs may be gone and another node may hold them: stop renewing (a renewal
        would add them back) and let the election re-validate with the peer."""
        self._holding = False
        if self._announcer is not None:
            self._announcer.cancel()
        log.warning("VIPs may be lost (%s): not re-adding them before the election has "
                    "heard the peer", detail)
        self.metrics.vip_corrections.labels("lapsed").inc()
        self._handle(el.VipsLost(detail))

    # --- hooks ---------------------------------------------------------------------------

    async def _run_hook(self, hook: el.RunHook) -> None:
        argv = self.config.hooks.argv(hook.hook)
        if not argv:
            return
        env = {**os.environ, "VIPD_STATE": hook.state.name, "VIPD_TERM": str(hook.term),
               "VIPD_NODE": self.config.node, "VIPD_CLUSTER": self.config.cluster,
               "VIPD_VIPS": " ".join(map(str, self.config.vips))}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True, preexec_fn=self.exec_user.preexec())
        except OSError as exc:
            log.error("hook %s %s could not start: %s", hook.hook, argv[0], exc)
            self.metrics.hooks.labels(hook.hook, "not_started").inc()
            return
        try:
            code = await asyncio.wait_for(proc.wait(), self.config.hooks.timeout)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            log.error("hook %s %s killed: vipd is exiting", hook.hook, argv[0])
            self.metrics.hooks.labels(hook.hook, "killed").inc()
            raise
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            log.error("hook %s %s killed after %.1fs", hook.hook, argv[0],
                      self.config.hooks.timeout)
            self.metrics.hooks.labels(hook.hook, "timeout").inc()
            return
        self.metrics.hooks.labels(hook.hook, "ok" if code == 0 else "failed").inc()
        level = logging.INFO if code == 0 else logging.ERROR
        log.log(level, "hook %s %s exited %d", hook.hook, argv[0], code)
