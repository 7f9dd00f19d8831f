"""The disturbance oracle: who answers ARP for the VIP, who announces it, who holds it.

One small process in the client namespace (`ArpWatch.start`) records, with wall-clock
times, until SIGTERM:

* ``["probe", t]``: it sent an ARP request for the VIP (every 10 ms);
* ``["reply", t, mac]``: an ARP reply for the VIP to one of those requests, with the
  kernel's receive time (SO_TIMESTAMPNS), so a busy machine does not smear it;
* ``["garp", t, mac]``: a gratuitous ARP for the VIP (sender IP == target IP == VIP)
  reached the client: who announced when;
* ``["addr", t, node, held]``: the VIP appeared on or vanished from a node, from a
  netlink socket opened in that node's namespace (the first rows are a dump: the
  state at the start). These have no kernel time stamp; the process is idle enough
  that they are late by well under a millisecond.
* ``["gate", t, node, remaining]`` (with a kernel fence, every GATE_EVERY s per node):
  the node's fence gate for the VIP (vipd/fence.py: the element of the ``arp`` table's
  ``lease4`` set), read with libnftables by a thread inside that node's namespace;
  ``remaining`` is the element's time left in seconds (> 0: open), 0 when the set has
  no element for the VIP (shut), None when there is no fence table (no daemon, or a
  clean stop removed it). ``t`` is the middle of the read (~0.15 ms).

The prober speaks from its own MAC and address (PROBER_MAC, PROBER_IP), not the
client's: replies go to that MAC, which the client's kernel drops (not its own), so the
10 ms probing never rewrites the client's neighbour entry for the VIP. The UDP probe
(`PairLab.start_probe`) then sees what an undisturbed client sees, one that learns the
VIP's MAC from gratuitous ARP and its own occasional ARP only.

`Observations` holds the rows; its methods turn them into the quantities the benchmark
reports (see their docstrings for the exact definitions).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import select
import signal
import socket
import struct
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vipd.demo.lab import enter_netns, run_in_netns, wait_ready
from vipd.fence import FenceError, Nft

if TYPE_CHECKING:
    from vipd.demo.pairlab import PairLab

PROBE_EVERY = 0.010
GATE_EVERY = 0.002
LATE_SAMPLER = 0.02  # a gate unsampled for this long (10 periods): its sampler fell behind
PROBER_MAC = "02:76:64:00:00:fe"  # the lab's hosts are 02:76:64:00:00:0n
PROBER_IP = "198.51.100.250"  # unused by the lab (hosts are .1-.3, the VIP .100)
ETH_P_ARP = 0x0806
ARPOP_REPLY = 2
SO_TIMESTAMPNS = 35  # Linux; Python 3.11's socket module lacks it
PACKET_OUTGOING = 4
RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
IFA_LOCAL = 2
NLMSG_DONE = 3
START_TIMEOUT = 15.0


def _mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def _arp_request(vip: str) -> bytes:
    mac = _mac(PROBER_MAC)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac,
                      socket.inet_aton(PROBER_IP), b"\0" * 6, socket.inet_aton(vip))
    return b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP) + arp


def classify(frame: bytes, vip: bytes) -> tuple[str, str] | None:
    """("garp" | "reply", sender MAC) for the ARP frames the oracle records, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    op, sha, spa, _tha, tpa = struct.unpack("!6xH6s4s6s4s", frame[14:42])
    mac = sha.hex(":")
    if spa == vip and tpa == vip:
        return "garp", mac
    if op == ARPOP_REPLY and spa == vip and tpa == socket.inet_aton(PROBER_IP):
        return "reply", mac
    return None


_NFT_TIME = re.compile(r"(\d+)(ms|d|h|m|s)")
_NFT_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def nft_duration(text: str) -> float:
    """Seconds of an nftables time like ``1s200ms`` or ``290ms``."""
    parts = _NFT_TIME.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not an nftables time: {text!r}")
    return sum(int(n) * _NFT_UNITS[u] for n, u in parts)


def gate_remaining(listing: str, vip: str) -> float:
    """Time left on ``vip``'s element in the output of ``list set``, in seconds: 0 when the
    set holds none (the gate is shut), math.inf for an element without a timeout."""
    found = re.search(r"elements = \{([^}]*)\}", listing)
    if found is None:
        return 0.0
    for element in found.group(1).split(","):
        words = element.split()
        if words and words[0] == vip:
            if "expires" in words[:-1]:
                return nft_duration(words[words.index("expires") + 1])
            return math.inf
    return 0.0


