"""What every VIP mover offers, and what the runtime does with any mover.

A mover is the only part of vipd that changes where the VIPs are: the local kernel's
addresses today (`vipd.movers.netlink`), a cloud provider's API later. Its operations
are idempotent, so the runtime reconciles "should hold" against `held()` instead of
trusting its own memory. The VIP worker (`vipd.vipworker`) is the one owner of the mover.
"""

from __future__ import annotations

import asyncio
import logging
import math
from ipaddress import IPv4Interface, IPv6Interface
from typing import Protocol, runtime_checkable

from vipd.errors import VipError

log = logging.getLogger(__name__)

VipInterface = IPv4Interface | IPv6Interface

INFINITY_LIFE_TIME = 0xFFFFFFFF


@runtime_checkable
class VipMover(Protocol):
    """Adds, removes, reports and announces the VIPs of one config on one interface."""

    async def acquire(self, lease: float) -> set[VipInterface]:
        """Add the VIPs, or renew their lifetime to ``lease`` seconds (0 = permanent).
        Returns the VIPs that were absent and have been added (a renewal that returns
        some found them removed by someone else)."""
        ...

    async def release(self) -> None:
        """Remove this config's VIPs; ones already absent count as removed."""
        ...

    async def held(self) -> set[VipInterface]:
        """The configured VIPs the kernel has on the interface right now."""
        ...

    async def announce(self) -> None:
        """One round of gratuitous ARP (IPv4) and unsolicited NA (IPv6)."""
        ...


async def announce_burst(mover: VipMover, count: int, interval: float,
                         late_limit: float | None = None) -> int:
    """Announce ``count`` times, ``interval`` seconds apart (no sleep after the last);
    returns how many rounds went out.

    A single announcement can be lost (a switch still learning the port, a busy
    receiver), so takeovers send a burst, like keepalived's five. A failed round does
    not stop the burst, since the next one may get through; the first error is raised
    at the end, with a note of how many rounds failed. A burst that wakes more than
    ``late_limit`` seconds late stops: the process stalled (a paused VM), another node
    may hold the VIPs by now, and the election asks for a new burst if we keep them.
    """
    if count < 0 or interval < 0:
        raise ValueError(f"announce burst needs count >= 0 and interval >= 0, "
                         f"got count={count} interval={interval}")
    loop = asyncio.get_running_loop()
    errors: list[VipError] = []
    for i in range(count):
        if i:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            if late_limit is not None and loop.time() - due > late_limit:
                log.info("announcement burst stopped after %d of %d rounds: woke %.0f ms "
                         "late", i, count, 1000 * (loop.time() - due))
                count = i
                break
        try:
            await mover.announce()
        except VipError as exc:
            errors.append(exc)
    if errors:
        first = errors[0]
        first.add_note(f"{len(errors)} of {count} announcement rounds failed")
        raise first
    return count


def lifetime_seconds(lease: float) -> int:
    """Kernel lifetime for a lease: whole seconds rounded up, 0 -> infinite."""
    if not math.isfinite(lease) or lease < 0:
        raise ValueError(f"VIP lease must be a finite number of seconds >= 0, got {lease!r}")
    if lease == 0:
        return INFINITY_LIFE_TIME
    return min(max(math.ceil(lease), 1), INFINITY_LIFE_TIME - 1)
