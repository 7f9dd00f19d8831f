"""Heartbeat wire format and session filter (vipd.core.protocol).

Expectations come from docs/protocol.md, not from the code: the reference encoder below
re-derives the byte layout from the documented table, the fixed vectors were computed once
with it, and every rejection reason is provoked with a datagram that is otherwise valid
(re-signed where the check sits behind the MAC), so a missing check fails a test.

Fuzz invariant: decoding arbitrary or mutated bytes never raises anything but `Rejected`,
and no change to an authentic datagram is ever accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
from collections.abc import Hashable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipd.core.protocol import (
    HEADER_SIZE,
    MAC_SIZE,
    Advert,
    Flag,
    Heartbeat,
    KeyRing,
    Received,
    Reject,
    Rejected,
    Session,
    State,
    decode,
    encode,
    peek_names,
    settings_digest,
)

FUZZ = settings(max_examples=200, deadline=None, database=None)

SECRET = bytes(range(32))
SECRET_2 = bytes(range(100, 132))
RING = KeyRing({7: SECRET})
T0 = 1_700_000_000_000_000_000  # wall clock, epoch ns
SKEW_NS = 1_000_000_000  # the default max_skew, 1 s
DIGEST = bytes.fromhex("0011223344556677")
U8, U16, U32, U64 = 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF


# --- reference encoder, written from the layout table in docs/protocol.md ------------------

LAYOUT = "!4sBBHIIQQQQBBH8sQQI"


def ref_body(
    *,
    magic: bytes = b"VIPD",
    version: int = 1,
    state: int = 2,
    flags: int = 0x13,
    key_id: int = 7,
    newest_key_id: int = 9,
    boot_id: int = 0x0123456789ABCDEF,
    seq: int = 42,
    send_time_ns: int = 1_700_000_000_123_456_789,
    term: int = 5,
    priority: int = 150,
    effective_priority: int = 140,
    kind: int = 0,
    digest: bytes = DIGEST,
    echo_boot: int = 0xFEDCBA9876543210,
    echo_seq: int = 41,
    echo_hold_us: int = 2500,
    cluster: bytes = b"web",
    node: bytes = b"vm-a",
    names: bytes | None = None,
) -> bytes:
    header = struct.pack(
        LAYOUT, magic, version, state, flags, key_id, newest_key_id, boot_id, seq,
        send_time_ns, term, priority, effective_priority, kind, digest, echo_boot,
        echo_seq, echo_hold_us,
    )
    if names is None:
        names = bytes([len(cluster)]) + cluster + bytes([len(node)]) + node
    return header + names


def sign(body: bytes, secret: bytes = SECRET) -> bytes:
    return body + hmac.new(secret, body, hashlib.sha256).digest()


# The heartbeat behind VECTOR, and VECTOR = sign(ref_body()) computed once and pasted here.
VECTOR_HB = Heartbeat(
    state=State.ACTIVE, flags=Flag.HEALTHY | Flag.PREEMPT | Flag.PREFERRED, key_id=7,
    newest_key_id=9, boot_id=0x0123456789ABCDEF, seq=42,
    send_time_ns=1_700_000_000_123_456_789, term=5, priority=150, effective_priority=140,
    settings_digest=DIGEST, echo_boot=0xFEDCBA9876543210, echo_seq=41, echo_hold_us=2500,
    cluster="web", node="vm-a",
)
VECTOR = bytes.fromhex(
    "564950440102001300000007000000090123456789abcdef000000000000002a"
    "17979cfe3d85cd150000000000000005968c00000011223344556677fedcba98"
    "765432100000000000000029000009c40377656204766d2d61a6d3bf31c11edd"
    "0c77a0edaa6b04c20344f01b120e89dc4fd8e1e8842587a6f4"
)

# Every field at its maximum, 64-character names: the largest valid datagram.
MAX_HB = Heartbeat(
    state=State.STOPPED, flags=Flag(U16), key_id=U32, newest_key_id=U32, boot_id=U64,
    seq=U64, send_time_ns=U64, term=U64, priority=U8, effective_priority=U8,
    settings_digest=b"\xff" * 8, echo_boot=U64, echo_seq=U64, echo_hold_us=U32,
    cluster="c" * 64, node="n" * 64,
)
MAX_VECTOR = bytes.fromhex(
    "564950440105ffffffffffffffffffffffffffffffffffffffffffffffffffff"
    "ffffffffffffffffffffffffffffffffffff0000ffffffffffffffffffffffff"
    "ffffffffffffffffffffffffffffffff40636363636363636363636363636363"
    "6363636363636363636363636363636363636363636363636363636363636363"
    "6363636363636363636363636363636363406e6e6e6e6e6e6e6e6e6e6e6e6e6e"
    "6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e"
    "6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e6e9d1aa778b7a3d6f4e644f0c430d4"
    "d76b61a7cb417c0bee461f04b66d8a6e28e0"
)
MAX_RING = KeyRing({U32: SECRET})


def rejection(data: bytes, keys: KeyRing = RING) -> Reject:
    with pytest.raises(Rejected) as info:
        decode(data, keys)
    return info.value.reason


# --- fixed vectors ------------------------------------------------------------------------

def test_header_is_80_bytes() -> None:
    assert HEADER_SIZE == 80 == struct.calcsize(LAYOUT)


def test_vector_is_the_documented_layout() -> None:
    assert sign(ref_body()) == VECTOR
    assert len(VECTOR) == 80 + (1 + 3) + (1 + 4) + 32


def test_encode_matches_fixed_vector() -> None:
    assert encode(VECTOR_HB, SECRET) == VECTOR


def test_decode_fixed_vector() -> None:
    hb = decode(VECTOR, KeyRing({7: SECRET}))
    assert hb == VECTOR_HB
    assert hb.flags == Flag.HEALTHY | Flag.PREEMPT | Flag.PREFERRED
    assert hb.state is State.ACTIVE


def test_max_vector_round_trips_at_documented_size() -> None:
    assert len(MAX_VECTOR) == 80 + 65 + 65 + 32 == 242
    assert encode(MAX_HB, SECRET) == MAX_VECTOR
    assert decode(MAX_VECTOR, MAX_RING) == MAX_HB


@pytest.mark.parametrize(("offset", "raw"), [
    (0, b"VIPD"),                                   # magic
    (4, b"\x01"),                                   # version
    (5, b"\x02"),                                   # state ACTIVE
    (6, b"\x00\x13"),                               # flags, big-endian u16
    (8, (7).to_bytes(4, "big")),                    # key id
    (12, (9).to_bytes(4, "big")),                   # newest key id
    (16, bytes.fromhex("0123456789abcdef")),        # boot id
    (24, (42).to_bytes(8, "big")),                  # sequence
    (32, (1_700_000_000_123_456_789).to_bytes(8, "big")),  # send time ns
    (40, (5).to_bytes(8, "big")),                   # term
    (48, b"\x96"),                                  # priority 150
    (49, b"\x8c"),                                  # effective priority 140
    (50, b"\x00\x00"),                              # kind
    (52, DIGEST),                                   # settings digest
    (60, bytes.fromhex("fedcba9876543210")),        # echo boot
    (68, (41).to_bytes(8, "big")),                  # echo sequence
    (76, (2500).to_bytes(4, "big")),                # echo hold, microseconds
    (80, b"\x03web"),                               # cluster, length-prefixed
    (84, b"\x04vm-a"),                              # node, length-prefixed
])
def test_field_offsets(offset: int, raw: bytes) -> None:
    assert VECTOR[offset:offset + len(raw)] == raw


def test_mac_is_hmac_sha256_over_everything_before_it() -> None:
    body, mac = VECTOR[:-32], VECTOR[-32:]
    assert mac == hmac.new(SECRET, body, hashlib.sha256).digest()


# --- round trip ---------------------------------------------------------------------------

NAME = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-",
    min_size=1, max_size=64,
)


def u(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


HEARTBEATS = st.builds(
    Heartbeat,
    state=st.sampled_from(State), flags=u(16), key_id=st.integers(1, U32),
    newest_key_id=u(32), boot_id=u(64), seq=u(64), send_time_ns=u(64), term=u(64),
    priority=u(8), effective_priority=u(8), settings_digest=st.binary(min_size=8, max_size=8),
    echo_boot=u(64), echo_seq=u(64), echo_hold_us=u(32), cluster=NAME, node=NAME,
)


@FUZZ
@given(hb=HEARTBEATS)
def test_round_trip(hb: Heartbeat) -> None:
    data = encode(hb, SECRET)
    back = decode(data, KeyRing({hb.key_id: SECRET}))
    assert back == hb
    assert int(back.flags) == int(hb.flags)
    assert isinstance(back.flags, Flag)
    assert back.state is hb.state
    assert len(data) == 80 + 1 + len(hb.cluster) + 1 + len(hb.node) + 32


# --- encode contract ----------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"node": "n" * 65},
    {"node": ""},
    {"cluster": "wéb"},
    {"priority": 256},
    {"seq": -1},
    {"key_id": U32 + 1},
    {"settings_digest": b"\x00" * 7},
    {"settings_digest": b"\x00" * 9},
], ids=["long-node", "empty-node", "non-ascii", "priority", "seq", "key-id",
        "short-digest", "long-digest"])
def test_encode_raises_value_error_for_out_of_range_fields(change: dict[str, Any]) -> None:
    # encode's docstring: "Raises ValueError (a programming error) for out-of-range fields".
    with pytest.raises(ValueError):
        encode(replace(VECTOR_HB, **change), SECRET)


# --- rejections by decode -----------------------------------------------------------------

def test_oversize() -> None:
    assert rejection(VECTOR + b"\x00" * (513 - len(VECTOR))) is Reject.OVERSIZE
    assert rejection(b"\x00" * 4096) is Reject.OVERSIZE


def test_512_bytes_is_not_oversize() -> None:
    # at the limit the size check passes and the structure check (trailing bytes) decides
    assert rejection(VECTOR + b"\x00" * (512 - len(VECTOR))) is Reject.MALFORMED


@pytest.mark.parametrize("length", [0, 1, 4, 5, 79, 80, 81, 115, 88, 120])
def test_truncated_is_malformed(length: int) -> None:
    assert rejection(VECTOR[:length]) is Reject.MALFORMED


def test_bad_magic_is_malformed() -> None:
    assert rejection(sign(ref_body(magic=b"VIPE"))) is Reject.MALFORMED
    assert rejection(b"\x00" * len(VECTOR)) is Reject.MALFORMED


@pytest.mark.parametrize("names", [
    b"\x00\x04vm-a",                      # empty cluster
    b"\x03web\x00",                       # empty node
    b"\x41" + b"c" * 65 + b"\x04vm-a",    # 65-character cluster
    b"\x03web\x41" + b"n" * 65,           # 65-character node
    b"\x03web\x05vm-a",                   # node length runs into the MAC
    b"\x40web\x04vm-a",                   # cluster length runs past the datagram
    b"\x03web\x04vm-a\x00",               # trailing byte before the MAC
    b"\x03web\x04vm-aXYZ",                # trailing bytes before the MAC
    b"\x03w\xe9b\x04vm-a",                # non-ASCII cluster
    b"\x03web\x04vm-\xff",                # non-ASCII node
], ids=["empty-cluster", "empty-node", "long-cluster", "long-node", "node-overruns",
        "cluster-overruns", "trailing-byte", "trailing-bytes", "non-ascii-cluster",
        "non-ascii-node"])
def test_bad_names_are_malformed_even_when_signed(names: bytes) -> None:
    assert rejection(sign(ref_body(names=names))) is Reject.MALFORMED


@pytest.mark.parametrize("names", [b"\x40web\x04vm-a", b"\x03web\x40vm-a"])
def test_name_overrunning_an_ascii_mac_is_malformed(names: bytes) -> None:
    # a MAC that happens to be ASCII must not be read as part of a name (nor past the end)
    assert rejection(ref_body(names=names) + b"A" * 32) is Reject.MALFORMED


@pytest.mark.parametrize("names", [
    b"\x00\x04vm-a", b"\x03web\x00", b"\x41" + b"c" * 65 + b"\x04vm-a",
    b"\x03web\x41" + b"n" * 65, b"\x03web\x05vm-a", b"\x40web\x04vm-a",
    b"\x03w\xe9b\x04vm-a", b"\x03web\x04vm-\xff",
], ids=["empty-cluster", "empty-node", "long-cluster", "long-node", "node-overruns",
        "cluster-overruns", "non-ascii-cluster", "non-ascii-node"])
def test_peek_names_refuses_the_name_framing_decode_refuses(names: bytes) -> None:
    data = sign(ref_body(names=names))
    with pytest.raises(Rejected) as info:
        peek_names(data)
    assert info.value.reason is Reject.MALFORMED is rejection(data)


def test_peek_names_reads_the_names_without_a_key() -> None:
    forged = VECTOR[:-1] + bytes([VECTOR[-1] ^ 1])  # the MAC is not its business
    assert peek_names(VECTOR) == peek_names(forged) == ("web", "vm-a")
    assert peek_names(sign(ref_body(names=b"\x02db\x04db-1", kind=1) + bytes(12))) == \
        ("db", "db-1")


@pytest.mark.parametrize(("data", "reason"), [
    (VECTOR[:115], Reject.MALFORMED), (b"VIPE" + VECTOR[4:], Reject.MALFORMED),
    (VECTOR + bytes(512 - len(VECTOR) + 1), Reject.OVERSIZE),
    (VECTOR[:4] + b"\x02" + VECTOR[5:], Reject.BAD_VERSION),
], ids=["truncated", "magic", "oversize", "version"])
def test_peek_names_refuses_bad_framing(data: bytes, reason: Reject) -> None:
    with pytest.raises(Rejected) as info:
        peek_names(data)
    assert info.value.reason is reason


@pytest.mark.parametrize("state", [6, 7, 0x80, 0xFF])
def test_unknown_state_is_malformed_even_when_signed(state: int) -> None:
    assert rejection(sign(ref_body(state=state))) is Reject.MALFORMED


@pytest.mark.parametrize("kind", [1, 2, 0x8000, 0xFFFF])
def test_vote_kind_without_vote_block_is_malformed_even_when_signed(kind: int) -> None:
    assert rejection(sign(ref_body(kind=kind))) is Reject.MALFORMED


def test_valid_reference_datagram_is_accepted() -> None:
    # the control for the three tests above: only the mutated field makes them fail
    assert decode(sign(ref_body(state=5, kind=0)), RING).state is State.STOPPED


@pytest.mark.parametrize("version", [0, 2, 0xFF])
def test_bad_version(version: int) -> None:
    assert rejection(sign(ref_body(version=version))) is Reject.BAD_VERSION


def test_unknown_key() -> None:
    assert rejection(sign(ref_body(key_id=8))) is Reject.UNKNOWN_KEY
    assert rejection(VECTOR, KeyRing({1: SECRET})) is Reject.UNKNOWN_KEY


def test_key_id_selects_the_secret() -> None:
    # signed with key 7's secret but claiming key 1: the MAC must be checked with key 1
    assert rejection(sign(ref_body(key_id=1)), KeyRing({1: SECRET_2, 7: SECRET})) \
        is Reject.BAD_MAC


@pytest.mark.parametrize("bit", [0, 5 * 8 + 1, 48 * 8, 82 * 8 + 2, (len(VECTOR) - 33) * 8])
def test_flipped_bit_in_body_is_bad_mac(bit: int) -> None:
    data = bytearray(VECTOR)
    data[bit // 8] ^= 1 << (bit % 8)
    # bit 0 is in the magic, the others leave the structure intact
    expected = Reject.MALFORMED if bit < 32 else Reject.BAD_MAC
    assert rejection(bytes(data)) is expected


@pytest.mark.parametrize("index", [len(VECTOR) - 32, len(VECTOR) - 17, len(VECTOR) - 1])
def test_flipped_bit_in_mac_is_bad_mac(index: int) -> None:
    data = bytearray(VECTOR)
    data[index] ^= 0x01
    assert rejection(bytes(data)) is Reject.BAD_MAC


def test_wrong_secret_is_bad_mac() -> None:
    assert rejection(VECTOR, KeyRing({7: SECRET_2})) is Reject.BAD_MAC


# --- sessions -----------------------------------------------------------------------------

ADVERT = Advert(state=State.STANDBY, flags=Flag.HEALTHY, term=3, priority=100,
                effective_priority=100)
BOOT_A, BOOT_B = 0xA000_0000_0000_0001, 0xB000_0000_0000_0001


def session(
    node: str,
    boot_id: int,
    keys: KeyRing | None = None,
    *,
    cluster: str = "web",
    peer_sources: list[Hashable] | None = None,
    max_skew: float = 1.0,
) -> Session:
    return Session(cluster=cluster, node=node, keys=keys or KeyRing({1: SECRET}),
                   boot_id=boot_id, digest=DIGEST, peer_sources=peer_sources,
                   max_skew=max_skew)


def refused(
    receiver: Session, data: bytes, wall_ns: int = T0, source: Hashable | None = None
) -> Reject:
    with pytest.raises(Rejected) as info:
        receiver.open(data, 1.0, wall_ns, source)
    return info.value.reason


def test_seal_fills_identity_and_sequence() -> None:
    a = session("vm-a", BOOT_A, KeyRing({1: SECRET, 3: SECRET_2}))
    first = decode(a.seal(ADVERT, 1.0, T0), KeyRing({3: SECRET_2}))
    second = decode(a.seal(ADVERT, 1.1, T0 + 1), KeyRing({3: SECRET_2}))
    assert (first.cluster, first.node, first.boot_id) == ("web", "vm-a", BOOT_A)
    assert (first.key_id, first.newest_key_id) == (3, 3)
    assert (first.seq, second.seq) == (1, 2)
    assert (first.send_time_ns, second.send_time_ns) == (T0, T0 + 1)
    assert first.settings_digest == DIGEST
    assert (first.state, first.flags, first.term) == (State.STANDBY, Flag.HEALTHY, 3)
    assert (first.priority, first.effective_priority) == (100, 100)
    assert (first.echo_boot, first.echo_seq, first.echo_hold_us) == (0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(state=st.sampled_from([State.STANDBY, State.ACTIVE, State.FAULT]),
       flags=st.integers(min_value=0, max_value=(1 << 9) - 1),
       term=st.integers(min_value=0, max_value=2**64 - 1),
       priority=st.integers(min_value=0, max_value=255),
       wall_ns=st.integers(min_value=0, max_value=2**64 - 1),
       secret=st.binary(min_size=32, max_size=100))
def test_seal_makes_the_bytes_encode_makes(state: State, flags: int, term: int,
                                           priority: int, wall_ns: int,
                                           secret: bytes) -> None:
    """seal packs and signs directly (precomputed HMAC state) for speed; it must stay
    byte for byte what the reference `encode` makes of the same heartbeat, whose MAC is
    the standard library's one-shot HMAC-SHA256."""
    keys = KeyRing({7: secret})
    a, b = session("vm-a", BOOT_A, keys), session("vm-b", BOOT_B, keys)
    a.open(b.seal(ADVERT, 1.0, T0), 1.002, T0)  # so that the echo fields are set
    advert = Advert(state=state, flags=Flag(flags), term=term, priority=priority,
                    effective_priority=priority)
    data = a.seal(advert, 1.0125, wall_ns)
    hb = decode(data, keys)
    assert data == encode(hb, secret)
    assert data[-MAC_SIZE:] == hmac.new(secret, data[:-MAC_SIZE], hashlib.sha256).digest()
    assert (hb.echo_boot, hb.echo_seq, hb.echo_hold_us) == (BOOT_B, 1, 10500)


