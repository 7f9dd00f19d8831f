"""Heartbeat wire format: authenticated, versioned, replay-protected. Bytes in, bytes out.

Theory of operation
-------------------
Every heartbeat is one UDP datagram: a fixed 80-byte header, the cluster and node names
(length-prefixed ASCII), and an HMAC-SHA256 over everything before it. The byte layout is
documented in docs/protocol.md and pinned by fixed vectors in tests/unit/test_protocol.py.

`Session` is the stateful, still pure, endpoint of one node: `seal()` turns an `Advert`
(what the election wants to say) into bytes; `open()` turns bytes into a `Received` or
raises `Rejected` with a `Reject` reason that becomes a metric label. Nothing here reads a
clock: the caller passes `now` (monotonic seconds) and `wall_ns` (epoch nanoseconds).

Replay protection: a receiver remembers the peer's boot id, last sequence number and
last send time. Within one boot id the sequence must strictly increase; a new boot id is
accepted only with a send time newer than anything accepted before (the peer's clock
against itself), or when it proves its freshness by the echo. Freshness: a datagram must
be at most `max_skew` old. The echo proves that without any wall clock (it answers a
heartbeat we sent at most `max_skew` ago on our monotonic clock); a datagram without such
an echo (at start, over a one-way link) is judged by its send time against our wall clock
corrected by the clock offset learned from the last fresh echo. So the nodes' wall
clocks need not agree: a step on either side changes the offset, which is exported, not
the liveness of the pair. A captured datagram can therefore neither be replayed to a
running receiver nor, after the window, to a fresh one.

Echo: each heartbeat carries the (boot id, sequence) of the newest heartbeat accepted from
the peer and how long ago that was. The sender of the echoed heartbeat looks up when it
sent it, which gives a round-trip time and, more important, tells it whether the peer
hears it at all (one-way partitions).

Keys rotate without downtime: heartbeats say which key signed them and the newest key id
their sender holds; a node signs with its newest key that the peer also holds.

Votes (docs/election.md, "arbitration by lease votes") use the same framing. A heartbeat
may carry the sender's vote for the receiver (Flag.VOTE: granted at or after receiving
the heartbeat it echoes, so the receiver counts it from when it sent that one). The
witness speaks two more kinds of message (the header's former reserved field): a node's
VOTE_REQUEST and the witness's VOTE_REPLY, each with a 12-byte `Vote` block after the
names, under the MAC. The reply echoes the request, so the node knows the send time it
counts the vote from; the same Session filters replays and staleness for both.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from vipd.errors import VipdError

MAGIC = b"VIPD"
VERSION = 1
MAC_SIZE = 32
MAX_NAME = 64
MAX_DATAGRAM = 512
MIN_KEY_BYTES = 32
MAX_KEY_ID = 0xFFFF_FFFF
DEFAULT_MAX_SKEW = 1.0
_SENT_MEMORY = 512  # own recent sequence numbers remembered for echo lookups

# magic, version, state, flags, key_id, newest_key_id, boot_id, seq, send_time_ns, term,
# priority, effective_priority, kind, settings_digest, echo_boot, echo_seq, echo_hold_us
_HEADER = struct.Struct("!4sBBHIIQQQQBBH8sQQI")
HEADER_SIZE = _HEADER.size  # 80
# Vote block (kinds VOTE_REQUEST and VOTE_REPLY): lease_ms, wait_ms, verdict, 3 zero bytes.
_VOTE = struct.Struct("!IIB3x")
VOTE_SIZE = _VOTE.size  # 12
MAX_LEASE_MS = 60_000
MIN_DATAGRAM = HEADER_SIZE + 1 + 1 + 1 + 1 + MAC_SIZE


class State(enum.IntEnum):
    """Node states, with their wire values (never renumber)."""

    INIT = 0
    STANDBY = 1
    ACTIVE = 2
    FAULT = 3
    MAINTENANCE = 4
    STOPPED = 5


class Flag(enum.IntFlag):
    """Heartbeat flags (u16 on the wire). Unknown bits are ignored for forward compatibility."""

    NONE = 0
    HEALTHY = 1 << 0  # local health checks pass
    PREEMPT = 1 << 1  # informational: this node is configured to preempt
    RESIGNING = 1 << 2  # active asks the peer to take over now (handover)
    SWITCHOVER = 1 << 3  # with RESIGNING: an operator move, the taker becomes PREFERRED
    PREFERRED = 1 << 4  # active chosen by an operator: not preempted
    WANT_ACTIVE = 1 << 5  # preemption request to the active peer
    PROMOTE = 1 << 6  # operator promote request to the active peer
    HEALTH_PENDING = 1 << 7  # health not known yet (starting): wait for it if it would win
    SETTLED = 1 << 8  # active for more than two dead intervals (split brain: beats a fresh one)
    VOTE = 1 << 9  # arbiter: the sender's vote is the receiver's, as of the echoed heartbeat
    CANDIDATE = 1 << 10  # arbiter: the sender asks for the receiver's vote to take over


class Kind(enum.IntEnum):
    """Message kinds (u16 on the wire, after the priorities; never renumber)."""

    HEARTBEAT = 0
    VOTE_REQUEST = 1  # node -> witness: grant (or, with RESIGNING, give back) your vote
    VOTE_REPLY = 2  # witness -> node: the verdict on the request it echoes


class Verdict(enum.IntEnum):
    """A voter's answer to a request (wire values; the names are metric labels)."""

    GRANTED = 0
    HELD = 1  # the vote is another node's until its lease runs out (`wait_ms`)
    RESTARTING = 2  # the voter started less than one lease ago: it may have forgotten a grant
    RELEASED = 3  # the answer to a give-back: the vote is free
    STALE = 4  # the request could not be proven fresh yet (clocks apart): ask again


