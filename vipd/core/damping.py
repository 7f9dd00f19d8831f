"""Flap damping: a node that failed recently does not take the VIPs back until it has
been healthy for a while. Pure: times in, verdicts out (docs/election.md, "Flap damping").

Without it, `preempt: true` turns every flap of the preferred node into two VIP moves:
a health check that flaps every 300 ms for 10 s moved the VIPs 34 times, a crash loop of
5 restarts 8-10 times (issue 15). Pacemaker's migration-threshold / failure-timeout and
keepalived's `rise` answer the same problem; here it is part of the election:

* A *failure* is the node's own health turning from healthy to failing, the daemon
  starting after an unclean exit (killed, crashed: the state file says it was running),
  or the active stalling (SIGSTOP, a paused VM, a starved loop) for longer than the dead
  interval, so that its peer took over. A clean stop and start is not one, nor a
  partition (the network failed, not the node).
* After `failures` failures within `window`, the node is *damped*: it does not preempt
  (it never asks for the VIPs by priority) until it has been healthy for `hold_down`
  without failing again. The count starts over when a failure leaves the window.
* Damping never keeps a sick node active: a failing holder loses the VIPs as before. It
  changes nothing but preemption: the election of two standbys, a peer's failure, an
  operator's switchover or promote all act at once.

With the defaults (1 failure, 30 s, 10 min) a flapping or crash-looping preferred node
moves the VIPs at most twice: away at its first failure, back once it has been healthy
for 30 s (simulations/README.md, "Flap damping").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_FAILURES = 1
DEFAULT_HOLD_DOWN = 30.0
DEFAULT_WINDOW = 600.0


class Cause(enum.StrEnum):
    """What failed: the `cause` label of vipd_flaps_total."""

    HEALTH = "health"
    RESTART = "restart"  # the daemon started after an unclean exit
    STALL = "stall"  # the active stalled (paused, starved) past the dead interval


@dataclass(frozen=True, slots=True)
class DampingConfig:
    failures: int = DEFAULT_FAILURES  # failures within `window` that damp; 0: off
    window: float = DEFAULT_WINDOW
    hold_down: float = DEFAULT_HOLD_DOWN

    @property
    def enabled(self) -> bool:
        return self.failures > 0


@dataclass(frozen=True, slots=True)
class Flap:
    at: float  # the election's clock
    cause: Cause
    detail: str


@dataclass(frozen=True, slots=True)
class DampingChanged:
    """An action of both elections: a failure was counted (``flap``; the runtime logs,
    counts and persists it) or preemption became damped or free again."""

    damped: bool
    reason: str
    flap: Flap | None = None


@dataclass(slots=True)
class Damper:
    """The node's recent failures and since when it has been healthy."""

    flaps: list[Flap] = field(default_factory=list)
    healthy_since: float | None = None  # None: failing, or not known healthy since a failure
    damped: bool = False  # as last reported (DampingChanged)

    def fail(self, flap: Flap, cfg: DampingConfig) -> DampingChanged | None:
        """Count a failure of the node's own; the notice for the runtime (None: off)."""
        self.failed(flap, cfg)
        if not cfg.enabled:
            return None
        count = len(self.recent(flap.at, cfg))
        self.damped = self.until(flap.at, cfg) is not None
        why = f"{flap.detail}: failure {count} within {cfg.window:g} s"
        if self.damped:
            why += f"; no preemption until healthy for {cfg.hold_down:g} s"
        else:
            why += f" (damping from {cfg.failures})"
        return DampingChanged(self.damped, why, flap)

    def update(self, now: float, cfg: DampingConfig) -> DampingChanged | None:
        """The notice when damping ends (healthy for the hold-down, or its failures left
        the window) or begins without a new failure (persisted ones, a reload)."""
        damped = self.until(now, cfg) is not None
        if damped == self.damped:
            return None
        self.damped = damped
        if damped:
            return DampingChanged(True, f"{len(self.recent(now, cfg))} failure(s) within "
                                        f"{cfg.window:g} s; no preemption until healthy for "
                                        f"{cfg.hold_down:g} s")
        since = self.healthy_since
        stable = f"healthy for {now - since:.0f} s" if since is not None else "no failures"
        return DampingChanged(False, f"{stable} since the last failure: preemption allowed "
                                     "again")

    def deadline(self, now: float, cfg: DampingConfig) -> float | None:
        """When the election must look again (the end of the hold-down), if damped."""
        until = self.until(now, cfg) if self.damped else None
        return None if until is None or until == float("inf") else until

    def failed(self, flap: Flap, cfg: DampingConfig) -> None:
        self.flaps = [f for f in self.flaps if f.at > flap.at - cfg.window] + [flap]
        self.healthy_since = None

    def healthy(self, now: float) -> None:
        if self.healthy_since is None:
            self.healthy_since = now

    def recent(self, now: float, cfg: DampingConfig) -> list[Flap]:
        """The failures that still count (within `window` of now)."""
        return [f for f in self.flaps if f.at > now - cfg.window]

    def until(self, now: float, cfg: DampingConfig) -> float | None:
        """When the node may preempt again: None if it may now, inf while it has not been
        healthy since its last failure."""
        # Asked at every event: no list is built while there are too few failures at all.
        if (not cfg.enabled or len(self.flaps) < cfg.failures
                or len(self.recent(now, cfg)) < cfg.failures):
            return None
        if self.healthy_since is None:
            return float("inf")
        end = self.healthy_since + cfg.hold_down
        # The failures that damp may leave the window first (window < hold_down + age).
        expiry = self.flaps[-cfg.failures].at + cfg.window
        end = min(end, expiry)
        return end if now < end else None