def test_open_accepts_a_valid_heartbeat() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    rx = b.open(a.seal(ADVERT, 5.0, T0), 5.001, T0 + 1_000_000)
    assert isinstance(rx, Received)
    assert rx.received_at == 5.001
    assert (rx.heartbeat.node, rx.heartbeat.seq) == ("vm-a", 1)
    assert b.peer_node == "vm-a"


def test_wrong_cluster() -> None:
    other = session("vm-a", BOOT_A, cluster="db")
    assert refused(session("vm-b", BOOT_B), other.seal(ADVERT, 1.0, T0)) \
        is Reject.WRONG_CLUSTER


def test_own_node_name() -> None:
    """A reflection of our own datagram (our boot id) is a plain rejection, whatever its
    age; so is an old datagram of another boot with our name (a replay of an earlier run
    of ours)."""
    b = session("vm-b", BOOT_B)
    assert refused(b, b.seal(ADVERT, 1.0, T0)) is Reject.OWN_NODE
    assert refused(b, b.seal(ADVERT, 1.1, T0 - 5 * SKEW_NS)) is Reject.OWN_NODE
    earlier_run = session("vm-b", BOOT_A)
    assert refused(b, earlier_run.seal(ADVERT, 1.0, T0 - SKEW_NS - 1)) is Reject.OWN_NODE


