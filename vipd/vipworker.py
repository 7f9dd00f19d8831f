"""The VIP worker: the one task that changes where the VIPs are, and keeps them there.

It owns the mover. The driver hands it the election's decisions (acquire, release,
announce) and it carries them out strictly in order, one at a time, so a renewal can
never race a release nor the stray-VIP cleanup a takeover. While nothing is queued it
keeps up what it applied (`_upkeep`): a holder renews the kernel lease and re-announces
every `announce.refresh`; a standby removes VIPs it finds on its interface. Whatever it
finds different from what should be is logged and counted (`vipd_vip_corrections_total`).
What it cannot decide alone goes back to the election as an event: a failed operation
(VipFailed), or a lease that lapsed while the process stalled (VipsLost), when the peer
may hold the VIPs by now and re-adding them could make two holders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from vipd.config import Config
from vipd.core import election as el
from vipd.errors import VipError
from vipd.fence import KernelFence
from vipd.metrics import Metrics
from vipd.movers.base import VipMover, announce_burst, lifetime_seconds
from vipd.movers.remote import RemoteMoverRunner

log = logging.getLogger(__name__)

# How often a standby checks that none of its VIPs is on the interface: without address
# events (a mover that gives none), and with them, as a safety net only (each check opens
# a netlink socket: through pyroute2 it costs memory, simulations/README.md "Soak").
RECONCILE_EVERY = 2.0
RECONCILE_WATCHED = 60.0
# The kernel removes an address up to about 0.4 s before its lifetime runs out (measured:
# 2.6-2.9 s for 3 s), so a renewal this close to the lifetime may come too late.
LAPSE_MARGIN = 0.5
MIN_GATE = 0.002  # a gate opened for less than this is not worth a renewal


class VipWorker:
    def __init__(self, config: Config, mover: VipMover, metrics: Metrics,
                 report: Callable[[el.Event], object],
                 fence: KernelFence | None = None) -> None:
        self.config = config  # replaced on reload (lease, announce)
        self.mover = mover
        self.fence = fence  # the kernel gate, renewed while holding (config `fence`)
        # Until when the gate may stay open (the election's votes; None: no bound but
        # the gate's own timeout). Called with time.monotonic(), the loop's clock.
        self.gate_limit: Callable[[float], float | None] = lambda now: None
        self._metrics = metrics
        self._report = report  # events for the election (through the driver)
        # An acquire or a release and when it was decided; (None, 0.0): check now (`recheck`).
        self._queue: asyncio.Queue[tuple[el.AcquireVips | el.ReleaseVips | None, float]] = (
            asyncio.Queue())
        self._recheck = False  # a VIP left the interface: renew (re-add) at the next upkeep
        self.reconcile_every = RECONCILE_EVERY  # RECONCILE_WATCHED with address events
        self._holding = False  # what was last applied: acquired, or released
        now = time.monotonic()
        self._last_renew = self._last_announce = self._last_reconcile = now
        self._last_gate = now
        self._gate_until = float("-inf")  # when the gate shuts unless renewed
        self._gate_due = float("inf")  # the next gate renewal (or check)
        self._quiet_until = 0.0  # after a stall, the upkeep waits for the election
        self._announcer: asyncio.Task[None] | None = None
        # Remote movers (config `movers` after netlink): told what should be, they carry
        # it out in their own tasks, never on the path of a takeover.
        self.remotes: list[RemoteMoverRunner] = []

    # --- what the driver asks for --------------------------------------------------------

    def apply(self, op: el.AcquireVips | el.ReleaseVips, decided_at: float) -> None:
        """Queue an acquire or release (``decided_at``: the loop time of the decision)."""
        self._queue.put_nowait((op, decided_at))

    def address_changed(self, vip: str, present: bool) -> None:
        """The kernel says ``vip`` was added to the interface or left it (a netlink
        event): a holder puts a removed one back now instead of at its next renewal; a
        standby removes one that appeared now instead of at its next check."""
        if self._holding:
            if not present and not self._recheck:
                self._recheck = True
                self._queue.put_nowait((None, 0.0))
        elif present:
            self._last_reconcile = float("-inf")
            self._queue.put_nowait((None, 0.0))

    def announce(self, reason: str) -> None:
        log.info("re-announcing VIPs: %s", reason)
        self._start_announcer()

    def renew_period(self) -> float:
        """How often the holder renews the VIP lease.

        The kernel counts lifetimes in whole seconds, so renewing every 40 ms buys
        nothing over a few times a second; and a hung daemon's VIPs vanish at most one
        lease after its last renewal, so renewing less often never keeps them longer.
        Three chances per lease, at most every second, never more often than heartbeats.
        """
        return max(self.config.interval, min(self.config.vip_lease / 3, 1.0))

    # --- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply queued operations in order; between them, keep up. A failure becomes
        a VipFailed event (FAULT, retried)."""
        try:
            while True:
                item: tuple[el.AcquireVips | el.ReleaseVips | None, float] | None = None
                now = time.monotonic()
                delay = self._upkeep_delay(now)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        item = await self._queue.get()
                try:
                    if item is None:
                        assert delay is not None  # only a timeout leaves item unset
                        woke = time.monotonic()
                        # Loop lag seen by a timer that runs on every node, also on one
                        # that answers heartbeats and so seldom fires its election timer.
                        late = max(woke - (now + delay), 0.0)
                        self._metrics.hot.lateness.observe(late)
                        await self._upkeep(woke, late)
                    elif item[0] is None:  # recheck: not late, whatever the timer says
                        await self._upkeep(time.monotonic(), 0.0)
                    elif isinstance(item[0], el.AcquireVips):
                        await self._acquire(item[1])
                        for remote in self.remotes:
                            remote.hold(item[0].term)
                    else:
                        await self._release()
                except VipError as exc:
                    log.error("%s", exc)
                    self._metrics.vip_errors.inc()
                    self._report(el.VipFailed(str(exc)))
        finally:
            if self._announcer is not None:
                self._announcer.cancel()

    def gate_timeout(self) -> float:
        """How long the kernel gate stays open unless renewed: one dead interval, the
        time the peer needs to take over, so a frozen or dead holder is cut off by then.
        With an arbiter, never past the votes held (`gate_limit`)."""
        return self.config.dead_interval

    def gate(self, now: float) -> str:
        """The kernel gate as an observer sees it: none, open or shut."""
        if self.fence is None:
            return "none"
        return "open" if self._holding and now < self._gate_until else "shut"

    def gate_open_until(self) -> float:
        return self._gate_until

    def _renew_gate(self, now: float) -> None:
        """Open (or keep open) the gate for one more timeout, bounded by the votes."""
        if self.fence is None:
            return
        timeout = self.gate_timeout()
        limit = self.gate_limit(now)
        self._gate_due = now + timeout / 4
        if limit is not None:
            timeout = min(timeout, limit - now)
            if timeout < MIN_GATE:
                return  # no votes to open it by: the election steps down (or renews them)
        self.fence.open(timeout)
        self._last_gate, self._gate_until = now, now + timeout
        self._gate_due = min(self._gate_due, self._gate_until)

    def close_gate(self, reason: str) -> None:
        """Shut the gate at once (before the heartbeat that gives our vote away)."""
        self._holding = False  # nothing to keep up: the release follows
        self._drop_remotes()
        if self._announcer is not None:
            self._announcer.cancel()
        if self.fence is not None:
            self.fence.close()
            self._gate_until = float("-inf")
            log.info("kernel gate shut: %s", reason)

    async def _acquire(self, decided_at: float) -> None:
        started = time.monotonic()
        self._renew_gate(started)  # open before the addresses and the announcement
        await self.mover.acquire(self.config.vip_lease)
        self._holding = True
        self._last_renew = self._last_announce = time.monotonic()
        self._quiet_until = 0.0
        self._metrics.acquisition.observe(asyncio.get_running_loop().time() - decided_at)
        log.info("VIPs added on %s in %.1f ms: %s", self.config.interface,
                 1000 * (self._last_renew - started), ", ".join(map(str, self.config.vips)))
        self._start_announcer()  # a takeover's burst

    def _drop_remotes(self) -> None:
        for remote in self.remotes:
            remote.drop()

    async def _release(self) -> None:
        if self._announcer is not None:  # never announce what is released
            self._announcer.cancel()
        self._holding = False
        self._drop_remotes()
        if self.fence is not None:
            self.fence.close()  # silent at once; the addresses follow
            self._gate_until = float("-inf")
        await self.mover.release()
        log.info("VIPs removed from %s", self.config.interface)

    def _start_announcer(self) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
        ann = self.config.announce
        self._announcer = asyncio.create_task(self._announce(ann.count, ann.interval),
                                              name="announce")
        self._announcer.add_done_callback(_crash_is_fatal)

    async def _announce(self, count: int, interval: float) -> None:
        try:
            late_limit = el.STALL_INTERVALS * self.config.interval
            sent = await announce_burst(self.mover, count, interval, late_limit)
            self._metrics.announcements.inc(sent)
        except VipError as exc:
            self._metrics.vip_errors.inc()
            log.error("announcing VIPs failed: %s", exc)

    # --- upkeep --------------------------------------------------------------------------

    def _upkeep_delay(self, now: float) -> float | None:
        """Seconds until `_upkeep` is due (None: nothing to keep up). A holder renews and
        re-announces; a standby looks for stray VIPs every `reconcile_every` (at once on
        an address event), so it does not wake every heartbeat."""
        if self._holding:
            due = []
            if self.config.vip_lease:
                due.append(self._last_renew + self.renew_period())
            if self.config.announce.refresh:
                due.append(self._last_announce + self.config.announce.refresh)
            if self.fence is not None:
                due.append(self._gate_due)
            if not due:
                return None
        else:
            due = [self._last_reconcile + self.reconcile_every]
        return max(max(min(due), self._quiet_until) - now, 0.0)

    async def _upkeep(self, now: float, late: float) -> None:
        """While holding: renew the lease, re-announce every `refresh`. While not: a
        standby that finds its VIPs on the interface removes them. ``late``: how late
        this wake-up is; a stall means another node may have taken over meanwhile."""
        stalled = late > el.STALL_INTERVALS * self.config.interval
        if not self._holding:
            self._recheck = False
            if now >= self._last_reconcile + self.reconcile_every:
                self._last_reconcile = now
                if await self.mover.held():
                    log.warning("found VIPs on %s while not active: removing them",
                                self.config.interface)
                    self._metrics.vip_corrections.labels("removed").inc()
                    await self.mover.release()
            return
        lease = self.config.vip_lease
        if self.fence is not None and now >= self._gate_until:
            if self.gate_limit(now) is not None:
                # With an arbiter the votes say whether the gate may open again: while
                # they are held no other node can hold the VIPs. Without them the
                # election steps down (or renews them first).
                self._renew_gate(now)
                if now >= self._gate_until:
                    self._gate_due = now + self.config.interval
                    return
            else:
                self._lost(f"kernel gate shut: last renewal "
                           f"{1000 * (now - self._last_gate):.0f} ms ago, open for "
                           f"{1000 * (self._gate_until - self._last_gate):.0f} ms")
                return
        if lease and now - self._last_renew >= lifetime_seconds(lease) - LAPSE_MARGIN:
            self._lost(f"lease lapsed: last renewal {1000 * (now - self._last_renew):.0f} ms "
                       f"ago, lease {lease:g} s")
            return
        if stalled:
            # The peer may hold the VIPs by now: leave the election one dead interval to
            # hear it (and release) before renewing, which would re-add a VIP that is
            # gone. The lease has that long left (it did not lapse, and it outlives the
            # dead interval by the config's own rule); a refresh waits as well.
            wait = self.config.dead_interval
            if lease:
                left = self._last_renew + lifetime_seconds(lease) - LAPSE_MARGIN - now
                wait = min(wait, left / 2)
            if self.fence is not None:  # renew the gate before it shuts, too
                wait = min(wait, (self._gate_until - now) / 2)
            self._quiet_until = now + wait
            return
        if now < self._quiet_until:
            return
        if self.fence is not None and now >= self._gate_due:
            self._renew_gate(now)
        if (lease and now >= self._last_renew + self.renew_period()) or self._recheck:
            self._last_renew, self._recheck = now, False
            added = await self.mover.acquire(lease)
            if added:
                log.warning("VIP %s was missing from %s while ACTIVE (removed by someone "
                            "else): re-added", ", ".join(map(str, added)),
                            self.config.interface)
                self._metrics.vip_corrections.labels("readded").inc(len(added))
        refresh = self.config.announce.refresh
        if refresh and now >= self._last_announce + refresh:
            self._last_announce = now
            self._start_announcer()

    def _lost(self, detail: str) -> None:
        """The VIPs may be gone and another node may hold them: stop renewing (a renewal
        would add them back) and let the election re-validate with the peer."""
        self._holding = False
        self._drop_remotes()
        if self._announcer is not None:
            self._announcer.cancel()
        log.warning("VIPs may be lost (%s): not re-adding them before the election has "
                    "heard the peer", detail)
        self._metrics.vip_corrections.labels("lapsed").inc()
        self._report(el.VipsLost(detail))


def _crash_is_fatal(task: asyncio.Task[None]) -> None:
    """An announcer that dies of anything but VipError is a bug: hand it to the loop's
    exception handler, which ends the daemon (after releasing the VIPs)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        task.get_loop().call_exception_handler(
            {"message": f"task {task.get_name()} crashed", "exception": exc, "task": task})
