"""The fuzz targets of the datagram parsers: bytes from the network into the real code.

Every target takes one fuzz input, splits it at each b"VIPD" into datagrams (a captured
run of consecutive datagrams is one input: replay, duplicate and freshness rules are
reached too), and feeds them in order to a fresh receiver, as the runtime would:

    heartbeat       Session.open of a node (what Driver._open calls for its peer)
    witness         Witness.receive of the witness (vipd/witness.py feeds it every datagram)
    witness-client  WitnessClient.open of a node (Driver._open, for a witness's address)

The plain targets re-seal every datagram with the right key first (the MAC over the
mutated bytes, under the key id the datagram names, when that key is loaded), so the
mutations reach the decoder behind the MAC; the ``-raw`` ones feed the bytes as they are
(framing, unknown keys and bad MACs). The key ring is the lab key of the captured corpus
(tests/fuzz/corpus/lab.json) plus a second key id.

Invariants (a violation raises `Violation`, anything else unexpected propagates):
  * Session.open and WitnessClient.open raise nothing but `Rejected` (all that
    Driver._open catches); Witness.receive raises nothing at all;
  * an accepted datagram is exactly the bytes `encode` makes of what it decoded to: no
    byte under the MAC is ignored or read two ways;
  * every reply of the witness is a VOTE_REPLY of the request's cluster, signed with a
    loaded key, echoing that request.

Imports vipd at the top: the atheris runner (simulations/fuzz.py) imports this module
inside `atheris.instrument_imports`, so the vipd code is what gets instrumented.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from vipd.arbiter.witness_client import WitnessClient
from vipd.core.protocol import (
    HEADER_SIZE,
    MAC_SIZE,
    MAGIC,
    Advert,
    Flag,
    KeyRing,
    Kind,
    Rejected,
    Session,
    State,
    decode,
    encode,
    peek_names,
)
from vipd.core.witness import ClusterSpec, Witness

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "corpus"
MAX_DATAGRAMS = 8  # per input
MAX_SEALED = 32  # own heartbeats sealed first, so that an echo can find one of them
NOW = 1000.0  # monotonic seconds of the first datagram; the next ones 20 ms apart
STEP = 0.02
DIGEST = b"\0" * 8
_SEND_TIME = slice(32, 40)  # header field send_time_ns (docs/protocol.md)
_ECHO_BOOT = slice(60, 68)
_ECHO_SEQ = slice(68, 76)


class Violation(AssertionError):
    """A fuzz input broke one of the invariants in the module docstring."""


class Lab:
    """The captured pair's names and key ring (tests/fuzz/corpus/lab.json)."""

    def __init__(self, path: Path = CORPUS / "lab.json") -> None:
        meta = json.loads(path.read_text())
        keys = {int(k): bytes.fromhex(v) for k, v in meta["keys"].items()}
        # a second key id, so that datagrams re-sealed under it reach the decoder too
        keys.setdefault(max(keys) + 1, hashlib.sha256(b"fuzz" + keys[max(keys)]).digest())
        self.keys = KeyRing(keys)
        self.secrets = keys
        self.cluster: str = meta["cluster"]
        self.nodes: list[str] = meta["nodes"]
        self.witness: str = meta["witness"]
        self.peer_source: str = meta["peer_source"]
        self.witness_source: str = meta["witness_source"]


def datagrams(data: bytes) -> list[bytes]:
    """The datagrams of one input: split at each MAGIC when it starts with one, else the
    whole input as one (framing garbage)."""
    if not data.startswith(MAGIC):
        return [data]
    return [MAGIC + part for part in data.split(MAGIC)[1:MAX_DATAGRAMS + 1]]


def reseal(datagram: bytes, keys: KeyRing) -> bytes:
    """The datagram with its last MAC_SIZE bytes replaced by the right MAC over the
    rest, under the key id its header names (unchanged if that key is not loaded)."""
    if len(datagram) < 12 or len(datagram) <= MAC_SIZE:
        return datagram
    body = datagram[:-MAC_SIZE]
    mac = keys.mac(int.from_bytes(datagram[8:12], "big"), body)
    return datagram if mac is None else body + mac


def _field(datagram: bytes, where: slice) -> int:
    return int.from_bytes(datagram[where], "big") if len(datagram) >= HEADER_SIZE else 0


def _wall_ns(first: bytes) -> int:
    """Our wall clock: 100 ms after the first datagram's send time, as a real clock
    reads it (a 2**64 - 1 send time is far from any clock, and would not fit ours)."""
    return min(_field(first, _SEND_TIME) + 100_000_000, 2**63)


def _check_round_trip(lab: Lab, datagram: bytes) -> None:
    hb = decode(datagram, lab.keys)
    again = encode(hb, lab.secrets[hb.key_id])
    if again != datagram:
        raise Violation(f"accepted {datagram.hex()} but it re-encodes to {again.hex()}")


def _advert() -> Advert:
    return Advert(state=State.STANDBY, flags=Flag.HEALTHY, term=1, priority=100,
                  effective_priority=100)