def test_a_live_second_node_with_our_name_is_a_duplicate() -> None:
    """Another boot, sent within the skew window from a configured peer address: a second
    live node configured with our name. The detail names its address and both boots."""
    b = session("vm-b", BOOT_B, peer_sources=["198.51.100.1"])
    twin = session("vm-b", BOOT_A)
    with pytest.raises(Rejected) as info:
        b.open(twin.seal(ADVERT, 1.0, T0 + SKEW_NS), 1.0, T0, "198.51.100.1")
    assert info.value.reason is Reject.DUPLICATE_NODE
    assert "198.51.100.1" in info.value.detail and "'vm-b'" in info.value.detail
    assert f"{BOOT_A:#x}" in info.value.detail and f"{BOOT_B:#x}" in info.value.detail
    # from anywhere else it is never looked at
    assert refused(b, twin.seal(ADVERT, 1.1, T0), source="198.51.100.9") is Reject.UNKNOWN_PEER


def test_unknown_source() -> None:
    b = session("vm-b", BOOT_B, peer_sources=[("198.51.100.1", 5405)])
    data = session("vm-a", BOOT_A).seal(ADVERT, 1.0, T0)
    assert refused(b, data, source=("198.51.100.9", 5405)) is Reject.UNKNOWN_PEER
    assert refused(b, data, source=("198.51.100.1", 5406)) is Reject.UNKNOWN_PEER
    assert b.open(data, 1.0, T0, ("198.51.100.1", 5405)).heartbeat.node == "vm-a"


