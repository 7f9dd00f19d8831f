"""Loss, delay, reordering and duplication on one node's heartbeat path, at the lab's switch.

The kernels here have no ``sch_netem`` (LAB-NOTES.md), so:

* **loss**: an nftables ``bridge`` table in the switch namespace drops the heartbeat
  datagrams (UDP to `vipd.demo.pairlab.PORT`) going from the node's bridge port to its
  peer's or back with ``numgen random mod 10000 < N`` (`set_loss`);
* **delay, reordering, duplication**: the same table drops every heartbeat datagram
  between the two ports (`divert`) and a small forwarder in the switch namespace
  (`Forwarder`, ``python -m simulations.netfaults``) re-sends each one, late, out of
  order or twice, on the other node's port. It reads them with packet sockets on the
  switch's ports, which see a frame on arrival, before the bridge (and the drop rule)
  does. The UDP checksum of a re-sent datagram is zeroed: the sender's veth leaves it
  to an offload that never happens on a re-injected frame, and a receiver silently
  drops a wrong one (a "delay" would become a partition). Start the forwarder first and
  divert once it reads (the heartbeats of that millisecond arrive twice, harmlessly);
  the other way round its start-up is a blackout.

Only the heartbeat path between the two nodes is touched: ARP, the client's probe and
the votes to and from a witness (which use the heartbeat port too) pass as before, so
the oracles keep measuring the daemons, not the lossy link. Everything lives in the
switch namespace (deleted with the lab); `clear` removes the table.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import random
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vipd.demo.lab import Lab
    from vipd.demo.pairlab import PairLab

TABLE = "vipdlab_netfaults"  # apart from Lab.block's table: heal() leaves it alone
HEARTBEAT_PORT = 5405  # vipd.demo.pairlab.PORT (not imported: the forwarder stays stdlib)
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
START_TIMEOUT = 15.0
MODES = {
    "delay": "every heartbeat 200 ms +- 100 ms late (uniform), so they also overtake "
             "each other",
    "reorder": "a quarter of the heartbeats held back 60 ms (more than an interval): the "
               "next one overtakes them",
    "duplicate": "half of the heartbeats delivered twice, the copy right behind",
}


def _rules(node: str, peer: str, verdict: str) -> str:
    """Both directions between the two ports, heartbeat port only: a witness's replies
    come to the same port (vipd sends vote requests from its heartbeat socket) and must
    pass untouched."""
    return "".join(f'add rule bridge {TABLE} forward iifname "{a}" oifname "{b}" udp dport '
                   f'{HEARTBEAT_PORT} {verdict}\n' for a, b in ((node, peer), (peer, node)))


def _table() -> str:
    return (f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n"
            f"add table bridge {TABLE}\n"
            f"add chain bridge {TABLE} forward {{ type filter hook forward priority -190; "
            f"policy accept; }}\n")


def set_loss(lab: Lab, node: str, fraction: float, peer: str = "node2") -> None:
    """Drop that ``fraction`` of the heartbeat datagrams between ``node`` and ``peer``
    (0.05: 5 %, to 0.01 %), each on its own draw, until `clear` (replaces any earlier
    loss or divert)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"loss must be a fraction in 0..1, got {fraction}")
    lab.nft(_table() + _rules(node, peer, f"numgen random mod 10000 < "
                                          f"{round(fraction * 10000)} drop"))


def divert(lab: Lab, node: str, peer: str = "node2") -> None:
    """Drop every heartbeat datagram between ``node`` and ``peer`` at the bridge: a
    `Forwarder` delivers them instead."""
    lab.nft(_table() + _rules(node, peer, "drop"))


def clear(lab: Lab) -> None:
    lab.nft(f"add table bridge {TABLE}\ndelete table bridge {TABLE}\n")