class Target:
    """One fuzz target: ``run(data)`` feeds one input to a fresh receiver."""

    def __init__(self, lab: Lab, sealed: bool) -> None:
        self.lab = lab
        self.sealed = sealed

    def prepare(self, data: bytes) -> list[bytes]:
        found = datagrams(data)
        return [reseal(d, self.lab.keys) for d in found] if self.sealed else found

    def run(self, data: bytes) -> None:
        raise NotImplementedError


class HeartbeatTarget(Target):
    """Session.open of the node the first datagram is addressed to."""

    def run(self, data: bytes) -> None:
        lab, found = self.lab, self.prepare(data)
        first = found[0]
        try:
            sender = peek_names(first)[1]
        except Rejected:
            sender = lab.nodes[0]
        me = lab.nodes[1] if sender == lab.nodes[0] else lab.nodes[0]
        session = Session(cluster=lab.cluster, node=me, keys=lab.keys,
                          boot_id=_field(first, _ECHO_BOOT), digest=DIGEST,
                          peer_sources={lab.peer_source})
        wall_ns = _wall_ns(first)
        for i in range(min(_field(first, _ECHO_SEQ), MAX_SEALED)):
            session.seal(_advert(), NOW - 0.5 + i * STEP / MAX_SEALED, wall_ns)
        for i, datagram in enumerate(found):
            now = NOW + i * STEP
            try:
                session.open(datagram, now, wall_ns + round(i * STEP * 1e9), lab.peer_source)
            except Rejected:
                continue
            _check_round_trip(lab, datagram)


class WitnessTarget(Target):
    """Witness.receive of a witness serving the lab's cluster."""

    def run(self, data: bytes) -> None:
        lab, found = self.lab, self.prepare(data)
        witness = Witness(lab.witness, boot_id=_field(found[0], _ECHO_BOOT) or 1)
        witness.configure({lab.cluster: ClusterSpec(lab.keys, frozenset(lab.nodes))}, 0.0)
        wall_ns = _wall_ns(found[0])
        for i, datagram in enumerate(found):
            source = (lab.peer_source, 5405)
            replies = witness.receive(datagram, source, NOW + i * STEP,
                                      wall_ns + round(i * STEP * 1e9))
            witness.take_notices()
            for reply, to in replies:
                self._check_reply(datagram, reply, to, source)

    def _check_reply(self, request: bytes, reply: bytes, to: object, source: object) -> None:
        asked = decode(request, self.lab.keys)  # a reply means it got past the MAC
        answer = decode(reply, self.lab.keys)
        if (to != source or answer.kind is not Kind.VOTE_REPLY
                or answer.cluster != asked.cluster or answer.vote is None
                or (answer.echo_boot, answer.echo_seq) != (asked.boot_id, asked.seq)):
            raise Violation(f"request {request.hex()} answered with {answer} to {to}")


class WitnessClientTarget(Target):
    """WitnessClient.open of a node that has sent vote requests to the lab's witness."""

    def run(self, data: bytes) -> None:
        lab, found = self.lab, self.prepare(data)
        first, source = found[0], lab.witness_source
        client = WitnessClient(
            cluster=lab.cluster, node=lab.nodes[0], keys=lab.keys,
            boot_id=_field(first, _ECHO_BOOT), digest=DIGEST,
            witnesses=[(f"{source}:5406", (source, 5406))], lease=0.32, max_skew=1.0)
        wall_ns = _wall_ns(first)
        for i in range(min(_field(first, _ECHO_SEQ), MAX_SEALED)):
            client.requests(_advert(), False, NOW - 0.5 + i * STEP / MAX_SEALED, wall_ns)
        for i, datagram in enumerate(found):
            try:
                reply = client.open(datagram, source, NOW + i * STEP,
                                    wall_ns + round(i * STEP * 1e9))
            except Rejected:
                continue
            _check_round_trip(lab, datagram)
            if reply.lease <= 0:
                raise Violation(f"accepted a reply with lease {reply.lease}: {datagram.hex()}")


TARGETS: dict[str, tuple[type[Target], bool, str]] = {
    # name: (target, re-seal, its own seed folder under tests/fuzz/corpus)
    "heartbeat": (HeartbeatTarget, True, "heartbeat"),
    "heartbeat-raw": (HeartbeatTarget, False, "heartbeat"),
    "witness": (WitnessTarget, True, "vote_request"),
    "witness-raw": (WitnessTarget, False, "vote_request"),
    "witness-client": (WitnessClientTarget, True, "vote_reply"),
    "witness-client-raw": (WitnessClientTarget, False, "vote_reply"),
}


def target(name: str, lab: Lab | None = None) -> Callable[[bytes], None]:
    """The one-input function of target ``name``."""
    cls, sealed, _ = TARGETS[name]
    return cls(lab or Lab(), sealed).run


def seed_folders(name: str, corpus: Path = CORPUS) -> list[Path]:
    """The target's own seeds first, then the other kinds (a heartbeat sent to a
    witness, a request to a node: the wrong-kind paths)."""
    own = TARGETS[name][2]
    kinds = sorted({folder for _, _, folder in TARGETS.values()} - {own})
    return [corpus / own, *(corpus / kind for kind in kinds)]