def test_second_node_name_after_first_peer() -> None:
    b = session("vm-b", BOOT_B)
    b.open(session("vm-a", BOOT_A).seal(ADVERT, 1.0, T0), 1.0, T0)
    assert refused(b, session("vm-c", BOOT_A + 1).seal(ADVERT, 1.1, T0 + 1)) \
        is Reject.UNKNOWN_PEER
    assert b.peer_node == "vm-a"


@pytest.mark.parametrize(("offset_ns", "accepted"), [
    (-SKEW_NS - 1, False),         # sent more than 1 s ago
    (-SKEW_NS, True),              # exactly at the boundary
    (0, True),
    (SKEW_NS, True),
    (SKEW_NS + 1, False),          # sent more than 1 s in our future
    (-3600 * SKEW_NS, False),
    (U64 - T0, False),
])
def test_freshness_window(offset_ns: int, accepted: bool) -> None:
    data = session("vm-a", BOOT_A).seal(ADVERT, 1.0, T0 + offset_ns)
    b = session("vm-b", BOOT_B)
    if accepted:
        assert b.open(data, 1.0, T0).heartbeat.send_time_ns == T0 + offset_ns
    else:
        assert refused(b, data, T0) is Reject.STALE


def test_freshness_window_follows_max_skew() -> None:
    data = session("vm-a", BOOT_A).seal(ADVERT, 1.0, T0)
    assert refused(session("vm-b", BOOT_B, max_skew=0.25), data, T0 + 250_000_001) \
        is Reject.STALE
    assert session("vm-b", BOOT_B, max_skew=0.25).open(data, 1.0, T0 + 250_000_000)


