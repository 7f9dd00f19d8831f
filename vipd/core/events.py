"""The election's vocabulary: events in, actions out. Plain data, no behaviour.

The rule that maps one to the other lives in vipd/core/election.py.
"""

from __future__ import annotations

import enum
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


Event = Start | Tick | HeartbeatReceived | HealthChanged | Command | Shutdown | VipFailed


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