def _sample_gates(ns: str, node: str, table: str, vip: str, every: float,
                  rows: list[list[Any]], stop: threading.Event) -> None:
    """Thread body: read the node's gate every ``every`` s until ``stop``."""
    enter_netns(ns)
    nft = Nft()
    command = f"list set arp {table} lease4"
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            t0 = time.time()
            try:
                left: float | None = gate_remaining(nft.run(command), vip)
            except FenceError:  # no table (yet, or any more)
                left = None
            t1 = time.time()
            rows.append(["gate", (t0 + t1) / 2, node,
                         None if left is None else min(left, 1e9)])
            next_at = max(next_at + every, time.monotonic())
            stop.wait(max(next_at - time.monotonic(), 0))
    finally:
        nft.close()


def _netlink_addr_socket() -> socket.socket:
    """Subscribed to IPv4 address changes, with a dump of the current ones requested."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, RTMGRP_IPV4_IFADDR))
    request = struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0)
    sock.send(struct.pack("=IHHII", 16 + len(request), RTM_GETADDR,
                          NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
    return sock


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, body) of each netlink message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        yield kind, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def _local_address(body: bytes) -> bytes | None:
    """IFA_LOCAL of an address message (ifaddrmsg, then attributes)."""
    attr = 8
    while attr + 4 <= len(body):
        alen, atype = struct.unpack_from("=HH", body, attr)
        if alen < 4:
            return None
        if atype == IFA_LOCAL:
            return body[attr + 4:attr + alen]
        attr += (alen + 3) & ~3
    return None


def address_events(data: bytes, vip: bytes) -> list[bool]:
    """For each message in ``data`` about the VIP: True if added or renewed
    (RTM_NEWADDR), False if removed (RTM_DELADDR, also when its lifetime ran out)."""
    return [kind == RTM_NEWADDR for kind, body in _messages(data)
            if kind in (RTM_NEWADDR, RTM_DELADDR) and _local_address(body) == vip]


def _read_dump(sock: socket.socket, vip: bytes) -> list[bool]:
    """The answer to the dump request: whether the node holds the VIP now."""
    held: list[bool] = []
    while True:
        data = sock.recv(65536)
        held += address_events(data, vip)
        if any(kind == NLMSG_DONE for kind, _ in _messages(data)):
            return held


def _kernel_time(ancdata: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack("=qq", data[:16])
            return sec + nsec / 1e9
    return time.time()


def watch(out: str, vip: str, every: float, nodes: dict[str, str],
          gates: tuple[str, float] | None = None) -> None:
    """The oracle's main loop (runs in the client namespace until SIGTERM); ``gates``:
    (fence table, period) to sample each node's gate."""
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    vip_bytes = socket.inet_aton(vip)
    arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    arp.bind(("eth0", ETH_P_ARP))
    arp.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    links = {run_in_netns(ns, _netlink_addr_socket): node for node, ns in nodes.items()}
    rows: list[list[Any]] = []
    for sock, node in links.items():  # the state at the start, before "ready"
        rows.extend(["addr", time.time(), node, held] for held in _read_dump(sock, vip_bytes))
    stop_sampling = threading.Event()
    samplers = [threading.Thread(target=_sample_gates, daemon=True, name=f"gate-{node}",
                                 args=(ns, node, gates[0], vip, gates[1], rows,
                                       stop_sampling))
                for node, ns in nodes.items()] if gates else []
    for sampler in samplers:
        sampler.start()
    request = _arp_request(vip)
    next_probe = time.monotonic()
    probed = False
    while not stop:
        now = time.monotonic()
        if now >= next_probe:
            if not probed:
                Path(f"{out}.ready").touch()  # just before: the first round is complete
                probed = True
            rows.append(["probe", time.time()])
            arp.send(request)
            # Late (a busy machine): start again from now rather than send a burst.
            next_probe = max(next_probe + every, now + every / 2)
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([arp, *links], [], [], max(next_probe - now, 0))
        for sock in ready:
            if sock is arp:
                frame, ancdata, _, addr = arp.recvmsg(128, socket.CMSG_SPACE(16))
                seen = classify(frame, vip_bytes) if addr[2] != PACKET_OUTGOING else None
                if seen:
                    rows.append([seen[0], _kernel_time(ancdata), seen[1]])
            else:
                t = time.time()
                rows.extend(["addr", t, links[sock], held]
                            for held in address_events(sock.recv(65536), vip_bytes))
    stop_sampling.set()
    for sampler in samplers:
        sampler.join(1.0)
    with open(out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in list(rows))