# --- freshness by the echo: wall clocks need not agree --------------------------------------

HOUR_NS = 3600 * SKEW_NS


def exchange(a: Session, b: Session, now: float, a_wall: int, b_wall: int) -> tuple[Any, Any]:
    """a sends to b, b answers a, each stamped with its own wall clock."""
    rx_b = b.open(a.seal(ADVERT, now, a_wall), now + 0.001, b_wall)
    rx_a = a.open(b.seal(ADVERT, now + 0.001, b_wall), now + 0.002, a_wall)
    return rx_b, rx_a


@pytest.mark.parametrize("step_ns", [3 * SKEW_NS, -3 * SKEW_NS, HOUR_NS, -HOUR_NS])
def test_a_wall_clock_step_on_one_node_keeps_the_pair_talking(step_ns: int) -> None:
    """Datagrams that echo a heartbeat we sent within max_skew are fresh by construction:
    a step of one node's clock (NTP, a resumed VM) changes the offset, not acceptance."""
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    exchange(a, b, 1.0, T0, T0)
    exchange(a, b, 1.04, T0, T0)
    for i in range(5):
        now = 1.1 + 0.04 * i
        rx_b, rx_a = exchange(a, b, now, T0 + round(now * 1e9),
                              T0 + round(now * 1e9) + step_ns)
        assert rx_b.confirmed and rx_a.confirmed
    assert b.clock_offset == pytest.approx(-step_ns / 1e9, abs=0.01)
    assert a.clock_offset == pytest.approx(step_ns / 1e9, abs=0.01)


def test_the_learned_offset_judges_datagrams_without_a_fresh_echo() -> None:
    """Over a one-way link (or at start) there is no fresh echo: the send time is judged
    against our clock corrected by the offset learned while the echo worked."""
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    ahead = HOUR_NS
    # Both fresh, an hour apart: a's first datagram is stale to b, which echoes it; b's
    # answer is then fresh to a, and a's next one fresh to b.
    assert refused(b, a.seal(ADVERT, 1.0, T0 + ahead), T0) is Reject.STALE
    assert a.open(b.seal(ADVERT, 1.01, T0), 1.02, T0 + ahead).confirmed
    assert b.open(a.seal(ADVERT, 1.03, T0 + ahead), 1.04, T0).confirmed
    assert b.clock_offset == pytest.approx(3600, abs=0.05)
    assert a.clock_offset == pytest.approx(-3600, abs=0.05)
    # b stops hearing a's answers... a keeps echoing b's last heartbeat, which ages
    later = a.seal(ADVERT, 3.0, T0 + ahead + 2 * SKEW_NS)
    assert b.open(later, 3.0, T0 + 2 * SKEW_NS).heartbeat.seq == 3
    too_old = a.seal(ADVERT, 4.0, T0 + ahead + 2 * SKEW_NS)  # sent "2 s ago" by a's clock
    with pytest.raises(Rejected) as info:
        b.open(too_old, 4.0, T0 + 4 * SKEW_NS + 1)
    assert info.value.reason is Reject.STALE


def test_an_old_echo_does_not_make_a_datagram_fresh() -> None:
    """A datagram delayed (or queued while we were paused) for longer than max_skew echoes
    an old heartbeat of ours: it is judged by its send time and dropped as stale."""
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    b.open(a.seal(ADVERT, 1.0, T0), 1.0, T0)
    delayed = b.seal(ADVERT, 1.01, T0 + 10_000_000)  # echoes a's seq 1, sent at 1.0
    with pytest.raises(Rejected) as info:
        a.open(delayed, 1.0 + 3.0, T0 + 3 * SKEW_NS)
    assert info.value.reason is Reject.STALE


def test_a_fresh_receiver_echoes_a_stale_datagram_so_the_peer_can_prove_freshness() -> None:
    """b restarted and its clock is an hour behind a's and behind its own previous run:
    a refuses b's new boot by send time, b refuses a's datagrams as stale. b echoes the
    stale datagram without accepting it; a's answer to that echo is fresh, and a accepts
    b's new boot once b's heartbeat echoes a heartbeat a sent just now."""
    a, b_old = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    exchange(a, b_old, 1.0, T0, T0)
    b = session("vm-b", BOOT_B + 1)
    behind = T0 - HOUR_NS
    assert refused(a, b.seal(ADVERT, 2.0, behind), T0) is Reject.STALE
    with pytest.raises(Rejected) as info:
        b.open(a.seal(ADVERT, 2.01, T0), 2.01, behind)
    assert info.value.reason is Reject.STALE
    rx_a = a.open(b.seal(ADVERT, 2.02, behind), 2.03, T0)  # echoes a's seq 2
    assert rx_a.confirmed and rx_a.heartbeat.boot_id == BOOT_B + 1
    rx_b = b.open(a.seal(ADVERT, 2.04, T0), 2.05, behind)
    assert rx_b.confirmed and b.clock_offset == pytest.approx(3600, abs=0.05)


def test_a_stale_datagram_is_not_echoed_once_something_was_accepted() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    b.open(a.seal(ADVERT, 1.0, T0), 1.0, T0)
    assert refused(b, a.seal(ADVERT, 1.1, T0 + 5 * SKEW_NS), T0) is Reject.STALE
    echoed = decode(b.seal(ADVERT, 1.2, T0), KeyRing({1: SECRET}))
    assert (echoed.echo_boot, echoed.echo_seq) == (BOOT_A, 1)


def test_lower_sequence_is_replay() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    d1, d2, d3 = (a.seal(ADVERT, 1.0, T0 + i) for i in range(3))
    b.open(d1, 1.0, T0)
    b.open(d3, 1.0, T0)
    assert refused(b, d2) is Reject.REPLAY
    assert refused(b, d1) is Reject.REPLAY


