"""The election's vocabulary: events in, actions out. Plain data, no behaviour.

The rule that maps one to the other lives in vipd/core/election.py.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from vipd.core.protocol import Advert, Received, State

# --- events ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Start:
    pass


@dataclass(frozen=True, slots=True)
class Tick:
    pass


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    received: Received


@dataclass(frozen=True, slots=True)
class HealthChanged:
    healthy: bool | None
    detail: str = ""


class CommandKind(enum.StrEnum):
    SWITCHOVER = "switchover"
    MAINTENANCE_ON = "maintenance_on"
    MAINTENANCE_OFF = "maintenance_off"
    PROMOTE = "promote"


@dataclass(frozen=True, slots=True)
class Command:
    kind: CommandKind
    force: bool = False


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class VipFailed:
    detail: str


@dataclass(frozen=True, slots=True)
class VipsLost:
    """The holder's VIPs may be gone by the kernel's hand (the lease lapsed while the
    process stalled): another node may hold them now, so they are not simply re-added."""

    detail: str


@dataclass(frozen=True, slots=True)
class DuplicateNode:
    """Another live node sends heartbeats under our node name (a configuration error)."""

    detail: str


Event = (Start | Tick | HeartbeatReceived | HealthChanged | Command | Shutdown | VipFailed
         | VipsLost | DuplicateNode)


# --- actions -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    reason: str
    term: int


@dataclass(frozen=True, slots=True)
class AcquireVips:
    term: int


@dataclass(frozen=True, slots=True)
class ReleaseVips:
    pass


@dataclass(frozen=True, slots=True)
class Announce:
    reason: str


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    advert: Advert


@dataclass(frozen=True, slots=True)
class RunHook:
    hook: str  # "on_active" | "on_standby" | "on_fault"
    state: State
    term: int


@dataclass(frozen=True, slots=True)
class CommandResult:
    kind: CommandKind
    accepted: bool
    message: str


@dataclass(frozen=True, slots=True)
class Warn:
    message: str


Action = (Transition | AcquireVips | ReleaseVips | Announce | SendHeartbeat | RunHook
          | CommandResult | Warn)


# Every transition reason the election writes, as a bounded metric label. Order matters:
# the first pattern that matches wins. A reason that matches none is "other", which a unit
# test treats as a bug.
_REASON_CODES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), code) for pattern, code in (
        (r"^started$", "start"),
        (r"^(shutdown|stopped and no eligible peer)", "shutdown"),
        (r"^maintenance (on|and no eligible peer)", "maintenance"),
        (r"^(maintenance off|healthy again|eligible again)$", "recovered"),
        (r"^health check failing", "health"),
        (r"^VIP operation failed", "vip_error"),
        (r"^VIPs lost", "vip_lost"),
        (r"^duplicate node name", "duplicate_node"),
        (r"^handed over to ", "handed_over"),
        (r"^handover timed out", "handover_timeout"),
        (r"^operator promote$", "promote"),
        (r"^no peer heard within", "no_peer"),
        (r"^peer \S+ silent for", "peer_dead"),
        (r"^peer \S+ hands over$", "peer_handover"),
        (r"^peer \S+ active but unhealthy$", "peer_unhealthy"),
        (r"^peer \S+ is active and has not heard us", "one_way_link"),
        (r"^peer \S+ is (FAULT|MAINTENANCE|STOPPED|INIT|unhealthy)$", "peer_ineligible"),
        (r"^election: ", "election"),
        (r"^peer \S+ won the election but did not take over$", "peer_idle"),
        (r"^split brain: ", "split_brain"),
    ))
REASON_CODES = tuple(sorted({code for _, code in _REASON_CODES} | {"other"}))
# Takeovers because the peer failed (not planned, not the start-up election).
UNPLANNED_TAKEOVERS = frozenset({"peer_dead", "peer_ineligible", "peer_unhealthy",
                                 "peer_idle"})


def reason_code(reason: str) -> str:
    for pattern, code in _REASON_CODES:
        if pattern.search(reason):
            return code
    return "other"
