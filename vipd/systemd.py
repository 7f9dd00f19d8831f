"""systemd integration with the standard library: sd_notify and the watchdog.

The protocol is one datagram of newline-separated KEY=VALUE lines to the AF_UNIX socket
named by $NOTIFY_SOCKET (a leading "@" means the abstract namespace). Without that
variable (not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        self._failed = False
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        self.watchdog: float | None = None
        if usec and usec.isdigit() and int(usec) > 0 and (
                pid is None or (pid.isdigit() and int(pid) == os.getpid())):
            self.watchdog = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. notify(READY=1, STATUS="ACTIVE term 3"). False when not possible."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:  # say it once; systemd will act on the missing pings
                log.error("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)
                self._failed = True
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog(notifier: Notifier, period: float, alive: Callable[[], bool]) -> None:
    """WATCHDOG=1 at half the period, but only while ``alive()`` (the election timer
    works): a wedged runtime stops the pings and systemd restarts it."""
    while True:
        if alive():
            notifier.notify(WATCHDOG=1)
        await asyncio.sleep(period / 2)