def test_same_sequence_with_other_content_is_replay() -> None:
    b = session("vm-b", BOOT_B)
    fields: dict[str, Any] = {"state": 1, "key_id": 1, "newest_key_id": 1, "boot_id": BOOT_A,
                              "seq": 7, "send_time_ns": T0, "cluster": b"web", "node": b"vm-a"}
    b.open(sign(ref_body(term=1, **fields)), 1.0, T0)
    assert refused(b, sign(ref_body(term=2, **fields))) is Reject.REPLAY


def test_exact_copy_is_duplicate_not_replay() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    data = a.seal(ADVERT, 1.0, T0)
    b.open(data, 1.0, T0)
    assert refused(b, data) is Reject.DUPLICATE
    assert refused(b, data) is Reject.DUPLICATE
    assert b.open(a.seal(ADVERT, 1.1, T0 + 1), 1.1, T0).heartbeat.seq == 2


def test_copy_of_an_older_datagram_is_replay() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    d1, d2 = a.seal(ADVERT, 1.0, T0), a.seal(ADVERT, 1.1, T0 + 1)
    b.open(d1, 1.0, T0)
    b.open(d2, 1.1, T0)
    assert refused(b, d1) is Reject.REPLAY


def test_sender_restart_new_boot_restarts_sequence() -> None:
    b = session("vm-b", BOOT_B)
    old = session("vm-a", BOOT_A)
    for i in range(5):
        b.open(old.seal(ADVERT, 1.0, T0 + i), 1.0, T0)
    new = session("vm-a", BOOT_A + 1)
    rx = b.open(new.seal(ADVERT, 2.0, T0 + 10), 2.0, T0)
    assert (rx.heartbeat.boot_id, rx.heartbeat.seq) == (BOOT_A + 1, 1)
    assert b.open(new.seal(ADVERT, 2.1, T0 + 11), 2.1, T0).heartbeat.seq == 2


def test_new_boot_must_be_newer() -> None:
    b = session("vm-b", BOOT_B)
    b.open(session("vm-a", BOOT_A).seal(ADVERT, 1.0, T0), 1.0, T0)
    assert refused(b, session("vm-a", BOOT_A + 1).seal(ADVERT, 1.0, T0)) is Reject.REPLAY
    assert refused(b, session("vm-a", BOOT_A + 2).seal(ADVERT, 1.0, T0 - 1)) is Reject.REPLAY


def test_old_boot_after_newer_boot_is_replay() -> None:
    b = session("vm-b", BOOT_B)
    old, new = session("vm-a", BOOT_A), session("vm-a", BOOT_A + 1)
    old_first = old.seal(ADVERT, 1.0, T0)
    old_delayed = old.seal(ADVERT, 1.005, T0 + 5_000_000)  # never delivered in time
    b.open(old_first, 1.0, T0)
    b.open(new.seal(ADVERT, 1.01, T0 + 10_000_000), 1.01, T0 + 10_000_000)
    assert refused(b, old_delayed, T0 + 20_000_000) is Reject.REPLAY
    assert refused(b, old_first, T0 + 20_000_000) is Reject.REPLAY


def test_replay_of_previous_boot_after_peer_clock_steps_back() -> None:
    # Docs: a new boot id must be newer than anything accepted before. The peer restarted
    # (boot A -> A+1) and its clock is then stepped back 400 ms by NTP, all inside the
    # skew window; an attacker re-injects a datagram of the old boot that we already
    # accepted. It must not be accepted a second time.
    b = session("vm-b", BOOT_B)
    old, new = session("vm-a", BOOT_A), session("vm-a", BOOT_A + 1)
    captured = old.seal(ADVERT, 1.0, T0)
    b.open(captured, 1.0, T0)
    b.open(new.seal(ADVERT, 1.3, T0 + 300_000_000), 1.3, T0 + 300_000_000)
    b.open(new.seal(ADVERT, 1.4, T0 - 100_000_000), 1.4, T0 + 400_000_000)
    assert refused(b, captured, T0 + 500_000_000) is Reject.REPLAY


# --- order of checks ----------------------------------------------------------------------

def test_source_is_filtered_before_parsing() -> None:
    b = session("vm-b", BOOT_B, peer_sources=["peer"])
    assert refused(b, b"\x00" * 600, source="stranger") is Reject.UNKNOWN_PEER


@pytest.mark.parametrize(("data", "expected"), [
    (b"XXXX" + b"\x00" * 600, Reject.OVERSIZE),                         # size before magic
    (b"XXXX\x02" + b"\x00" * 200, Reject.MALFORMED),                    # magic before version
    (sign(ref_body(version=2, key_id=8)), Reject.BAD_VERSION),          # version before key
    (sign(ref_body(version=2, names=b"\x00" * 4)), Reject.BAD_VERSION),  # version first
    (sign(ref_body(key_id=8, names=b"\x00\x04vm-a")), Reject.MALFORMED),  # names before key
    (ref_body(key_id=8) + b"\x00" * 32, Reject.UNKNOWN_KEY),            # key before MAC
    (ref_body(state=9) + b"\x00" * 32, Reject.BAD_MAC),                 # MAC before state
    (ref_body(kind=7) + b"\x00" * 44, Reject.BAD_MAC),                 # MAC before kind
], ids=["size", "magic", "version-key", "version-names", "names-key", "key-mac",
        "mac-state", "mac-kind"])
def test_decode_check_order(data: bytes, expected: Reject) -> None:
    assert rejection(data) is expected


def test_session_check_order() -> None:
    b = session("vm-b", BOOT_B)
    stale = T0 + 10 * SKEW_NS
    # MAC before cluster
    forged = ref_body(key_id=1, cluster=b"db", node=b"vm-a") + b"\x00" * 32
    assert refused(b, forged) is Reject.BAD_MAC
    # cluster before own node, own node before freshness
    assert refused(b, session("vm-b", BOOT_A, cluster="db").seal(ADVERT, 1.0, stale)) \
        is Reject.WRONG_CLUSTER
    assert refused(b, session("vm-b", BOOT_A).seal(ADVERT, 1.0, stale)) is Reject.OWN_NODE
    b.open(session("vm-a", BOOT_A).seal(ADVERT, 1.0, T0), 1.0, T0)
    # own node before peer pin, peer pin before freshness, freshness before replay
    assert refused(b, b.seal(ADVERT, 1.0, T0)) is Reject.OWN_NODE
    assert refused(b, session("vm-c", BOOT_A).seal(ADVERT, 1.0, stale)) is Reject.UNKNOWN_PEER
    assert refused(b, session("vm-a", BOOT_A).seal(ADVERT, 1.0, stale)) is Reject.STALE