_STATES: dict[int, State] = {int(member): member for member in State}
_KINDS: dict[int, Kind] = {int(member): member for member in Kind}
_VERDICTS: dict[int, Verdict] = {int(member): member for member in Verdict}
_FLAGS: dict[int, Flag] = {}


def flag_of(value: int) -> Flag:
    """Flag(value), memoised: a heartbeat carries one of a handful of combinations, and
    building an IntFlag costs more than the rest of decoding it."""
    flag = _FLAGS.get(value)
    if flag is None:
        flag = Flag(value)
        if len(_FLAGS) < 1024:
            _FLAGS[value] = flag
    return flag


class Reject(enum.StrEnum):
    """Why a datagram was dropped; the value is the metric label."""

    OVERSIZE = "oversize"
    MALFORMED = "malformed"
    BAD_VERSION = "bad_version"
    UNKNOWN_KEY = "unknown_key"
    BAD_MAC = "bad_mac"
    WRONG_CLUSTER = "wrong_cluster"
    OWN_NODE = "own_node"
    UNKNOWN_PEER = "unknown_peer"
    STALE = "stale"
    REPLAY = "replay"
    DUPLICATE = "duplicate"  # a redundant copy of the last accepted datagram: benign
    DUPLICATE_NODE = "duplicate_node"  # another live node uses our node name: misconfigured
    WRONG_KIND = "wrong_kind"  # a vote message to a heartbeat port, or the reverse


class Rejected(VipdError):
    """A datagram was not accepted. The only exception `Session.open` ever raises."""

    def __init__(self, reason: Reject, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"heartbeat rejected ({reason}): {detail}")


@dataclass(frozen=True, slots=True)
class Advert:
    """What the election wants to tell the peer; the session adds identity and crypto."""

    state: State
    flags: Flag
    term: int
    priority: int
    effective_priority: int


