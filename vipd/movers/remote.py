"""Remote movers: where a provider's API, not the local kernel, decides who owns a VIP
(a cloud's secondary IP or route, an IPAM, anything behind a webhook).

A remote mover is slow and can fail, so it never sits on the path of a takeover: the VIP
worker adds the addresses and opens the gate itself, and tells the `RemoteMoverRunner`
what should be (`hold(term)`, `drop()`). The runner carries that out in its own task:
acquire with the term (the fencing token) and retries with backoff and jitter, then
verify by reading back who the provider says holds, and keep verifying every
`reconcile` seconds while holding. When verification disagrees it re-asserts, but only
while this node may hold (`may_call`: the election's votes or etcd lease, when there is
an arbiter), and never against a holder with a higher term: that one is newer, and this
node yields (`on_superseded`, which the runtime turns into an election event).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from vipd.errors import VipError

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST = 0.1  # s before the first retry; doubles, with jitter, up to BACKOFF_MAX
BACKOFF_MAX = 2.0


class MoverError(VipError):
    """A remote call failed; ``operation`` and ``code`` label the metric (timeout,
    http_503, an AWS error code, ...); ``retry``: worth trying again; ``superseded``: the
    provider refused because a newer term holds (this node yields)."""

    def __init__(self, message: str, *, operation: str, code: str, retry: bool,
                 superseded: bool = False) -> None:
        super().__init__(message)
        self.operation, self.code, self.retry = operation, code, retry
        self.superseded = superseded


@dataclass(frozen=True, slots=True)
class Ownership:
    """Who the provider says holds the VIPs: ``node`` (None: nobody, or not ours to
    name) with the ``term`` it claimed them under (None: not recorded)."""

    node: str | None
    term: int | None
    detail: str = ""


class RemoteMover(Protocol):
    name: str  # "aws", "webhook": the label in status, metrics and logs

    async def acquire(self, term: int) -> None:
        """Make this node the owner under ``term``; idempotent (same term: no change)."""
        ...

    async def release(self, term: int) -> None:
        """Say this node gives the VIPs up (a no-op where the next owner simply takes)."""
        ...

    async def verify(self) -> Ownership:
        ...

    async def close(self) -> None:
        ...


class MoverState(enum.StrEnum):
    """What `vipctl status` and `vipd_mover_state` say of one remote mover."""

    IDLE = "idle"  # not holding, nothing to do
    ACQUIRING = "acquiring"  # asked, no answer yet (or retrying)
    VERIFIED = "verified"  # the provider says this node holds, under our term
    MISMATCH = "mismatch"  # the provider says otherwise; re-asserting
    SUPERSEDED = "superseded"  # another node holds with a higher term: we yield
    WAITING = "waiting"  # should hold, but may not call now (no votes / lease)
    ERROR = "error"  # the last call failed; retrying


@dataclass(frozen=True, slots=True)
class MoverStatus:
    name: str
    state: str
    holder: str | None  # as last verified
    term: int | None  # as last verified
    verified_seconds_ago: float | None
    last_error: str | None


class RemoteMoverRunner:
    """One remote mover's task; `hold`, `drop` and `status` are called from the loop."""

    def __init__(self, mover: RemoteMover, node: str, *, reconcile: float, timeout: float,
                 may_call: Callable[[], bool], on_superseded: Callable[[str], None],
                 observe: Callable[[str, str, float, str | None], None],
                 on_verified: Callable[[float], None],
                 on_correction: Callable[[], None]) -> None:
        self.mover, self.node = mover, node
        self.reconcile, self.timeout = reconcile, timeout
        self._may_call, self._on_superseded = may_call, on_superseded
        self._observe, self._on_verified, self._on_correction = observe, on_verified, on_correction
        self._term: int | None = None  # holding under this term; None: not holding
        self._asked_at = 0.0  # loop time of the last hold()
        self._acquired: int | None = None  # the term the provider has confirmed
        self._released = True
        self._wake = asyncio.Event()
        self.state = MoverState.IDLE
        self._seen: Ownership | None = None
        self._verified_at: float | None = None
        self._error: str | None = None

    # --- what the VIP worker says ----------------------------------------------------------

    def hold(self, term: int) -> None:
        if self._term != term:
            self._term, self._asked_at, self._acquired = term, time.monotonic(), None
            self._released = False
            self._set(MoverState.ACQUIRING)
        self._wake.set()

    def drop(self) -> None:
        if self._term is not None:
            self._term = None
            self._set(MoverState.IDLE)
            self._wake.set()

    def status(self, now: float) -> MoverStatus:
        seen = self._seen
        return MoverStatus(self.mover.name, self.state.value,
                           None if seen is None else seen.node,
                           None if seen is None else seen.term,
                           None if self._verified_at is None else round(now - self._verified_at, 3),
                           self._error)

    # --- the task --------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            self._wake.clear()  # a hold or drop from here on wakes the wait below
            try:
                wait = await self._step()
                backoff = BACKOFF_FIRST
            except MoverError as exc:
                self._error = str(exc)
                if exc.superseded and self._term is not None:
                    self._set(MoverState.SUPERSEDED, str(exc))
                    self._on_superseded(f"{self.mover.name}: {exc}: yielding")
                else:
                    self._set(MoverState.ERROR, str(exc))
                wait = backoff * random.uniform(0.5, 1.5) if exc.retry else self.reconcile
                backoff = min(backoff * 2, BACKOFF_MAX)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _step(self) -> float:
        """One round; returns how long to wait (a `hold`/`drop` wakes it earlier)."""
        term = self._term
        if term is None:
            if not self._released and self._acquired is not None:
                released, self._acquired = self._acquired, None
                await self._call("release", self.mover.release(released))
                self._released = True
            return self.reconcile
        if not self._may_call():
            self._set(MoverState.WAITING)
            return min(self.reconcile, 0.1)
        if self._acquired != term:
            await self._call("acquire", self.mover.acquire(term))
            self._acquired = term
        seen = await self._call("verify", self.mover.verify())
        self._seen = seen
        if self._term != term:
            return 0.0  # moved on while we asked
        if seen.node == self.node and seen.term == term:
            if self.state is not MoverState.VERIFIED:
                if self._verified_at is None or self.state is MoverState.ACQUIRING:
                    self._on_verified(time.monotonic() - self._asked_at)
                self._set(MoverState.VERIFIED)
            self._verified_at, self._error = time.monotonic(), None
            return self.reconcile
        if seen.node not in (None, self.node) and seen.term is not None and seen.term > term:
            self._set(MoverState.SUPERSEDED, f"{seen.node} holds with term {seen.term} > ours "
                                             f"{term}")
            self._on_superseded(f"{self.mover.name}: {seen.node} holds the VIPs with term "
                                f"{seen.term}, above ours ({term}): yielding")
            return self.reconcile
        # someone moved it by hand, or an older holder re-asserted: ours again
        self._set(MoverState.MISMATCH, f"provider says {seen.node or 'nobody'} (term "
                                       f"{seen.term}); re-asserting term {term}")
        self._on_correction()
        self._acquired = None
        return 0.0

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(call, self.timeout)
        except TimeoutError as exc:
            self._observe(operation, "timeout", time.monotonic() - started, "timeout")
            raise MoverError(f"{self.mover.name}: {operation}: no answer within "
                             f"{self.timeout:g} s", operation=operation, code="timeout",
                             retry=True) from exc
        except MoverError as exc:
            self._observe(operation, exc.code, time.monotonic() - started, exc.code)
            raise
        self._observe(operation, "ok", time.monotonic() - started, None)
        return result

    def _set(self, state: MoverState, detail: str = "") -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        line = "mover %s: %s -> %s%s"
        args = (self.mover.name, old.value, state.value, f" ({detail})" if detail else "")
        if state in (MoverState.ERROR, MoverState.MISMATCH, MoverState.SUPERSEDED):
            log.warning(line, *args)
        else:
            log.info(line, *args)