def test_rejected_datagrams_leave_the_session_unchanged() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    d1 = a.seal(ADVERT, 1.0, T0)
    d2 = a.seal(ADVERT, 1.1, T0 + 1)
    b.open(d1, 1.0, T0)
    assert refused(b, d2, T0 + 5 * SKEW_NS) is Reject.STALE
    assert b.open(d2, 1.2, T0).heartbeat.seq == 2  # the stale attempt did not consume seq 2


# --- key rotation -------------------------------------------------------------------------

K1, K2 = SECRET, SECRET_2


def deliver(src: Session, dst: Session, now: float) -> Heartbeat:
    wall_ns = T0 + round(now * 1e9)
    return dst.open(src.seal(ADVERT, now, wall_ns), now, wall_ns).heartbeat


def test_keyring_signs_with_newest_key_the_peer_holds() -> None:
    ring = KeyRing({1: K1, 2: K2, 5: K1})
    assert ring.newest_id == 5
    assert ring.ids == [1, 2, 5]
    assert ring.signing_id(None) == 5
    assert ring.signing_id(1) == 1
    assert ring.signing_id(4) == 2
    assert ring.signing_id(9) == 5


@pytest.mark.parametrize("keys", [
    {},
    {1: b"\x00" * 31},
    {0: K1},
    {-1: K1},
    {1 << 32: K1},
    {1: K1, 2: b""},
], ids=["empty", "short", "id-0", "id-negative", "id-too-big", "one-short"])
def test_keyring_validation(keys: dict[int, bytes]) -> None:
    with pytest.raises(ValueError):
        KeyRing(keys)


def test_rotation_new_key_before_hearing_peer() -> None:
    a = session("vm-a", BOOT_A, KeyRing({1: K1}))
    b = session("vm-b", BOOT_B, KeyRing({1: K1, 2: K2}))
    # B has not heard A: it signs with its newest key, which A cannot check yet
    data = b.seal(ADVERT, 1.0, T0)
    assert decode(data, KeyRing({2: K2})).key_id == 2
    assert refused(a, data) is Reject.UNKNOWN_KEY
    # once B hears A advertise newest key 1, it signs with 1
    assert deliver(a, b, 1.1).newest_key_id == 1
    hb = deliver(b, a, 1.2)
    assert (hb.key_id, hb.newest_key_id) == (1, 2)


@pytest.mark.parametrize("first", ["a", "b"])
@pytest.mark.parametrize("remove_first", ["a", "b"])
def test_rotation_without_downtime(first: str, remove_first: str) -> None:
    # Both run with key 1 and hear each other; the operator adds key 2 to one node,
    # reloads it, then the other; later removes key 1 in either order. Every heartbeat
    # in both directions must be accepted throughout.
    nodes = {"a": session("vm-a", BOOT_A, KeyRing({1: K1})),
             "b": session("vm-b", BOOT_B, KeyRing({1: K1}))}
    now = 1.0

    def both_ways() -> tuple[int, int]:
        nonlocal now
        now += 0.1
        a_to_b = deliver(nodes["a"], nodes["b"], now).key_id
        b_to_a = deliver(nodes["b"], nodes["a"], now).key_id
        return a_to_b, b_to_a

    assert both_ways() == (1, 1)
    second = "b" if first == "a" else "a"
    nodes[first].keys = KeyRing({1: K1, 2: K2})
    assert both_ways() == (1, 1)  # the peer does not have key 2 yet
    nodes[second].keys = KeyRing({1: K1, 2: K2})
    ids = both_ways()  # the node reloaded last has heard newest 2 and signs with 2 at once
    assert ids[0 if second == "a" else 1] == 2
    assert both_ways() == (2, 2)
    other = "b" if remove_first == "a" else "a"
    nodes[remove_first].keys = KeyRing({2: K2})
    assert both_ways() == (2, 2)
    nodes[other].keys = KeyRing({2: K2})
    assert both_ways() == (2, 2)
    # a restart after the rotation starts with the new key
    nodes["a"] = session("vm-a", BOOT_A + 1, KeyRing({2: K2}))
    assert both_ways() == (2, 2)


# --- echo and round-trip time -------------------------------------------------------------

def test_echo_gives_send_time_and_rtt() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    b.open(a.seal(ADVERT, 10.0, T0), 10.002, T0)
    reply = b.seal(ADVERT, 10.005, T0)
    hb = decode(reply, KeyRing({1: SECRET}))
    assert (hb.echo_boot, hb.echo_seq) == (BOOT_A, 1)
    assert hb.echo_hold_us == pytest.approx(3000, abs=1)
    rx = a.open(reply, 10.007, T0)
    assert rx.echo_sent_at == 10.0
    assert rx.rtt == pytest.approx(0.004, abs=1e-6)
    assert rx.confirmed


def test_echo_refers_to_the_datagram_the_peer_accepted_last() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    a.seal(ADVERT, 10.0, T0)  # lost
    b.open(a.seal(ADVERT, 10.1, T0 + 1), 10.102, T0)
    a.seal(ADVERT, 10.2, T0 + 2)  # in flight
    rx = a.open(b.seal(ADVERT, 10.205, T0), 10.207, T0)
    assert rx.echo_sent_at == 10.1
    # 2 us: the hold time travels in whole microseconds (its rounding is tested below)
    assert rx.rtt == pytest.approx(0.004, abs=2e-6)