# --- from the benchmark's side ------------------------------------------------------------

@dataclass(frozen=True)
class Episode:
    """A dual-active episode: consecutive probe rounds answered by two MACs.

    ``winner`` is the only MAC answering the first answered round after it (None if
    two still answer, or the trial ended first); ``resolved_at`` is the last reply of
    the other MAC (the loser), the latest moment it was seen answering: an early
    estimate of the resolution by at most one round, so delays measured from it are
    pessimistic.
    """

    start: float
    end: float
    winner: str | None
    resolved_at: float | None


@dataclass
class Observations:
    """The oracle's rows, by kind, each list in time order."""

    probes: list[float] = field(default_factory=list)
    replies: list[tuple[float, str]] = field(default_factory=list)
    garps: list[tuple[float, str]] = field(default_factory=list)
    addr: list[tuple[float, str, bool]] = field(default_factory=list)
    # node -> (time, seconds left on its gate: > 0 open, 0 shut, None no fence table)
    gates: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, lines: list[str]) -> Observations:
        obs = cls()
        for line in lines:
            kind, t, *rest = json.loads(line)
            if kind == "probe":
                obs.probes.append(t)
            elif kind == "reply":
                obs.replies.append((t, rest[0]))
            elif kind == "garp":
                obs.garps.append((t, rest[0]))
            elif kind == "addr":
                obs.addr.append((t, rest[0], rest[1]))
            elif kind == "gate":
                obs.gates.setdefault(rest[0], []).append((t, rest[1]))
        obs.replies.sort()
        obs.garps.sort()
        obs.addr.sort(key=lambda row: row[0])
        for samples in obs.gates.values():
            samples.sort(key=lambda row: row[0])
        return obs

    def gate_open(self, node: str, start: float, end: float) -> list[tuple[float, float]]:
        """The node's gate as open intervals within [start, end]: each sample that saw
        it open counts from its own time until the next sample, but no longer than the
        time the element had left (so a sampler that fell behind cannot invent open
        time past an expiry). A gate that opened between two samples counts from the
        later one, one that was shut (flushed) from the sample that saw it shut: both
        ends are off by at most a sampling period."""
        samples = self.gates.get(node, [])
        ends = [t for t, _ in samples[1:]] + [end] if samples else []
        spans: list[tuple[float, float]] = []
        for (t, left), nxt in zip(samples, ends, strict=True):
            if not left or left <= 0:
                continue
            lo, hi = max(t, start), min(nxt, t + left, end)
            if hi <= lo:
                continue
            if spans and spans[-1][1] >= lo:
                spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
            else:
                spans.append((lo, hi))
        return spans

    def gates_open_together(self, start: float, end: float) -> list[tuple[float, float]]:
        """Intervals within [start, end] during which two or more nodes' gates were open."""
        edges = sorted((t, d) for node in self.gates
                       for lo, hi in self.gate_open(node, start, end)
                       for t, d in ((lo, 1), (hi, -1)))
        spans: list[tuple[float, float]] = []
        depth, since = 0, 0.0
        for t, d in edges:  # at a tie the closing edge (-1) sorts first: no zero spans
            if depth >= 2 and depth + d < 2 and t > since:
                spans.append((since, t))
            if depth < 2 <= depth + d:
                since = t
            depth += d
        return spans

    def sampler_gaps(self, start: float, end: float, limit: float) -> list[tuple[float, float]]:
        """Stretches within [start, end] over which some node's gate went unsampled for
        more than ``limit`` s (its sampler thread fell behind on a busy machine): inside
        one, when that gate shut is unknown, and `gate_open` counts it open throughout."""
        gaps = []
        for samples in self.gates.values():
            times = [t for t, _ in samples]
            gaps += [(max(a, start), min(b, end)) for a, b in pairwise(times)
                     if b - a > limit and b > start and a < end]
        return sorted(gaps)

    def gates_open_together_known(self, start: float, end: float,
                                  limit: float = LATE_SAMPLER) -> list[tuple[float, float]]:
        """`gates_open_together` without the overlaps that lie wholly inside a stretch
        a late sampler left unknown (`sampler_gaps`): what the samples prove. The ARP
        rounds stay the direct oracle of two nodes answering."""
        gaps = self.sampler_gaps(start, end, limit)
        return [(lo, hi) for lo, hi in self.gates_open_together(start, end)
                if not any(a <= lo and hi <= b for a, b in gaps)]

    def rounds(self, start: float, end: float) -> list[tuple[float, float, set[str]]]:
        """Probe rounds in [start, end): (sent, next sent or end, MACs that answered).
        A reply belongs to the latest request sent before it arrived."""
        times = [t for t in self.probes if start <= t < end]
        out: list[tuple[float, float, set[str]]] = [
            (t, nxt, set()) for t, nxt in zip(times, [*times[1:], end], strict=True)]
        for t, mac in self.replies:
            k = bisect_right(times, t) - 1
            if k >= 0 and t < out[k][1]:
                out[k][2].add(mac)
        return out

    def dual_episodes(self, start: float, end: float) -> list[Episode]:
        """Runs of consecutive rounds in [start, end) with replies from two or more MACs."""
        rounds = self.rounds(start, end)
        episodes: list[Episode] = []
        k = 0
        while k < len(rounds):
            if len(rounds[k][2]) < 2:
                k += 1
                continue
            first = k
            while k < len(rounds) and len(rounds[k][2]) >= 2:
                k += 1
            after = next((macs for _, _, macs in rounds[k:] if macs), set())
            winner = next(iter(after)) if len(after) == 1 else None
            until = rounds[k][0] if k < len(rounds) else end
            lost = [t for t, mac in self.replies
                    if rounds[first][0] <= t < until and mac != winner]
            episodes.append(Episode(rounds[first][0], rounds[k - 1][1], winner,
                                    max(lost) if winner and lost else None))
        return episodes

    def holders(self, start: float, end: float) -> list[tuple[float, frozenset[str]]]:
        """The set of nodes holding the VIP over [start, end], as change points: the set
        at ``start``, then (time, set) each time it changes (renewals are no change)."""
        held: dict[str, bool] = {}

        def current() -> frozenset[str]:
            return frozenset(n for n, h in held.items() if h)

        points: list[tuple[float, frozenset[str]]] = []
        for t, node, is_held in self.addr:
            if t > end:
                break
            if t >= start and not points:
                points.append((start, current()))
            held[node] = is_held
            if t >= start and points[-1][1] != current():
                points.append((t, current()))
        return points or [(start, current())]


