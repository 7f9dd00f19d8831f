"""Fakes of vipd's I/O edges for the tests (tests/unit/test_vip_fake.py holds FakeMover
to the `vipd.movers.base.VipMover` Protocol)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vipd.errors import VipError
from vipd.movers.base import VipInterface

_METHODS = ("acquire", "release", "held", "announce")


class FakeMover:
    """A `vipd.movers.base.VipMover` that keeps its "kernel" addresses in a set.

    ``addresses`` is what the kernel would have; tests may edit it to simulate someone
    removing an address, or call `expire()` for a lapsed lease. ``calls`` records every
    call in order as ``(method, *args)``, including calls that were told to fail.
    """

    def __init__(self, vips: Iterable[VipInterface] = (), *, ifname: str = "fake0") -> None:
        self.ifname = ifname
        self.vips: tuple[VipInterface, ...] = tuple(dict.fromkeys(vips))
        self.addresses: set[VipInterface] = set()
        self.calls: list[tuple[Any, ...]] = []
        self.lease: float | None = None
        self.announcements = 0
        self._failures: dict[str, tuple[VipError, int | None]] = {}

    def fail(self, method: str, error: VipError | None = None, *,
             times: int | None = None) -> None:
        """Make ``method`` raise ``error`` on its next ``times`` calls (None: until healed)."""
        if method not in _METHODS:
            raise ValueError(f"FakeMover has no method {method!r}; expected one of "
                             f"{', '.join(_METHODS)}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times}")
        if error is None:
            error = VipError(f"injected failure of {method} on interface {self.ifname}")
        self._failures[method] = (error, times)

    def heal(self, method: str | None = None) -> None:
        """Stop injecting failures into ``method`` (None: into every method)."""
        if method is None:
            self._failures.clear()
        else:
            self._failures.pop(method, None)

    def expire(self) -> None:
        """The kernel dropped the VIPs, as when a lease runs out."""
        self.addresses.difference_update(self.vips)

    def call_names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        failure = self._failures.get(method)
        if failure is None:
            return
        error, times = failure
        if times is not None:
            if times <= 1:
                del self._failures[method]
            else:
                self._failures[method] = (error, times - 1)
        raise error

    async def acquire(self, lease: float) -> set[VipInterface]:
        self._enter("acquire", lease)
        if lease < 0:
            raise ValueError(f"VIP lease must be >= 0, got {lease!r}")
        added = set(self.vips) - self.addresses
        self.addresses.update(self.vips)
        self.lease = lease
        return added

    async def release(self) -> None:
        self._enter("release")
        self.addresses.difference_update(self.vips)

    async def held(self) -> set[VipInterface]:
        self._enter("held")
        return self.addresses & set(self.vips)

    async def announce(self) -> None:
        self._enter("announce")
        self.announcements += 1
