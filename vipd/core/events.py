"""The election's vocabulary: events in, actions out. Plain data, no behaviour.

The rule that maps one to the other lives in vipd/core/election.py.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vipd.core.damping import DampingChanged, DampingConfig
from vipd.core.protocol import Advert, Received, State, Verdict

# Defaults chosen with the simulator (simulations/README.md): crash failover ~300 ms
# while false suspicions at 5% random loss stay around 3.5e-5 per hour.
DEFAULT_INTERVAL = 0.04
DEFAULT_DEAD_AFTER = 8


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    """The settings the election decides by (from the YAML config; see vipd.daemon)."""

    node: str
    priority: int = 100
    preempt: bool = True
    preempt_delay: float = 0.0
    interval: float = DEFAULT_INTERVAL
    dead_after: int = DEFAULT_DEAD_AFTER
    digest: bytes = b""
    vip_retry: float = 5.0  # how long a VIP (netlink) failure keeps the node in FAULT
    witnesses: tuple[str, ...] = ()  # arbiter: the witnesses' voter ids (none: no arbiter)
    lease: float = 0.0  # a vote's lease; 0: the dead interval
    damping: DampingConfig = field(default_factory=DampingConfig)  # of preemption

    @property
    def dead_interval(self) -> float:
        return self.interval * self.dead_after

    @property
    def arbiter(self) -> bool:
        """Lease votes decide who may hold the VIPs (docs/election.md)."""
        return bool(self.witnesses)

    @property
    def vote_lease(self) -> float:
        return self.lease or self.dead_interval

    @property
    def voters(self) -> int:
        return 2 + len(self.witnesses)


# --- events ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Start:
    """The node starts; ``crashed``: its previous run ended without a clean stop (the
    state file says it was running), which counts as a failure for flap damping."""

    crashed: bool = False


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
    target: str = ""  # switchover in a group (arbiter etcd): the member to hand over to


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
class Reconfigure:
    """A reload: the election's settings (priority, preemption ...) change."""

    cfg: ElectionConfig


@dataclass(frozen=True, slots=True)
class DuplicateNode:
    """Another live node sends heartbeats under our node name (a configuration error)."""

    detail: str


@dataclass(frozen=True, slots=True)
class VoteReplied:
    """A witness answered one of our vote requests (the one sent at ``request_sent_at``,
    by our clock; None if it answers one we no longer remember)."""

    voter: str
    verdict: Verdict
    request_sent_at: float | None
    lease: float
    wait: float = 0.0


Event = (Start | Tick | HeartbeatReceived | HealthChanged | Command | Shutdown | VipFailed
         | VipsLost | DuplicateNode | Reconfigure | VoteReplied)


# --- actions -----------------------------------------------------------------------------

class Why(enum.StrEnum):
    """Why a transition happened: the bounded code behind its human reason text, and the
    `reason` label of vipd_transitions_total."""

    START = "start"
    SHUTDOWN = "shutdown"
    MAINTENANCE = "maintenance"
    RECOVERED = "recovered"  # maintenance off, healthy again
    HEALTH = "health"
    VIP_ERROR = "vip_error"
    VIP_LOST = "vip_lost"
    DUPLICATE_NODE = "duplicate_node"
    HANDED_OVER = "handed_over"
    HANDOVER_TIMEOUT = "handover_timeout"
    PROMOTE = "promote"
    NO_PEER = "no_peer"
    PEER_DEAD = "peer_dead"
    PEER_HANDOVER = "peer_handover"
    PEER_UNHEALTHY = "peer_unhealthy"
    ONE_WAY_LINK = "one_way_link"
    PEER_INELIGIBLE = "peer_ineligible"
    ELECTION = "election"
    PEER_IDLE = "peer_idle"
    SPLIT_BRAIN = "split_brain"
    NO_QUORUM = "no_quorum"  # arbiter: the votes ran out while active (self-fence)
    LEASE_EXPIRED = "lease_expired"  # etcd: our lease may expire now (self-fence)
    KEY_LOST = "key_lost"  # etcd: the holder key is no longer ours


class Hook(enum.StrEnum):
    """The operator's programs run on entering a state (config `hooks`)."""

    ON_ACTIVE = "on_active"
    ON_STANDBY = "on_standby"
    ON_FAULT = "on_fault"


class Effect(enum.Enum):
    """Side effects of a transition other than hooks, in the order the table lists them.
    Taking the VIPs includes announcing them: whoever carries out ACQUIRE announces."""

    ACQUIRE = enum.auto()
    RELEASE = enum.auto()
    HEARTBEAT = enum.auto()  # marks one due: the step ends with a single SendHeartbeat


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    why: Why
    reason: str  # the same for humans: names the peer, the check, the numbers
    term: int


@dataclass(frozen=True, slots=True)
class AcquireVips:
    term: int


@dataclass(frozen=True, slots=True)
class ReleaseVips:
    pass


@dataclass(frozen=True, slots=True)
class Announce:
    """Announce the VIPs again (a takeover's own burst comes with AcquireVips)."""

    reason: str


@dataclass(frozen=True, slots=True)
class SendHeartbeat:
    advert: Advert


@dataclass(frozen=True, slots=True)
class RunHook:
    hook: Hook
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


@dataclass(frozen=True, slots=True)
class AskVotes:
    """Send a vote request to every witness; ``release``: give our vote back instead."""

    release: bool = False


@dataclass(frozen=True, slots=True)
class CloseGate:
    """Shut the kernel gate now, before any later action of the step is carried out: the
    heartbeat that follows may give our vote away (break-before-make)."""

    reason: str


Action = (Transition | AcquireVips | ReleaseVips | Announce | SendHeartbeat | RunHook
          | CommandResult | Warn | AskVotes | CloseGate | DampingChanged)


# Takeovers because the peer failed (not planned, not the start-up election).
UNPLANNED_TAKEOVERS = frozenset({Why.PEER_DEAD, Why.PEER_INELIGIBLE, Why.PEER_UNHEALTHY,
                                 Why.PEER_IDLE})
REASON_CODES = tuple(sorted(why.value for why in Why))