def load(out: Path) -> Observations:
    return Observations.parse(out.read_text().splitlines())


class ArpWatch:
    """The oracle process for one trial: `start` returns once it probes, `stop` returns
    what it saw. Spawned through the lab's client host, so destroying the lab kills it."""

    def __init__(self, proc: Any, out: Path) -> None:
        self.proc = proc
        self.out = out

    @classmethod
    def start(cls, pair: PairLab, vip: str, every: float = PROBE_EVERY,
              gates: float | None = GATE_EVERY) -> ArpWatch:
        """``gates``: sample each node's fence gate that often, if the pair has a kernel
        fence (None: never)."""
        out = pair.workdir / f"arpwatch-{time.monotonic_ns()}.jsonl"
        nodes = [f"{name}={pair.host(name).ns}" for name in pair.nodes]
        if gates and pair.fence_table:
            nodes.append(f"--gates={pair.fence_table}:{gates}")
        # cwd: the checkout holding `simulations`, wherever the benchmark was started from.
        proc = pair.lab["client"].spawn(sys.executable, "-m", "simulations.arpwatch",
                                        str(out), vip, str(every), *nodes,
                                        cwd=Path(__file__).resolve().parent.parent)
        watch = cls(proc, out)
        try:
            wait_ready(proc, f"{out}.ready", "the ARP watcher in the client namespace",
                       START_TIMEOUT)
        except RuntimeError:
            watch.close()
            raise
        return watch

    def stop(self) -> Observations:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(5)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the ARP watcher failed (exit {self.proc.returncode}); "
                               f"its output would be {self.out}")
        try:
            return load(self.out)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in (self.out, Path(f"{self.out}.ready")):
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    # python -m simulations.arpwatch OUT VIP EVERY [--gates=TABLE:EVERY] NODE=NETNS...
    options = [a for a in sys.argv[4:] if a.startswith("--gates=")]
    table, _, period = options[-1].removeprefix("--gates=").partition(":") if options \
        else ("", "", "")
    watch(sys.argv[1], sys.argv[2], float(sys.argv[3]),
          dict(a.split("=", 1) for a in sys.argv[4:] if not a.startswith("--")),
          (table, float(period)) if options else None)