class Forwarder:
    """The forwarder process for one fault: `start` returns once it reads both ports,
    `stop` returns its counts. Runs in the switch namespace, so the lab kills it."""

    def __init__(self, proc: Any, out: Path) -> None:
        self.proc = proc
        self.out = out

    @classmethod
    def start(cls, pair: PairLab, mode: str, seed: int, ports: tuple[str, str] = (
            "node1", "node2")) -> Forwarder:
        if mode not in MODES:
            raise ValueError(f"unknown forwarder mode {mode!r}; expected one of "
                             f"{', '.join(MODES)}")
        out = pair.workdir / f"forwarder-{time.monotonic_ns()}.json"
        argv = [sys.executable, "-m", "simulations.netfaults", str(out), mode, str(seed),
                *ports]
        # cwd: the checkout holding `simulations`, wherever the benchmark was started from
        proc = pair.lab.switch_spawn(*argv, cwd=Path(__file__).resolve().parent.parent)
        from vipd.demo.lab import wait_ready  # here: the forwarder itself stays stdlib

        forwarder = cls(proc, out)
        try:
            wait_ready(proc, f"{out}.ready", "the heartbeat forwarder in the switch namespace",
                       START_TIMEOUT)
        except RuntimeError:
            forwarder.close()
            raise
        return forwarder

    def stop(self) -> dict[str, Any]:
        """Its counts: datagrams read per port, frames sent, copies sent."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(5)
        try:
            if self.proc.returncode != 0:
                raise RuntimeError(f"the heartbeat forwarder failed (exit "
                                   f"{self.proc.returncode}); its counts would be {self.out}")
            counts: dict[str, Any] = json.loads(self.out.read_text())
            return counts
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in (self.out, Path(f"{self.out}.ready")):
            path.unlink(missing_ok=True)


# --- the forwarder (runs in the switch namespace) --------------------------------------------

def _udp_port_filter(port: int) -> bytes:
    """Classic BPF: IPv4, UDP, not a later fragment, destination port ``port``."""
    insns = [
        (0x28, 0, 0, 12),          # ldh [12]          ether type
        (0x15, 0, 7, 0x0800),      # jeq IPv4 else drop
        (0x30, 0, 0, 23),          # ldb [23]          IP protocol
        (0x15, 0, 5, 17),          # jeq UDP else drop
        (0x28, 0, 0, 20),          # ldh [20]          fragment offset
        (0x45, 3, 0, 0x1FFF),      # jset -> drop
        (0xB1, 0, 0, 14),          # ldxb 4*([14]&0xf) IP header length
        (0x48, 0, 0, 16),          # ldh [x+16]        UDP destination port
        (0x15, 1, 0, port),        # jeq port -> accept
        (0x06, 0, 0, 0),           # drop
        (0x06, 0, 0, 0x40000),     # accept
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in insns)


def _packet_socket(ifname: str, port: int) -> tuple[socket.socket, Any]:
    import ctypes

    program = ctypes.create_string_buffer(_udp_port_filter(port))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    fprog = struct.pack("HL", len(program.raw) // 8, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):  # what came in before the filter
        while True:
            sock.recv(65536)
    return sock, program  # the program must outlive the socket's attach call only


def heartbeat(frame: bytes, port: int) -> bool:
    """An IPv4 UDP frame to ``port`` (the filter already says so; cheap to be sure)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return False
    ihl = (frame[14] & 0x0F) * 4
    return len(frame) >= 14 + ihl + 8 and \
        struct.unpack_from("!H", frame, 14 + ihl + 2)[0] == port


def zero_udp_checksum(frame: bytes) -> bytes:
    """The frame with its IPv4 UDP checksum set to 0 ("none", valid for IPv4)."""
    at = 14 + (frame[14] & 0x0F) * 4 + 6
    return frame[:at] + b"\0\0" + frame[at + 2:]


def schedule(mode: str, rng: random.Random) -> list[float]:
    """Delays in s after which to send a datagram's copies (empty: it is dropped)."""
    if mode == "delay":
        return [rng.uniform(0.1, 0.3)]
    if mode == "reorder":
        return [0.06 if rng.random() < 0.25 else 0.0]
    if mode == "duplicate":
        return [0.0, 0.0] if rng.random() < 0.5 else [0.0]
    raise ValueError(f"unknown forwarder mode {mode!r}; expected one of {', '.join(MODES)}")


def forward(out: str, mode: str, seed: int, ports: list[str],
            port: int = HEARTBEAT_PORT) -> None:
    """Until SIGTERM: heartbeats read on one port go out of the other, per ``mode``."""
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    rng = random.Random(seed)
    socks = {name: _packet_socket(name, port) for name in ports}
    other = {socks[a][0]: socks[b][0] for a, b in (ports, ports[::-1])}
    names = {socks[name][0]: name for name in ports}
    counts: dict[str, Any] = {"read": dict.fromkeys(ports, 0), "sent": 0, "copies": 0,
                              "send_errors": 0}
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    seq = 0
    Path(f"{out}.ready").touch()
    while not stop:
        timeout = max(queue[0][0] - time.monotonic(), 0) if queue else 0.5
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select(list(other), [], [], timeout)
        for sock in ready:
            with contextlib.suppress(BlockingIOError):
                while True:
                    frame, addr = sock.recvfrom(65536)
                    if addr[2] == PACKET_OUTGOING or not heartbeat(frame, port):
                        continue
                    counts["read"][names[sock]] += 1
                    now = time.monotonic()
                    delays = schedule(mode, rng)
                    counts["copies"] += max(len(delays) - 1, 0)
                    for delay in delays:
                        seq += 1
                        heapq.heappush(queue, (now + delay, seq, other[sock],
                                               zero_udp_checksum(frame)))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, target, frame = heapq.heappop(queue)
            try:
                target.send(frame)
                counts["sent"] += 1
            except OSError:  # the peer's link down for a moment: a lost datagram
                counts["send_errors"] += 1
    with open(out, "w") as f:
        json.dump(counts, f)


if __name__ == "__main__":
    # python -m simulations.netfaults OUT MODE SEED PORT_A PORT_B
    forward(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:6])
