"""The health checks' life in the runtime: one monitor built from the config (plus the
link check of `track_interface`), run as one long-lived task, rebuilt when a reload
changes the checks; every verdict goes to the election as HealthChanged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vipd.config import Check, Config, LinkCheck
from vipd.core import election as el
from vipd.health import CheckStatus, HealthMonitor, ProbeResult
from vipd.metrics import Metrics

log = logging.getLogger(__name__)


class CheckRunner:
    def __init__(self, config: Config, metrics: Metrics,
                 report: Callable[[el.Event], object]) -> None:
        self.config = config
        self._metrics = metrics
        self._report = report
        self.preexec: Callable[[], None] | None = None  # set at start (privileges)
        self._monitor: HealthMonitor | None = None
        self._changed = asyncio.Event()

    def status(self) -> list[CheckStatus]:
        return self._monitor.status() if self._monitor is not None else []

    def reload(self, config: Config) -> None:
        """New checks start unknown; the election holds its last verdict until they report."""
        self.config = config
        self._changed.set()

    async def run(self) -> None:
        while True:
            self._monitor = self._build()
            monitor = asyncio.create_task(self._monitor.run(), name="health monitor")
            changed = asyncio.create_task(self._changed.wait(), name="health reload")
            try:
                await asyncio.wait({monitor, changed}, return_when=asyncio.FIRST_COMPLETED)
                if monitor.done():
                    monitor.result()  # a crash ends the daemon (its TaskGroup)
            finally:
                for task in (monitor, changed):
                    task.cancel()
                await asyncio.wait({monitor, changed})
            self._changed.clear()
            await self._monitor.close()
            log.info("health checks reloaded: %s",
                     ", ".join(c.name for c in self.config.health) or "none")

    async def close(self) -> None:
        if self._monitor is not None:
            await self._monitor.close()

    def _build(self) -> HealthMonitor:
        checks: list[Check] = list(self.config.health)
        if self.config.track_interface:
            checks.append(LinkCheck(interface=self.config.interface))
        return HealthMonitor(checks, self._on_verdict, on_probe=self._on_probe,
                             exec_preexec=self.preexec)

    def _on_verdict(self, healthy: bool, check: str, result: ProbeResult) -> None:
        detail = f"{check}: {result.detail}" if check else result.detail
        self._report(el.HealthChanged(healthy, detail))

    def _on_probe(self, check: str, result: ProbeResult) -> None:
        self._metrics.check_duration.labels(check).observe(result.duration)