@dataclass(frozen=True, slots=True)
class Vote:
    """The vote block of a VOTE_REQUEST (the lease asked for) or a VOTE_REPLY (the lease
    granted, or how long the vote stays another node's)."""

    lease_ms: int
    verdict: Verdict = Verdict.GRANTED
    wait_ms: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One decoded, authenticated message: a heartbeat, or a vote request or reply."""

    state: State
    flags: Flag
    key_id: int
    newest_key_id: int
    boot_id: int
    seq: int
    send_time_ns: int
    term: int
    priority: int
    effective_priority: int
    settings_digest: bytes
    echo_boot: int
    echo_seq: int
    echo_hold_us: int
    cluster: str
    node: str
    kind: Kind = Kind.HEARTBEAT
    vote: Vote | None = None  # present exactly for the vote kinds


@dataclass(frozen=True, slots=True)
class Received:
    """An accepted heartbeat plus what the echo told us."""

    heartbeat: Heartbeat
    received_at: float
    echo_sent_at: float | None  # when we sent the heartbeat the peer last accepted
    rtt: float | None
    clock_offset: float | None = None  # peer wall clock minus ours, from a fresh echo

    @property
    def confirmed(self) -> bool:
        """The peer echoes our current boot: this datagram was made after we started.

        A replay captured before our start cannot echo a boot id we chose at random.
        """
        return self.echo_sent_at is not None


class KeyRing:
    """Heartbeat keys by id. Signs with the newest key the peer also holds."""

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        for key_id, secret in keys.items():
            if not 1 <= key_id <= MAX_KEY_ID:
                raise ValueError(f"key id {key_id} is outside 1..{MAX_KEY_ID}")
            if len(secret) < MIN_KEY_BYTES:
                raise ValueError(f"key {key_id} has {len(secret)} bytes, expected >= 32")
        self._keys = dict(keys)
        self._newest = max(self._keys)
        # HMAC with the key already absorbed; copy() per message skips the key setup,
        # which is most of what signing one small datagram costs.
        self._macs = {key_id: hmac.new(secret, digestmod="sha256")
                      for key_id, secret in self._keys.items()}
        self._signing: tuple[int | None, int] | None = None

    @property
    def newest_id(self) -> int:
        return self._newest

    @property
    def ids(self) -> list[int]:
        return sorted(self._keys)

    def signing_id(self, peer_newest: int | None) -> int:
        """Newest own key not newer than the peer's newest, so a half-done rotation works."""
        cached = self._signing
        if cached is not None and cached[0] == peer_newest:
            return cached[1]
        if peer_newest is None:
            chosen = self.newest_id
        else:
            usable = [k for k in self._keys if k <= peer_newest]
            chosen = max(usable) if usable else self.newest_id
        self._signing = (peer_newest, chosen)
        return chosen

    def mac(self, key_id: int, data: bytes) -> bytes | None:
        """HMAC-SHA256 of ``data`` with key ``key_id``, or None if that key is not loaded."""
        base = self._macs.get(key_id)
        if base is None:
            return None
        h = base.copy()
        h.update(data)
        return h.digest()


def settings_digest(cluster: str, vips: Iterable[str], interval: float, dead_after: int,
                    vote_lease: float = 0.0) -> bytes:
    """8-byte digest of the settings both nodes of a pair must agree on (``vote_lease``:
    with an arbiter, whose lease both must count alike)."""
    parts = [
        cluster,
        ",".join(sorted(str(v) for v in vips)),
        f"{round(interval * 1_000_000)}us",
        str(dead_after),
    ]
    if vote_lease:
        parts.append(f"votes {round(vote_lease * 1_000_000)}us")
    canonical = "|".join(parts)
    return hashlib.sha256(canonical.encode()).digest()[:8]


def _check_name(name: str, what: str) -> bytes:
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= MAX_NAME:
        raise ValueError(f"{what} {name!r} must be 1..{MAX_NAME} ASCII characters")
    return raw


def _name_fields(cluster: str, node: str) -> bytes:
    """The length-prefixed cluster and node names that follow the header."""
    raw_cluster = _check_name(cluster, "cluster")
    raw_node = _check_name(node, "node")
    return bytes([len(raw_cluster)]) + raw_cluster + bytes([len(raw_node)]) + raw_node


def _check_digest(digest: bytes) -> None:
    if len(digest) != 8:
        raise ValueError(f"settings digest must be 8 bytes, got {len(digest)}")


def _body(names: bytes, state: int, flags: int, key_id: int, newest_key_id: int,
          boot_id: int, seq: int, send_time_ns: int, term: int, priority: int,
          effective_priority: int, digest: bytes, echo_boot: int, echo_seq: int,
          echo_hold_us: int, kind: int = 0, vote: Vote | None = None) -> bytes:
    """Header, names and vote block: everything the MAC covers. ValueError for
    out-of-range fields."""
    if (vote is None) != (kind == Kind.HEARTBEAT):
        raise ValueError(f"message kind {kind} {'needs' if vote is None else 'has no'} "
                         "vote block")
    try:
        header = _HEADER.pack(MAGIC, VERSION, state, flags, key_id, newest_key_id, boot_id,
                              seq, send_time_ns, term, priority, effective_priority, kind,
                              digest, echo_boot, echo_seq, echo_hold_us)
        extra = b"" if vote is None else _VOTE.pack(vote.lease_ms, vote.wait_ms, vote.verdict)
    except struct.error as exc:
        raise ValueError(f"heartbeat field out of range: {exc}") from exc
    return header + names + extra


