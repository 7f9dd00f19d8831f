"""The one timer a driver keeps: armed for the core's next deadline, re-armed after every
step (aioquic's get_timer / handle_timer shape). Shared by the pair's driver and the
group's; the watchdog asks it whether it still works."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class DeadlineTimer:
    def __init__(self, on_fire: Callable[[float], None],
                 lateness: Callable[[float], None]) -> None:
        self._on_fire = on_fire  # called with the deadline it was armed for
        self._lateness = lateness  # how late it fired, in seconds (a metric)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._last_fire = time.monotonic()

    def arm(self, deadline: float | None) -> None:
        """Fire at ``deadline`` (loop time; None: not at all). An armed timer for the
        same deadline is kept (usual after a heartbeat or a keep-alive answer)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._handle is not None:
            if deadline is not None and self._handle.when() == deadline:
                return
            self._handle.cancel()
            self._handle = None
        if deadline is not None:
            self._handle = self._loop.call_at(deadline, self._fire, deadline)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self, deadline: float) -> None:
        assert self._loop is not None
        self._handle = None
        self._last_fire = time.monotonic()
        self._lateness(max(self._loop.time() - deadline, 0.0))
        self._on_fire(deadline)

    def works(self, stale: float) -> bool:
        """The timer fired lately, or is armed for a deadline not long past. A node that
        answers its peer's heartbeats sends them without its timer ever firing (the
        timer is only its fallback), so "fired lately" alone would call it wedged."""
        now = time.monotonic()
        if now - self._last_fire <= stale:
            return True
        return self._handle is not None and self._handle.when() >= now - stale
