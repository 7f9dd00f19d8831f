"""Health hysteresis: turns a stream of probe results into a debounced up/down state.

A single failed probe must not move the VIPs and a single lucky probe must not bring a
sick service back, so a check goes down only after ``fall`` consecutive failures and up
only after ``rise`` consecutive successes (keepalived's ``fall``/``rise``). The first
result is the exception: at startup nothing is known, and waiting ``rise`` probes before
a node may ever become active would only delay the pair, so it sets the state directly.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Hysteresis", "combine"]


class Hysteresis:
    """Debounced state of one check; ``up`` is None until the first result."""

    __slots__ = ("fall", "rise", "streak", "up")

    def __init__(self, rise: int, fall: int) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got rise={rise} fall={fall}")
        self.rise = rise
        self.fall = fall
        self.up: bool | None = None
        # Consecutive results that disagree with ``up``; any agreeing result resets it.
        self.streak = 0

    def observe(self, ok: bool) -> bool:
        """Feed one probe result; return True if ``up`` changed."""
        if self.up is None:
            self.up = ok
            self.streak = 0
            return True
        if ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return False
        self.up = ok
        self.streak = 0
        return True

    def __repr__(self) -> str:
        return f"Hysteresis(rise={self.rise}, fall={self.fall}, up={self.up}, streak={self.streak})"


def combine(states: Iterable[bool | None]) -> bool | None:
    """AND of several checks' states.

    Any known failure makes the node unhealthy at once, even while other checks are
    still unknown, so a broken node never waits for slow checks before reporting FAULT.
    A node with no checks is healthy.
    """
    unknown = False
    for state in states:
        if state is False:
            return False
        if state is None:
            unknown = True
    return None if unknown else True