def encode(hb: Heartbeat, secret: bytes) -> bytes:
    """Serialise and sign. Raises ValueError (a programming error) for out-of-range fields.

    The reference encoder (tests, tools); `Session.seal` makes the same bytes with a
    precomputed HMAC state."""
    _check_digest(hb.settings_digest)
    body = _body(_name_fields(hb.cluster, hb.node), hb.state, hb.flags, hb.key_id,
                 hb.newest_key_id, hb.boot_id, hb.seq, hb.send_time_ns, hb.term,
                 hb.priority, hb.effective_priority, hb.settings_digest, hb.echo_boot,
                 hb.echo_seq, hb.echo_hold_us, hb.kind, hb.vote)
    return body + hmac.digest(secret, body, "sha256")


def _frame(data: bytes) -> tuple[str, str, int]:
    """The framing checks before the MAC: size, magic, version and the two names.
    Returns (cluster, node, where the names end). Raises only `Rejected`."""
    size = len(data)
    if size > MAX_DATAGRAM:
        raise Rejected(Reject.OVERSIZE, f"{size} bytes, at most {MAX_DATAGRAM} expected")
    if size < MIN_DATAGRAM:
        raise Rejected(Reject.MALFORMED, f"truncated: {size} bytes, at least {MIN_DATAGRAM}")
    if data[:4] != MAGIC:
        raise Rejected(Reject.MALFORMED, "not a vipd heartbeat (bad magic)")
    if data[4] != VERSION:
        raise Rejected(Reject.BAD_VERSION, f"version {data[4]}, expected {VERSION}")
    pos = HEADER_SIZE
    names: list[str] = []
    for what in ("cluster", "node"):
        length = data[pos]
        end = pos + 1 + length
        if not 1 <= length <= MAX_NAME or end > size - MAC_SIZE:
            raise Rejected(Reject.MALFORMED, f"{what} length {length} does not fit")
        try:
            names.append(data[pos + 1:end].decode("ascii"))
        except UnicodeDecodeError:
            raise Rejected(Reject.MALFORMED, f"{what} is not ASCII") from None
        pos = end
    return names[0], names[1], pos


def peek_names(data: bytes) -> tuple[str, str]:
    """The (cluster, node) a datagram claims, unauthenticated: a witness serving many
    clusters needs them to find the session (and key) that can verify it. Raises only
    `Rejected` (the framing reasons of `decode`)."""
    cluster, node, _ = _frame(data)
    return cluster, node


def decode(data: bytes, keys: KeyRing) -> Heartbeat:
    """Parse and authenticate one datagram. Raises only `Rejected`.

    Structure is checked before the MAC (we must find the key id) but no field is trusted
    or interpreted before the MAC has been verified.
    """
    size = len(data)
    cluster, node, pos = _frame(data)
    fields = _HEADER.unpack_from(data)
    kind = fields[12]
    names_end = pos
    if kind != Kind.HEARTBEAT:
        pos += VOTE_SIZE
    if pos != size - MAC_SIZE:
        raise Rejected(Reject.MALFORMED, f"{size - MAC_SIZE - pos} trailing bytes before MAC")
    key_id = fields[4]
    expected = keys.mac(key_id, data[:pos])
    if expected is None:
        raise Rejected(Reject.UNKNOWN_KEY, f"key id {key_id} not loaded (have {keys.ids})")
    if not hmac.compare_digest(expected, data[pos:]):
        raise Rejected(Reject.BAD_MAC, f"MAC does not verify with key id {key_id}")
    (_, _, state, flags, _, newest, boot, seq, send_ns, term, prio, eprio,
     _, digest, echo_boot, echo_seq, echo_hold) = fields
    state_member = _STATES.get(state)
    if state_member is None:
        raise Rejected(Reject.MALFORMED, f"unknown state {state}")
    kind_member = _KINDS.get(kind)
    if kind_member is None:
        raise Rejected(Reject.MALFORMED, f"unknown message kind {kind}")
    vote = None
    if kind_member is not Kind.HEARTBEAT:
        lease_ms, wait_ms, verdict = _VOTE.unpack_from(data, names_end)
        verdict_member = _VERDICTS.get(verdict)
        if verdict_member is None or data[names_end + 9:names_end + 12] != b"\0\0\0":
            raise Rejected(Reject.MALFORMED, f"bad vote block (verdict {verdict})")
        if not 0 < lease_ms <= MAX_LEASE_MS:
            raise Rejected(Reject.MALFORMED, f"vote lease {lease_ms} ms outside "
                                             f"1..{MAX_LEASE_MS}")
        vote = Vote(lease_ms=lease_ms, verdict=verdict_member, wait_ms=wait_ms)
    return Heartbeat(
        state=state_member, flags=flag_of(flags), key_id=key_id, newest_key_id=newest,
        boot_id=boot, seq=seq, send_time_ns=send_ns, term=term, priority=prio,
        effective_priority=eprio, settings_digest=digest, echo_boot=echo_boot,
        echo_seq=echo_seq, echo_hold_us=echo_hold, cluster=cluster, node=node,
        kind=kind_member, vote=vote,
    )


