"""The group driver (arbiter etcd): feeds vipd.core.group and carries out its actions.

The same shape as the pair's Driver: an event (etcd's answer, the watch, the timer, a
command, a probe) goes to the pure `GroupElection` at the loop's time; its actions go to
the part that carries each out. etcd calls run as tasks, each with the store's timeout;
their answers come back as events stamped with the loop time the call was *sent*
(the lease is counted from then). At most one member record put is in flight and the
newest record goes next, so puts never overtake each other. The watch runs in its own
task and is restarted after every error, which becomes a `StoreFailed` event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from hashlib import sha256
from typing import Any

from vipd import __version__, flaps
from vipd.arbiter.etcd import EtcdError, EtcdStore
from vipd.config import Config
from vipd.core import election as el
from vipd.core import group as g
from vipd.core.protocol import State
from vipd.deadline import DeadlineTimer
from vipd.hooks import HookRunner
from vipd.metrics import Metrics
from vipd.statefile import StateFile
from vipd.systemd import Notifier
from vipd.vipworker import VipWorker

log = logging.getLogger(__name__)

WATCH_RETRY = 0.1  # after a broken watch (the store has moved on to the next member)
SELF_FENCES = {el.Why.LEASE_EXPIRED: "lease_expired", el.Why.KEY_LOST: "key_lost"}


def group_config(cfg: Config) -> g.GroupConfig:
    assert cfg.etcd is not None
    return g.GroupConfig(node=cfg.node, priority=cfg.priority, preempt=cfg.preempt,
                         preempt_delay=cfg.preempt_delay, ttl=cfg.etcd.ttl,
                         digest=group_digest(cfg), version=__version__,
                         damping=cfg.damping.rule())


def group_digest(cfg: Config) -> str:
    """What every member of a group must agree on (reported when they do not): the VIPs,
    the etcd prefix and TTL."""
    assert cfg.etcd is not None
    text = "|".join([cfg.cluster, ",".join(sorted(str(v) for v in cfg.vips)),
                     cfg.etcd.prefix, f"{cfg.etcd.ttl:g}"])
    return sha256(text.encode()).hexdigest()[:16]


class GroupDriver:
    def __init__(self, config: Config, election: g.GroupElection, store: EtcdStore,
                 worker: VipWorker, hooks: HookRunner, state_file: StateFile,
                 notifier: Notifier, metrics: Metrics,
                 on_finished: Callable[[], None], crashed: bool = False) -> None:
        self.config = config
        self.election = election
        self.store = store
        self.worker = worker
        self.hooks = hooks
        self.state_file = state_file
        self.notifier = notifier
        self.metrics = metrics
        self._on_finished = on_finished
        self.crashed = crashed  # the previous run ended without a clean stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer = DeadlineTimer(self._on_timer, metrics.hot.lateness.observe)
        self._calls: set[asyncio.Task[None]] = set()
        self._next_record: g.Member | None = None  # the newest record not yet sent
        self._publishing = False
        self._store_state = election.store
        self._ttl_warned = False
        self._ready_sent = False
        self._resync = asyncio.Event()  # the watch starts over from a fresh read
        self._gone_logged = 0  # the revision of the last key a resign found gone
        self._last_resign: asyncio.Task[None] | None = None
        self._mismatched: set[str] = set()  # members whose settings digest differs
        self.granted_ttl: float | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def attach(self) -> None:
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.handle(el.Start(crashed=self.crashed))
        self.state_file.save(running=True)  # until a clean stop says otherwise

    def stop(self) -> None:
        self._timer.cancel()

    async def close(self, budget: float) -> None:
        """Let the calls in flight (a resign, the revoke of a clean stop) finish within
        ``budget`` seconds, then close the connection."""
        pending = [t for t in self._calls if not t.done()]
        if pending and budget > 0:
            await asyncio.wait(pending, timeout=budget)
        for task in self._calls:
            task.cancel()
        try:
            await asyncio.wait_for(self.store.close(), 0.2)
        except (TimeoutError, EtcdError) as exc:
            log.warning("closing the etcd connection: %s", exc or "timed out")

    def loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def tasks(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        return [(self._watch(), "etcd watch")]

    # --- events in -----------------------------------------------------------------------

    def handle(self, event: Any) -> list[Any]:
        """One step of the election at the loop's time; its actions carried out in order."""
        assert self._loop is not None
        now = self._loop.time()
        actions = self.election.handle(event, now)
        for action in actions:
            self._apply(action, now)
        self._watch_store_state()
        self._rearm()
        if self.election.finished:
            self.state_file.save(running=False)
            self._on_finished()
        elif not self._ready_sent and self.ready(now):
            self._ready_sent = True
            self.notifier.notify(READY=1, STATUS=self.status_line())
        return actions

    def reconfigure(self, config: Config) -> None:
        self.config = self.worker.config = self.hooks.config = config
        self.handle(g.Reconfigured(group_config(config)))

    def ready(self, now: float) -> bool:
        e = self.election
        return e.watching and e.state is not State.INIT

    def gate_limit(self, now: float) -> float | None:
        return self.election.gate_limit(now)

    def _watch_store_state(self) -> None:
        """One log line per change of how we stand with etcd (not per failed call)."""
        e = self.election
        if e.store is self._store_state:
            return
        old, self._store_state = self._store_state, e.store
        line = "etcd: %s -> %s (%s)"
        if e.store is g.Store.OK:
            log.info(line, old.value, e.store.value, e.store_detail)
            if old is not g.Store.CONNECTING:
                self._resync.set()  # what happened meanwhile: read the group again
        else:
            log.warning(line, old.value, e.store.value, e.store_detail)

    # --- the timer -----------------------------------------------------------------------

    def _rearm(self) -> None:
        self._timer.arm(self.election.next_deadline())

    def _on_timer(self, deadline: float) -> None:
        self.handle(el.Tick())

    def timer_works(self, stale: float) -> bool:
        return self._timer.works(stale)

    # --- actions out ---------------------------------------------------------------------

    def _apply(self, action: Any, now: float) -> None:
        match action:
            case g.GrantLease(ttl=ttl):
                self._call("grant", self._grant(ttl, now))
            case g.KeepAlive(lease=lease):
                self._call("keep-alive", self._keep_alive(lease, now))
            case g.Publish(member=member):
                self._next_record = member
                if not self._publishing:
                    self._publishing = True
                    self._call("publish", self._publish())
            case g.Claim(lease=lease):
                self._call("claim", self._claim(lease))
            case g.Resign(revision=revision, successor=successor):
                self._last_resign = self._call("resign", self._resign(revision, successor))
            case g.Revoke(lease=lease):
                self._call("revoke", self._revoke(lease, self._last_resign))
            case el.Transition(old=old, new=new, why=why, reason=reason, term=term):
                log.info("%s -> %s (%s), term %d", old.name, new.name, reason, term)
                self.notifier.notify(STATUS=f"{new.name} term {term} ({reason})")
                self.metrics.transitions.labels(old.name, new.name, why.value).inc()
                if why in SELF_FENCES:
                    self.metrics.self_fence.labels(SELF_FENCES[why]).inc()
                self.state_file.save(term=term, maintenance=self.election.maintenance)
            case el.AcquireVips() | el.ReleaseVips():
                self.worker.apply(action, now)
            case el.RunHook():
                self.hooks.start(action)
            case el.CommandResult(kind=kind, accepted=ok, message=message):
                log.info("command %s %s: %s", kind, "accepted" if ok else "refused", message)
                self.state_file.save(term=self.election.term,
                                     maintenance=self.election.maintenance)
            case el.CloseGate(reason=reason):
                self.worker.close_gate(reason)  # at once: the resign that follows frees the key
            case el.DampingChanged():
                flaps.report(action, self.election.damper, now, self.state_file, self.metrics)

    def _call(self, what: str, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"etcd {what}")
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        task.add_done_callback(_crash_is_fatal)
        return task

    def _failed(self, what: str, exc: EtcdError) -> None:
        self.metrics.etcd_errors.labels(what).inc()
        self.handle(g.StoreFailed(str(exc)))

    def _took(self, what: str, sent: float) -> None:
        self.metrics.etcd_latency.labels(what).observe(self.loop_time() - sent)

    async def _grant(self, ttl: float, sent: float) -> None:
        try:
            lease, granted = await self.store.grant(ttl)
        except EtcdError as exc:
            self._failed("grant", exc)
            return
        self._took("grant", sent)
        self.granted_ttl = granted
        if granted > ttl and not self._ttl_warned:
            self._ttl_warned = True
            log.warning("etcd granted a lease TTL of %g s for the %g s asked (etcd raises a "
                        "TTL below about 1.5 x its --election-timeout): a holder crash "
                        "takes up to %g s to fail over; see docs/election.md for the etcd "
                        "settings", granted, ttl, granted)
        self.handle(g.LeaseGranted(lease, granted, sent))

    async def _keep_alive(self, lease: int, sent: float) -> None:
        try:
            ttl = await self.store.keep_alive(lease)
        except EtcdError as exc:
            self._failed("keep-alive", exc)
            return
        self._took("keep-alive", sent)
        self.handle(g.KeptAlive(sent, ttl))

    async def _publish(self) -> None:
        """Send the newest record until none is waiting; a failed put is sent again (or
        its successor is) after the failure was reported."""
        try:
            while self._next_record is not None:
                record, self._next_record = self._next_record, None
                lease = self.election.lease
                if lease is None:
                    return  # the new lease republishes
                sent = self.loop_time()
                try:
                    await self.store.publish(record, lease)
                except EtcdError as exc:
                    if self._next_record is None:
                        self._next_record = record
                    self._failed("publish", exc)
                    await asyncio.sleep(self.config.interval)
                    continue
                self._took("publish", sent)
        finally:
            self._publishing = False

    async def _claim(self, lease: int) -> None:
        sent = self.loop_time()
        try:
            won, holder = await self.store.claim(lease)
        except EtcdError as exc:
            self._failed("claim", exc)
            return
        self._took("claim", sent)
        self.handle(g.Claimed(won, holder))

    async def _resign(self, revision: int, successor: str | None) -> None:
        sent = self.loop_time()
        try:
            done = await self.store.resign(revision, successor)
        except EtcdError as exc:
            self._failed("resign", exc)
            return
        self._took("resign", sent)
        if done:
            log.info("holder key (revision %d) released%s", revision,
                     f", {successor} named successor" if successor else "")
        elif self._gone_logged != revision:  # once: the election asks until the watch
            self._gone_logged = revision  # shows the key gone
            log.info("holder key (revision %d) was already gone", revision)

    async def _revoke(self, lease: int, resign: asyncio.Task[None] | None) -> None:
        """After the resign (revoking first would delete the key before the successor
        is named)."""
        if resign is not None and not resign.done():
            await asyncio.wait([resign], timeout=self.store.timeout)
        try:
            await self.store.revoke(lease)
        except EtcdError as exc:
            log.warning("revoking our etcd lease at stop failed (it expires in %g s): %s",
                        self.election.ttl, exc)
            return
        log.info("etcd lease %x revoked: our member record is gone", lease)

    async def _watch(self) -> None:
        """Follow the group's keys for as long as the daemon runs. After etcd was
        unreachable the watch starts over from a fresh read (`_resync`): a watch on a
        connection that went quiet may never end by itself, and a view older than etcd
        would keep every node waiting for a holder that is gone."""
        while True:
            self._resync.clear()
            follow = asyncio.ensure_future(self.store.watch(self._observed))
            resync = asyncio.ensure_future(self._resync.wait())
            try:
                await asyncio.wait([follow, resync], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (follow, resync):
                    task.cancel()
                await asyncio.gather(follow, resync, return_exceptions=True)
            if not follow.cancelled() and (exc := follow.exception()) is not None:
                if not isinstance(exc, EtcdError):
                    raise exc
                self._failed("watch", exc)
            await asyncio.sleep(WATCH_RETRY)

    def _observed(self, view: g.Observed) -> None:
        self.handle(view)
        self._report_mismatches(view)

    def _report_mismatches(self, view: g.Observed) -> None:
        """Once per member whose settings differ from ours, and once when they agree
        again (status and metrics show it all the time)."""
        ours = self.election.cfg.digest
        differ = {n for n, m in view.members.items() if m.digest != ours}
        for node in sorted(differ - self._mismatched):
            log.warning("member %s publishes other group settings (digest %s, ours %s: "
                        "VIPs, etcd prefix or TTL differ); give every member the same",
                        node, view.members[node].digest, ours)
        for node in sorted((self._mismatched - differ) & set(view.members)):
            log.info("member %s's group settings agree with ours again", node)
        self._mismatched = differ

    # --- what observers read -------------------------------------------------------------

    def status_line(self) -> str:
        e = self.election
        holder = e.view.holder.node if e.view.holder is not None else "nobody"
        return (f"{e.state.name} term {e.term}, holder {holder}, "
                f"{len(e.view.members)} members, etcd {e.store.value}")


def _crash_is_fatal(task: asyncio.Task[None]) -> None:
    """A call task that dies of anything but EtcdError is a bug: the daemon ends."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        task.get_loop().call_exception_handler(
            {"message": f"task {task.get_name()} crashed", "exception": exc, "task": task})
