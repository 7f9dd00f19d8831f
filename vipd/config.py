"""The YAML config of one pair, validated into frozen pydantic models, and the key file.

Unknown keys are errors because in an HA config a misspelt key silently falls back to a
default (say, ``preempt``) and is only noticed during the outage. Every problem is
reported at once, as ``(key.path, message)`` pairs inside one ``ConfigError``.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Hashable
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
)
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vipd.configtypes import (
    BASE_DIR,
    Argv,
    ConfigPath,
    Duration,
    Endpoint,
    InterfaceName,
    Name,
    Port,
    PositiveDuration,
    Problems,
    SecretPath,
    StrictBool,
    Vip,
    check_command,
    format_duration,
    key_path,
)
from vipd.core.damping import (
    DEFAULT_FAILURES,
    DEFAULT_HOLD_DOWN,
    DEFAULT_WINDOW,
    DampingConfig,
)
from vipd.core.events import DEFAULT_DEAD_AFTER, DEFAULT_INTERVAL, Hook
from vipd.errors import ConfigError

DEFAULT_STATE_ROOT = Path("/var/lib/vipd")
M = TypeVar("M", bound=BaseModel)

# --- models -------------------------------------------------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeartbeatConfig(_Model):
    bind: Endpoint
    peers: list[Endpoint]
    interval: PositiveDuration = DEFAULT_INTERVAL
    dead_after: Annotated[int, Strict(), Field(ge=2)] = DEFAULT_DEAD_AFTER
    # Heartbeats whose send time differs more from our clock are rejected as stale; keep
    # the nodes' clocks NTP-synced. See docs/protocol.md.
    max_clock_skew: PositiveDuration = 1.0

    @property
    def dead_interval(self) -> float:
        """Seconds without a valid heartbeat after which the peer counts as dead."""
        return self.interval * self.dead_after

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, peers: list[Endpoint], info: ValidationInfo) -> list[Endpoint]:
        # A field validator (not a model one) so that peer mistakes are reported even
        # when interval or dead_after is wrong too; bind is validated before peers.
        if not peers:
            raise ValueError("expected at least one peer, like [192.0.2.2:5405]")
        bind: Endpoint | None = info.data.get("bind")
        problems: list[tuple[tuple[str | int, ...], str]] = []
        first: dict[Endpoint, int] = {}
        for i, peer in enumerate(peers):
            if peer == bind:
                msg = f"{peer} is this node's own bind address; list the other node"
            elif bind is not None and peer.host.version != bind.host.version:
                msg = (f"{peer} is IPv{peer.host.version} but bind {bind} is "
                       f"IPv{bind.host.version}; one socket speaks one family")
            elif peer.host.is_unspecified or peer.host.is_multicast:
                msg = f"{peer} is not a unicast address of the other node"
            elif peer in first:
                msg = f"{peer} is listed twice (also peers[{first[peer]}])"
            else:
                first[peer] = i
                continue
            problems.append(((i,), msg))
        if problems:
            raise Problems(problems)
        return peers


class AuthConfig(_Model):
    key_file: SecretPath  # a path, or credential:NAME (vipd/credentials.py)


def _unicast_list(endpoints: list[Endpoint], key: str, what: str,
                  empty: str) -> list[Endpoint]:
    """At least one (else ``empty``), each a unicast address of ``what``, none twice;
    every problem at once."""
    if not endpoints:
        raise ValueError(empty)
    problems: list[tuple[tuple[str | int, ...], str]] = []
    first: dict[Endpoint, int] = {}
    for i, endpoint in enumerate(endpoints):
        if endpoint in first:
            problems.append(((i,), f"{endpoint} is listed twice (also {key}[{first[endpoint]}])"))
        elif endpoint.host.is_unspecified or endpoint.host.is_multicast:
            problems.append(((i,), f"{endpoint} is not a unicast address of {what}"))
        first.setdefault(endpoint, i)
    if problems:
        raise Problems(problems)
    return endpoints


class EtcdTlsConfig(_Model):
    """TLS to etcd: the CA that signed the etcd members' certificates, and this node's
    client certificate and key when etcd requires them (--client-cert-auth)."""

    ca: ConfigPath
    cert: ConfigPath | None = None
    key: SecretPath | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> EtcdTlsConfig:
        if (self.cert is None) != (self.key is None):
            missing = "key" if self.key is None else "cert"
            raise Problems([((missing,), "a client certificate needs both cert and key")])
        return self


class EtcdConfig(_Model):
    """A group of nodes arbitrated by etcd (docs/election.md, "Groups on etcd")."""

    endpoints: list[Endpoint]
    prefix: str = "/vipd"
    # The holder's lease; etcd counts TTLs in whole seconds and raises one below about
    # 1.5 x its election timeout (the granted TTL is logged and exported).
    ttl: PositiveDuration = 1.0
    tls: EtcdTlsConfig | None = None

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, endpoints: list[Endpoint]) -> list[Endpoint]:
        return _unicast_list(endpoints, "endpoints", "an etcd member",
                             "expected at least one etcd endpoint, like [192.0.2.5:2379]")

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        if not prefix.startswith("/") or prefix != prefix.strip() or "//" in prefix:
            raise ValueError(f"expected a key prefix like /vipd, got {prefix!r}")
        return prefix.rstrip("/") or "/"

    @field_validator("ttl")
    @classmethod
    def _whole_seconds(cls, ttl: float) -> float:
        if ttl < 1 or ttl != int(ttl):
            raise ValueError(f"etcd lease TTLs are whole seconds (1s or more), got "
                             f"{format_duration(ttl)}")
        return ttl


class ArbiterConfig(_Model):
    """Who decides which node may hold the VIPs (docs/election.md): lease votes with a
    witness for a pair, or etcd for a group of nodes. Exactly one of the two."""

    witness: list[Endpoint] | None = None
    # How long a vote lasts, counted by each voter from its grant; default (None): the
    # heartbeat dead interval, so crash failover takes what it takes without an arbiter.
    lease: PositiveDuration | None = None
    etcd: EtcdConfig | None = None

    @field_validator("witness")
    @classmethod
    def _check_witnesses(cls, witnesses: list[Endpoint] | None) -> list[Endpoint] | None:
        if witnesses is None:
            return None
        return _unicast_list(witnesses, "witness", "a witness",
                             "expected at least one witness, like [192.0.2.3:5406]")

    @model_validator(mode="after")
    def _one_kind(self) -> ArbiterConfig:
        if (self.witness is None) == (self.etcd is None):
            raise Problems([((), "expected exactly one of witness: [HOST:PORT, ...] (a pair) "
                                 "or etcd: {endpoints: [...]} (a group)")])
        if self.etcd is not None and self.lease is not None:
            raise Problems([(("lease",), "lease is the witness's vote lease; with etcd "
                                         "the lease is etcd.ttl")])
        return self

    @property
    def kind(self) -> str:
        return "etcd" if self.etcd is not None else "witness"

    @property
    def witnesses(self) -> list[Endpoint]:
        return self.witness or []


class HttpCheck(_Model):
    url: str
    status: Annotated[int, Strict(), Field(ge=100, le=599)] = 200
    body: str | None = None  # a substring the response body must contain

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
            _ = parts.port  # raises ValueError for a bad port
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url


class TcpCheck(_Model):
    host: Annotated[str, Field(min_length=1)]
    port: Port


class ExecCheck(_Model):
    command: Annotated[Argv, AfterValidator(check_command)]


ProbeKind = Literal["http", "tcp", "exec"]
PROBE_KINDS: tuple[ProbeKind, ...] = typing.get_args(ProbeKind)


class HealthCheck(_Model):
    """A check from the config's ``health`` list. The only place its probe kind is
    validated: exactly one of ``http``, ``tcp``, ``exec`` is set."""

    name: Name
    http: HttpCheck | None = None
    tcp: TcpCheck | None = None
    exec: ExecCheck | None = None  # the YAML key; shadowing the builtin is harmless here
    interval: PositiveDuration = 0.2
    timeout: PositiveDuration = 0.15
    rise: Annotated[int, Strict(), Field(ge=1)] = 2
    fall: Annotated[int, Strict(), Field(ge=1)] = 2

    @property
    def kind(self) -> ProbeKind:
        """Which probe this check runs: "http", "tcp" or "exec"."""
        return next(kind for kind in PROBE_KINDS if getattr(self, kind) is not None)

    @property
    def probe(self) -> HttpCheck | TcpCheck | ExecCheck:
        probe: HttpCheck | TcpCheck | ExecCheck = getattr(self, self.kind)
        return probe

    @model_validator(mode="after")
    def _check_probe_and_timeout(self) -> HealthCheck:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        kinds = [kind for kind in PROBE_KINDS if getattr(self, kind) is not None]
        if len(kinds) != 1:
            problems.append(((), f"expected exactly one of http, tcp, exec; "
                                 f"got {' and '.join(kinds) or 'none'}"))
        if self.timeout >= self.interval:
            problems.append((("timeout",), f"timeout {format_duration(self.timeout)} must be "
                                           f"shorter than interval "
                                           f"{format_duration(self.interval)}"))
        if problems:
            raise Problems(problems)
        return self


class LinkCheck(_Model):
    """The built-in check of the VIP interface's link (``track_interface``). Built by the
    daemon, never read from YAML: ``Config`` has no key for it. Its timings are fixed."""

    interface: InterfaceName

    kind: ClassVar[Literal["link"]] = "link"
    interval: ClassVar[float] = 0.5
    timeout: ClassVar[float] = 0.4
    rise: ClassVar[int] = 2
    fall: ClassVar[int] = 1

    @property
    def name(self) -> str:
        return f"link.{self.interface}"


# Every check a health monitor runs: the configured ones and the built-in link check.
Check = HealthCheck | LinkCheck


class AnnounceConfig(_Model):
    count: Annotated[int, Strict(), Field(ge=0, le=100)] = 3
    interval: PositiveDuration = 0.1
    refresh: Duration = 10.0  # 0 = no periodic re-announce


class WebhookMoverConfig(_Model):
    """Tell a receiver of yours who holds each VIP (vipd/movers/webhook.py, docs/cloud.md)."""

    url: str
    verify_url: str | None = None  # GET ?cluster=&vip= -> {"node", "term"}; None: trust POSTs
    secret_file: SecretPath  # the HMAC secret, a 0600 file (or credential:NAME)
    insecure: StrictBool = False  # allow http:// (a receiver on loopback, a lab)
    timeout: PositiveDuration = 2.0  # per request; timeouts and 5xx are retried
    reconcile: PositiveDuration = 10.0  # the holder verifies (and re-asserts) this often

    @model_validator(mode="after")
    def _https(self) -> WebhookMoverConfig:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for key in ("url", "verify_url"):
            url = getattr(self, key)
            if url is None:
                continue
            scheme = urlsplit(url).scheme
            if scheme not in ("https", "http") or not urlsplit(url).hostname:
                problems.append(((key,), f"expected an https:// URL, got {url!r}"))
            elif scheme == "http" and not self.insecure:
                problems.append(((key,), (
                    f"{url} is not https: the receiver would get the VIP moves in plain "
                    "text; use https, or set insecure: true for a receiver on loopback")))
        if problems:
            raise Problems(problems)
        return self




class ElasticIpConfig(_Model):
    allocation_id: Annotated[str, Field(pattern=r"^eipalloc-[0-9a-f]{8,17}$")]
    private_ip: IPv4Address  # the address on this node's ENI it maps to (usually a VIP)


class AwsMoverConfig(_Model):
    """Move the VIPs in EC2 (vipd/movers/aws.py, docs/cloud.md): secondary private IPs,
    Elastic IPs and route-table entries follow the holder's ENI."""

    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")]
    eni: Annotated[str, Field(pattern=r"^eni-[0-9a-f]{8,17}$")]  # this node's ENI
    secondary_ips: StrictBool = True  # the IPv4 VIPs as secondary private IPs of the ENI
    elastic_ips: list[ElasticIpConfig] = Field(default_factory=list)
    route_tables: list[Annotated[str, Field(pattern=r"^rtb-[0-9a-f]{8,17}$")]] = Field(
        default_factory=list)  # VIP/32 routes to the ENI (VIPs outside the VPC CIDR)
    endpoint_url: str | None = None  # an emulator (tests); None: the region's endpoint
    # A shared credentials file (or credential:NAME); None: botocore's chain (instance
    # profile, environment), which needs no secret on the node at all.
    credentials_file: SecretPath | None = None
    timeout: PositiveDuration = 5.0
    reconcile: PositiveDuration = 10.0

    @model_validator(mode="after")
    def _something_to_move(self) -> AwsMoverConfig:
        if not (self.secondary_ips or self.elastic_ips or self.route_tables):
            raise ValueError("nothing to move: set secondary_ips, elastic_ips or "
                             "route_tables")
        return self