class Session:
    """One node's end of the heartbeat channel: signs what it sends, filters what it gets."""

    def __init__(
        self,
        *,
        cluster: str,
        node: str,
        keys: KeyRing,
        boot_id: int,
        digest: bytes,
        peer_sources: Iterable[Hashable] | None = None,
        max_skew: float = DEFAULT_MAX_SKEW,
        expect: Kind = Kind.HEARTBEAT,
    ) -> None:
        self._names = _name_fields(cluster, node)
        self._expect = expect  # the one kind this end accepts (a witness: VOTE_REQUEST)
        _check_digest(digest)
        self.cluster = cluster
        self.node = node
        self.keys = keys
        self.boot_id = boot_id
        self.digest = digest
        self._peer_sources = frozenset(peer_sources) if peer_sources is not None else None
        self._max_skew = max_skew
        self._max_skew_ns = int(max_skew * 1e9)
        self._seq = 0
        self._sent: OrderedDict[int, float] = OrderedDict()
        self.peer_node: str | None = None
        self.peer_newest_key: int | None = None
        self._peer_boot: int | None = None
        self._peer_seq = 0
        self._peer_send_ns = 0  # newest send time ever accepted, across boots
        self._retired_boots: OrderedDict[int, None] = OrderedDict()
        self._peer_mac = b""
        # What our heartbeats echo: (boot, seq, when) of the peer's newest accepted
        # datagram, or of a stale one while nothing was accepted yet (see open()).
        self._echo: tuple[int, int, float] | None = None
        self._offset_ns = 0  # peer wall clock minus ours, learned from fresh echoes
        self.clock_offset: float | None = None  # the same in seconds, once learned

    def rekey(self, keys: KeyRing) -> None:
        """A reload's new key ring (a rotation adds a key id, then removes the old)."""
        self.keys = keys

    def seal(self, advert: Advert, now: float, wall_ns: int, kind: Kind = Kind.HEARTBEAT,
             vote: Vote | None = None) -> bytes:
        """Sign ``advert`` as our next message (a heartbeat unless ``kind`` and ``vote``
        say otherwise): the bytes `encode` would make of it, without building a Heartbeat
        first (this runs for every heartbeat)."""
        self._seq += 1
        seq = self._seq
        sent = self._sent
        sent[seq] = now
        if len(sent) > _SENT_MEMORY:
            sent.popitem(last=False)
        echo_boot = echo_seq = hold_us = 0
        if self._echo is not None:
            echo_boot, echo_seq, rx_at = self._echo
            hold_us = min(max(round((now - rx_at) * 1e6), 0), 0xFFFF_FFFF)
        keys = self.keys
        key_id = keys.signing_id(self.peer_newest_key)
        body = _body(self._names, advert.state, advert.flags, key_id, keys.newest_id,
                     self.boot_id, seq, wall_ns, advert.term, advert.priority,
                     advert.effective_priority, self.digest, echo_boot, echo_seq, hold_us,
                     kind, vote)
        mac = keys.mac(key_id, body)
        assert mac is not None
        return body + mac

    def open(
        self, data: bytes, now: float, wall_ns: int, source: Hashable | None = None
    ) -> Received:
        """Authenticate and filter one datagram. Raises only `Rejected`."""
        if self._peer_sources is not None and source not in self._peer_sources:
            raise Rejected(Reject.UNKNOWN_PEER, f"datagram from {source}, not a configured peer")
        hb = decode(data, self.keys)
        if hb.kind is not self._expect:
            raise Rejected(Reject.WRONG_KIND, f"a {hb.kind.name} message, this port takes "
                                              f"{self._expect.name}")
        if hb.cluster != self.cluster:
            raise Rejected(Reject.WRONG_CLUSTER,
                           f"cluster {hb.cluster!r}, expected {self.cluster!r}")
        if hb.node == self.node:
            self._own_name(hb, wall_ns, source)
        if self.peer_node is not None and hb.node != self.peer_node:
            raise Rejected(Reject.UNKNOWN_PEER, f"node {hb.node!r}, the peer is {self.peer_node!r}")
        sent_at = self._sent.get(hb.echo_seq) if hb.echo_boot == self.boot_id else None
        # Fresh by the echo: made after a heartbeat we sent at most max_skew ago.
        fresh = sent_at is not None and now - sent_at <= self._max_skew
        if not fresh:
            skew_ns = hb.send_time_ns - wall_ns - self._offset_ns
            if abs(skew_ns) > self._max_skew_ns:
                if self._peer_boot is None:
                    # Nothing accepted yet: echo it (without accepting it), so that the
                    # peer's answer can prove its freshness even if the clocks disagree.
                    self._echo = (hb.boot_id, hb.seq, now)
                raise Rejected(Reject.STALE, f"send time {skew_ns / 1e9:+.3f}s from our clock "
                               f"(corrected by the learned offset "
                               f"{self._offset_ns / 1e9:+.3f}s), at most "
                               f"{self._max_skew_ns / 1e9:g}s allowed without a fresh echo")
        mac = data[-MAC_SIZE:]
        self._check_replay(hb, mac, fresh)
        self.peer_node = hb.node
        self.peer_newest_key = hb.newest_key_id
        if self._peer_boot is not None and hb.boot_id != self._peer_boot:
            self._retired_boots[self._peer_boot] = None
            while len(self._retired_boots) > 16:
                self._retired_boots.popitem(last=False)
        self._peer_boot, self._peer_seq = hb.boot_id, hb.seq
        self._peer_send_ns = max(self._peer_send_ns, hb.send_time_ns)
        self._peer_mac = mac
        self._echo = (hb.boot_id, hb.seq, now)
        rtt = offset = None
        if sent_at is not None:
            rtt = max(now - sent_at - hb.echo_hold_us / 1e6, 0.0)
            if fresh:
                # The peer sent this about half a round trip ago, by our clock.
                self._offset_ns = hb.send_time_ns - wall_ns + round(rtt * 5e8)
                offset = self.clock_offset = self._offset_ns / 1e9
        return Received(heartbeat=hb, received_at=now, echo_sent_at=sent_at, rtt=rtt,
                        clock_offset=offset)

    def _own_name(self, hb: Heartbeat, wall_ns: int, source: Hashable | None) -> None:
        """Always raises. A datagram of our own boot is a reflection; one of another boot,
        sent within max_skew of our clock from a peer address, is a second live node
        configured with our name (a replay of one of our own earlier boots is older)."""
        if hb.boot_id != self.boot_id and abs(hb.send_time_ns - wall_ns) <= self._max_skew_ns:
            raise Rejected(Reject.DUPLICATE_NODE,
                           f"the node at {source} also calls itself {hb.node!r} (boot "
                           f"{hb.boot_id:#x}, ours {self.boot_id:#x}): two configs use the "
                           f"same node name")
        raise Rejected(Reject.OWN_NODE, f"sender claims our own node name {hb.node!r}")

    def _check_replay(self, hb: Heartbeat, mac: bytes, fresh: bool) -> None:
        if hb.boot_id == self._peer_boot:
            if hb.seq == self._peer_seq and hmac.compare_digest(mac, self._peer_mac):
                raise Rejected(Reject.DUPLICATE, f"copy of sequence {hb.seq}")
            if hb.seq <= self._peer_seq:
                raise Rejected(Reject.REPLAY, f"sequence {hb.seq} not newer than {self._peer_seq}")
        elif hb.boot_id in self._retired_boots:
            raise Rejected(Reject.REPLAY, f"boot {hb.boot_id:#x} of {hb.node!r} was superseded "
                           f"by boot {self._peer_boot:#x}")
        elif (self._peer_boot is not None and hb.send_time_ns <= self._peer_send_ns
              and not fresh):  # a fresh echo proves a new boot new, whatever its clock says
            raise Rejected(Reject.REPLAY, f"boot {hb.boot_id:#x} is older than the current "
                           f"boot {self._peer_boot:#x} of {hb.node!r}")