@pytest.mark.parametrize(("received", "sealed", "hold_us"), [
    (10.102, 10.205, 103_000),     # exactly 103 ms
    (10.002, 10.005, 3_000),
    (10.0, 10.0000009, 1),         # 0.9 us rounds to 1, not 0
    (10.0, 10.0000004, 0),
])
def test_echo_hold_is_rounded_to_microseconds(
    received: float, sealed: float, hold_us: int
) -> None:
    # The wire carries the hold in whole microseconds, so the RTT is exact to 0.5 us
    # only if the hold is rounded, not truncated.
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    b.open(a.seal(ADVERT, 10.0, T0), received, T0)
    assert decode(b.seal(ADVERT, sealed, T0), KeyRing({1: SECRET})).echo_hold_us == hold_us


def test_not_confirmed_before_peer_heard_us() -> None:
    a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    rx = a.open(b.seal(ADVERT, 1.0, T0), 1.001, T0)
    assert rx.echo_sent_at is None
    assert rx.rtt is None
    assert not rx.confirmed
    b.open(a.seal(ADVERT, 1.1, T0 + 1), 1.101, T0)
    assert a.open(b.seal(ADVERT, 1.2, T0 + 2), 1.201, T0).confirmed


def test_echo_of_another_boot_is_not_ours() -> None:
    old_a, b = session("vm-a", BOOT_A), session("vm-b", BOOT_B)
    b.open(old_a.seal(ADVERT, 1.0, T0), 1.0, T0)
    new_a = session("vm-a", BOOT_A + 1)
    new_a.seal(ADVERT, 2.0, T0 + 1)  # the new boot's seq 1 too
    rx = new_a.open(b.seal(ADVERT, 2.1, T0 + 2), 2.1, T0)
    assert rx.heartbeat.echo_boot == BOOT_A
    assert rx.echo_sent_at is None
    assert not rx.confirmed


# --- settings digest ----------------------------------------------------------------------

def test_settings_digest() -> None:
    base = settings_digest("web", ["192.0.2.1/32", "2001:db8::1/128"], 0.1, 3)
    assert len(base) == 8
    assert base == settings_digest("web", ["2001:db8::1/128", "192.0.2.1/32"], 0.1, 3)
    variants = [
        settings_digest("db", ["192.0.2.1/32", "2001:db8::1/128"], 0.1, 3),
        settings_digest("web", ["192.0.2.2/32", "2001:db8::1/128"], 0.1, 3),
        settings_digest("web", ["192.0.2.1/32"], 0.1, 3),
        settings_digest("web", ["192.0.2.1/32", "2001:db8::1/128"], 0.2, 3),
        settings_digest("web", ["192.0.2.1/32", "2001:db8::1/128"], 0.1, 4),
    ]
    assert all(len(v) == 8 for v in variants)
    assert len({base, *variants}) == len(variants) + 1


# --- fuzz ---------------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_decode_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(Rejected):
        decode(data, RING)


@FUZZ
@given(data=st.binary(max_size=600))
def test_fuzz_open_arbitrary_bytes(data: bytes) -> None:
    b = session("vm-b", BOOT_B, peer_sources=["peer"])
    with contextlib.suppress(Rejected):
        b.open(data, 1.0, T0, "peer")


@FUZZ
@given(
    state=u(8), flags=u(16), kind=u(16), version=st.sampled_from([1, 1, 1, 2]),
    cluster=st.binary(max_size=70), node=st.binary(max_size=70),
    cluster_len=st.one_of(st.none(), u(8)), node_len=st.one_of(st.none(), u(8)),
    tail=st.binary(max_size=4),
)
def test_fuzz_signed_bodies(
    state: int, flags: int, kind: int, version: int, cluster: bytes, node: bytes,
    cluster_len: int | None, node_len: int | None, tail: bytes,
) -> None:
    # Authentic datagrams with arbitrary field values reach the checks behind the MAC.
    names = (bytes([len(cluster) if cluster_len is None else cluster_len]) + cluster
             + bytes([len(node) if node_len is None else node_len]) + node + tail)
    data = sign(ref_body(state=state, flags=flags, kind=kind, version=version,
                         names=names))
    valid = (
        version == 1 and state <= 5 and kind == 0 and not tail
        and cluster_len in (None, len(cluster)) and node_len in (None, len(node))
        and 1 <= len(cluster) <= 64 and 1 <= len(node) <= 64
        and cluster.isascii() and node.isascii()
    )
    try:
        hb = decode(data, RING)
    except Rejected as exc:
        assert not valid, exc
        assert exc.reason in (Reject.MALFORMED, Reject.BAD_VERSION)
        return
    # wrong length bytes may still frame other valid names; then the parse is canonical
    assert encode(hb, SECRET) == data
    assert peek_names(data) == (hb.cluster, hb.node)  # the witness dispatches on these
    if valid:
        assert (hb.cluster.encode(), hb.node.encode(), int(hb.flags)) == (cluster, node, flags)


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1000)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=400)),
    st.tuples(st.just("splice"), st.integers(0, 1000), st.integers(0, 16),
              st.binary(max_size=16)),
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if op[0] == "flip" and buf:
            buf[op[1] % len(buf)] ^= 1 << op[2]
        elif op[0] == "truncate":
            del buf[op[1] % (len(buf) + 1):]
        elif op[0] == "extend":
            buf += op[1]
        elif op[0] == "splice":
            start = op[1] % (len(buf) + 1)
            buf[start:start + op[2]] = op[3]
    return bytes(buf)


@FUZZ
@given(hb=HEARTBEATS, ops=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_mutated_datagrams_are_rejected(hb: Heartbeat, ops: list[tuple[Any, ...]]) -> None:
    # The sender is vm-a of cluster web and fresh, so Session.open accepts the original.
    hb = replace(hb, cluster="web", node="vm-a", send_time_ns=T0)
    keys = KeyRing({hb.key_id: SECRET})
    original = encode(hb, SECRET)
    mutated = mutate(original, ops)
    receiver = session("vm-b", BOOT_B, keys)
    if mutated == original:
        assert decode(mutated, keys) == hb
        assert receiver.open(mutated, 1.0, T0).heartbeat == hb
        return
    with pytest.raises(Rejected):
        decode(mutated, keys)
    with pytest.raises(Rejected):
        receiver.open(mutated, 1.0, T0)