class MoverConfig(_Model):
    """One entry of `movers`: the word netlink, or a mapping naming a remote mover."""

    netlink: StrictBool = False
    webhook: WebhookMoverConfig | None = None
    aws: AwsMoverConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_word(cls, value: Any) -> Any:
        if value == "netlink":
            return {"netlink": True}
        if isinstance(value, str):
            raise ValueError(f"unknown mover {value!r}; expected netlink, or a mapping like "
                             "{aws: {region: ..., eni: ...}} or {webhook: {url: ..., "
                             "secret_file: ...}}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> MoverConfig:
        if self.netlink + (self.webhook is not None) + (self.aws is not None) != 1:
            raise ValueError("expected one mover per entry: netlink, {aws: {...}} or "
                             "{webhook: {...}}")
        return self

    @property
    def kind(self) -> str:
        return "netlink" if self.netlink else "webhook" if self.webhook else "aws"


class TlsConfig(_Model):
    cert: ConfigPath
    key: SecretPath
    client_ca: ConfigPath | None = None  # given: clients must present a certificate it signed


class ApiConfig(_Model):
    listen: Endpoint | None = Endpoint.parse("127.0.0.1:9440")  # None: no control API
    tokens_file: SecretPath | None = None  # None: only /healthz and /readyz answer
    tls: TlsConfig | None = None


class AuditConfig(_Model):
    file: ConfigPath | None = None  # None: Config.effective_audit_file


class MetricsConfig(_Model):
    listen: Endpoint | None = Endpoint.parse("127.0.0.1:9441")  # None: no metrics endpoint
    # TLS and basic auth in the exporter-toolkit's format (vipd/webconfig.py)
    web_config_file: ConfigPath | None = None


class DampingSettings(_Model):
    """Flap damping of preemption (vipd/core/damping.py): after `failures` failures of
    this node (health turning bad, a start after an unclean exit) within `window`, it does
    not preempt until it has been healthy for `hold_down`. `failures: 0` turns it off."""

    failures: Annotated[int, Strict(), Field(ge=0, le=1000)] = DEFAULT_FAILURES
    window: PositiveDuration = DEFAULT_WINDOW
    hold_down: Duration = DEFAULT_HOLD_DOWN

    def rule(self) -> DampingConfig:
        """The settings as the elections take them."""
        return DampingConfig(failures=self.failures, window=self.window,
                             hold_down=self.hold_down)


class HooksConfig(_Model):
    on_active: Argv = Field(default_factory=list)
    on_standby: Argv = Field(default_factory=list)
    on_fault: Argv = Field(default_factory=list)
    timeout: PositiveDuration = 10.0

    def argv(self, hook: Hook) -> list[str]:
        """The command configured for ``hook`` (empty: none)."""
        match hook:
            case Hook.ON_ACTIVE:
                return list(self.on_active)
            case Hook.ON_STANDBY:
                return list(self.on_standby)
            case Hook.ON_FAULT:
                return list(self.on_fault)


class Config(_Model):
    node: Name
    cluster: Name
    interface: InterfaceName
    vips: list[Vip]
    priority: Annotated[int, Strict(), Field(ge=1, le=254)] = 100
    preempt: StrictBool = True
    preempt_delay: Duration = 0.0
    # A node that failed recently does not preempt until it has been healthy for a while.
    damping: DampingSettings = Field(default_factory=DampingSettings)
    # The pair's heartbeats and their key; not used (and not allowed) with arbiter etcd,
    # where the group meets in etcd instead.
    heartbeat: HeartbeatConfig | None = None
    auth: AuthConfig | None = None
    health: list[HealthCheck] = Field(default_factory=list)
    announce: AnnounceConfig = Field(default_factory=AnnounceConfig)
    vip_lease: Duration = 3.0  # 0 = permanent addresses
    api: ApiConfig = Field(default_factory=ApiConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # Where the VIPs are moved: "netlink" (the interface's addresses, always first) and,
    # in clouds that ignore gratuitous ARP, a remote mover after it (docs/cloud.md).
    movers: list[MoverConfig] = Field(default_factory=lambda: [MoverConfig(netlink=True)])
    hooks: HooksConfig = Field(default_factory=HooksConfig)
    state_dir: ConfigPath | None = None
    # Exec checks and hooks run as this user when vipd runs as root (default "nobody");
    # an unprivileged vipd (the systemd unit) runs them as itself, capabilities dropped.
    exec_user: Name | None = None
    # Treat the VIP interface's link as a health check (down: FAULT, VIPs released), as
    # keepalived's interface tracking does; an isolated node then holds no VIP copy.
    track_interface: StrictBool = True
    # Lease votes with a witness: a node holds the VIPs only while a majority of voters
    # (the pair and the witnesses) vote for it. Absent: a partition of the heartbeat path
    # makes both nodes active (said at start and in vipd_arbiter_info).
    arbiter: ArbiterConfig | None = None
    # "kernel": the VIPs sit behind an nftables gate that shuts by itself one dead
    # interval after the holder stops renewing it (vipd/fence.py); "none": no gate.
    # Default: "kernel" with an arbiter (which requires it), "none" without.
    fence: Literal["none", "kernel"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _fence_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fence" not in data and data.get("arbiter"):
            return {**data, "fence": "kernel"}
        return data

    @property
    def etcd(self) -> EtcdConfig | None:
        """The etcd arbiter (a group), or None (a pair)."""
        return self.arbiter.etcd if self.arbiter is not None else None

    @property
    def pair(self) -> HeartbeatConfig:
        """The heartbeat settings of a pair (only called where the node is one)."""
        if self.heartbeat is None:
            raise AssertionError("heartbeat settings asked of a group (arbiter etcd)")
        return self.heartbeat

    @property
    def key_file(self) -> Path:
        if self.auth is None:
            raise AssertionError("the heartbeat key asked of a group (arbiter etcd)")
        return self.auth.key_file

    @property
    def interval(self) -> float:
        """The node's pace: the heartbeat interval of a pair, the keep-alive period of a
        group (a quarter of the etcd TTL)."""
        if self.heartbeat is not None:
            return self.heartbeat.interval
        assert self.etcd is not None
        return self.etcd.ttl / 4

    @property
    def dead_interval(self) -> float:
        """How long a silent holder keeps the VIPs at most: the heartbeat dead interval
        of a pair, the etcd TTL of a group."""
        if self.heartbeat is not None:
            return self.heartbeat.dead_interval
        assert self.etcd is not None
        return self.etcd.ttl

    @property
    def vote_lease(self) -> float:
        """The arbiter's vote lease (the dead interval unless set)."""
        lease = self.arbiter.lease if self.arbiter is not None else None
        return lease or self.dead_interval

    @property
    def effective_state_dir(self) -> Path:
        """Where the persisted term and maintenance flag live: /var/lib/vipd/<cluster>."""
        return self.state_dir if self.state_dir is not None else \
            DEFAULT_STATE_ROOT / self.cluster

    @property
    def effective_audit_file(self) -> Path:
        """The audit log; by default inside the state directory."""
        return self.audit.file if self.audit.file is not None else \
            self.effective_state_dir / "audit.jsonl"

    @field_validator("vips")
    @classmethod
    def _unique_vips(cls, vips: list[IPv4Interface | IPv6Interface]) -> list[
            IPv4Interface | IPv6Interface]:
        if not vips:
            raise ValueError("expected at least one VIP, like [198.51.100.10/32]")
        first: dict[IPv4Address | IPv6Address, int] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, vip in enumerate(vips):
            if vip.ip in first:
                problems.append(((i,), f"{vip.ip} is listed twice (also vips[{first[vip.ip]}])"))
            first.setdefault(vip.ip, i)
        if problems:
            raise Problems(problems)
        return vips

    @field_validator("health")
    @classmethod
    def _unique_check_names(cls, checks: list[HealthCheck]) -> list[HealthCheck]:
        first: dict[str, int] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for i, check in enumerate(checks):
            if check.name in first:
                problems.append(((i, "name"), f"check name {check.name!r} is used twice "
                                              f"(also health[{first[check.name]}])"))
            first.setdefault(check.name, i)
        if problems:
            raise Problems(problems)
        return checks

    @field_validator("movers")
    @classmethod
    def _netlink_first(cls, movers: list[MoverConfig]) -> list[MoverConfig]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if not movers or movers[0].kind != "netlink":
            problems.append(((0,), "expected netlink first (the VIPs must be on the "
                                   "interface for this host to answer), like [netlink, "
                                   "{webhook: {...}}]"))
        kinds = [m.kind for m in movers]
        for i, kind in enumerate(kinds):
            if kind in kinds[:i]:
                problems.append(((i,), f"{kind} is listed twice"))
        if problems:
            raise Problems(problems)
        return movers

    @property
    def remote_movers(self) -> list[MoverConfig]:
        return [m for m in self.movers if m.kind != "netlink"]

    @model_validator(mode="after")
    def _pair_or_group(self) -> Config:
        # A pair meets through heartbeats (and their key); a group through etcd.
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.etcd is None:
            for key in ("heartbeat", "auth"):
                if getattr(self, key) is None:
                    problems.append(((key,), "missing required key"))
        else:
            for key in ("heartbeat", "auth"):
                if getattr(self, key) is not None:
                    problems.append(((key,), (
                        f"not used with arbiter etcd (the group meets in etcd, not by "
                        f"heartbeats); remove `{key}`")))
        if problems:
            raise Problems(problems)
        return self

    @model_validator(mode="after")
    def _arbiter_needs_fence(self) -> Config:
        # The votes bound how long a node may answer for the VIPs; after a crash or a
        # freeze only the kernel can enforce that bound.
        if self.arbiter is None:
            return self
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if self.fence != "kernel":
            problems.append((("fence",), (
                "an arbiter needs fence: kernel (the kernel gate enforces the vote lease "
                "when the process is frozen or killed); remove `fence: none`")))
        if self.heartbeat is None:
            if problems:
                raise Problems(problems)
            return self
        lease, interval = self.vote_lease, self.heartbeat.interval
        if lease < 3 * interval:
            problems.append((("arbiter", "lease"), (
                f"lease {format_duration(lease)} must be at least 3 heartbeat intervals "
                f"({format_duration(3 * interval)}): votes are renewed once per interval")))
        pair_hosts = {p.host for p in self.heartbeat.peers} | {self.heartbeat.bind.host}
        for i, witness in enumerate(self.arbiter.witnesses):
            if witness.host in pair_hosts:
                problems.append((("arbiter", "witness", i), (
                    f"{witness} is on a heartbeat address of the pair; the witness must "
                    "run on a third host (its votes arbitrate between the two nodes)")))
            elif witness.host.version != self.heartbeat.bind.host.version:
                problems.append((("arbiter", "witness", i), (
                    f"{witness} is IPv{witness.host.version} but bind "
                    f"{self.heartbeat.bind} is IPv{self.heartbeat.bind.host.version}; "
                    "votes travel on the heartbeat socket")))
        if problems:
            raise Problems(problems)
        return self

    @model_validator(mode="after")
    def _lease_outlives_dead_interval(self) -> Config:
        # A lease shorter than the dead interval would drop the VIP from a healthy active
        # whose heartbeats merely got delayed.
        if self.heartbeat is None and self.etcd is None:
            return self  # reported as missing
        dead = self.dead_interval
        if self.vip_lease and self.vip_lease <= dead:
            what = (f"heartbeat dead interval {format_duration(dead)} (interval "
                    f"{format_duration(self.heartbeat.interval)} x dead_after "
                    f"{self.heartbeat.dead_after})" if self.heartbeat is not None else
                    f"etcd ttl {format_duration(dead)}")
            raise Problems([(("vip_lease",), (
                f"vip_lease {format_duration(self.vip_lease)} must be longer than the "
                f"{what}, or 0 for permanent addresses"))])
        return self


# --- loading ------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file; relative paths in it are resolved against
    the file's directory. Raises ConfigError listing every problem."""
    return load_model(path, Config)


def load_model(path: str | Path, model: type[M]) -> M:
    """Read a YAML file into ``model`` (a pair's `Config`, the witness's config) with the
    same rules and messages: relative paths against the file's directory, every problem
    in one ConfigError."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [("", f"cannot read config file: {exc.strerror or exc}")]) \
            from exc
    except UnicodeDecodeError:
        raise ConfigError(file, [("", "cannot read config file: not UTF-8 text")]) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError(file, [("", _yaml_message(exc))]) from exc
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(file, [("", f"expected a mapping of keys at the top level, "
                                      f"got {got}")])
    try:
        return model.model_validate(
            data, context={BASE_DIR: Path(path).absolute().parent})
    except ValidationError as exc:
        raise ConfigError(file, validation_problems(exc, model)) from exc


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def validation_problems(exc: ValidationError,
                        root: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """One (key.path, message) per pydantic error, in words an operator understands.
    ``root``: the model validated (default `Config`), for the known keys of a typo."""
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, Problems):
            problems.extend((key_path(loc + rel), msg) for rel, msg in cause.problems)
        elif isinstance(cause, ValueError):
            problems.append((key_path(loc), str(cause)))
        elif err["type"] == "extra_forbidden":
            problems.append((key_path(loc), _unknown_key(loc, root or Config)))
        elif err["type"] == "missing":
            problems.append((key_path(loc), "missing required key"))
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            problems.append((key_path(loc), f"expected a mapping of keys, got "
                                            f"{_describe(err['input'])}"))
        else:
            msg = err["msg"].replace("Input should be", "must be", 1)
            problems.append((key_path(loc), f"{msg}, got {_describe(err['input'])}"))
    return problems


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown_key(loc: tuple[str | int, ...], root: type[BaseModel]) -> str:
    known = _keys_at(loc[:-1], root)
    if not known:
        return "unknown key"
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; expected one of: {', '.join(known)}"


def _keys_at(loc: tuple[str | int, ...], root: type[BaseModel]) -> list[str]:
    """The keys the model at this location accepts (list indexes need no step, nor do
    the keys of a mapping of models: the witness's ``clusters.web``)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, str) and model is not None:
            field = model.model_fields.get(part)
            if field is not None:
                model = _model_in(field.annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None
