"""Capture the fuzz seed corpus from a real pair: `python -m simulations.fuzzcorpus` (root).

A pair with a witness runs in a namespace lab (vipd.demo.pairlab: documentation
addresses only, inside namespaces this script creates and deletes); tcpdump on both
nodes' eth0 records every heartbeat and vote message while the pair starts, settles,
switches over, loses its active to a kill -9 and gets it back. The UDP payloads become
tests/fuzz/corpus/{heartbeat,vote_request,vote_reply}/*.bin: one datagram per file, and a
few runs of consecutive datagrams of one flow (files named seq-*), which the fuzz
targets split at each b"VIPD" so that replay and freshness are reached too. The lab's
throwaway key and names go to tests/fuzz/corpus/lab.json, so the targets can re-seal
mutated datagrams with the right key.

Re-running replaces the corpus (it is deterministic in kind, not in bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from vipd.core.protocol import HEADER_SIZE, MAGIC, Kind
from vipd.demo.pairlab import PORT, WITNESS_PORT, PairLab
from vipd.keys import load_keys

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "fuzz" / "corpus"
CLASSES: dict[int, str] = {Kind.HEARTBEAT: "heartbeat", Kind.VOTE_REQUEST: "vote_request",
           Kind.VOTE_REPLY: "vote_reply"}
PER_SHAPE = 2  # datagrams kept per (sender, state, flags, kind, vote verdict)
RUNS_PER_FLOW = 3  # runs of consecutive datagrams kept per flow
RUN_LENGTH = 3
MAC_TAIL = 32

Flow = tuple[str, int, str, int]  # source ip, source port, destination ip, destination port


def udp_payloads(pcap: bytes) -> list[tuple[Flow, bytes]]:
    """(flow, payload) of every IPv4/IPv6 UDP frame of a classic little- or big-endian
    pcap file with Ethernet link type; other frames are skipped."""
    if len(pcap) < 24:
        return []
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">"}.get(pcap[:4])
    if endian is None:
        raise ValueError(f"not a classic pcap file (magic {pcap[:4].hex()})")
    if struct.unpack_from(endian + "I", pcap, 20)[0] != 1:
        raise ValueError("pcap link type is not Ethernet")
    found: list[tuple[Flow, bytes]] = []
    pos = 24
    while pos + 16 <= len(pcap):
        caplen = struct.unpack_from(endian + "I", pcap, pos + 8)[0]
        frame = pcap[pos + 16:pos + 16 + caplen]
        pos += 16 + caplen
        ethertype = int.from_bytes(frame[12:14], "big")
        if ethertype == 0x0800 and len(frame) >= 34 and frame[23] == 17:
            ihl = (frame[14] & 0x0F) * 4
            src, dst, udp = frame[26:30], frame[30:34], 14 + ihl
            source, dest = ".".join(map(str, src)), ".".join(map(str, dst))
        elif ethertype == 0x86DD and len(frame) >= 62 and frame[20] == 17:
            source, dest, udp = frame[22:38].hex(":", 2), frame[38:54].hex(":", 2), 54
        else:
            continue
        sport, dport, length = struct.unpack_from("!HHH", frame, udp)
        found.append(((source, sport, dest, dport), frame[udp + 8:udp + length]))
    return found


def shape(data: bytes) -> tuple[int, ...]:
    """What makes two datagrams different for the decoder: sender name length, state,
    flags, kind and the vote verdict."""
    names = data[HEADER_SIZE] if len(data) > HEADER_SIZE else 0
    verdict = data[-MAC_TAIL - 4] if int.from_bytes(data[50:52], "big") else -1
    return (names, data[5], int.from_bytes(data[6:8], "big"),
            int.from_bytes(data[50:52], "big"), verdict)



def capture(workdir: Path, seconds: float) -> tuple[list[tuple[Flow, bytes]], bytes]:
    """Run the scenario in a lab; every captured (flow, payload) and the pair's key."""
    with PairLab.create(workdir, arbiter="witness", api=True) as pair:
        dumps = []
        for name in pair.nodes:
            out = workdir / f"{name}.pcap"
            dumps.append((out, pair.host(name).spawn(
                "tcpdump", "-i", "eth0", "-U", "-n", "-s", "0", "-w", str(out),
                f"udp port {PORT} or udp port {WITNESS_PORT}",
                stderr=subprocess.DEVNULL)))
        time.sleep(1.0)  # tcpdump attached before the first datagram
        active = pair.start_settled()
        if active is None:
            raise RuntimeError(f"no single VIP holder within 10 s (logs in {workdir})")
        time.sleep(seconds)
        pair.switchover(active)
        time.sleep(seconds)
        holder = pair.wait_single_holder(5) or active
        pair.kill(holder)
        time.sleep(seconds)
        pair.start(holder)
        time.sleep(seconds)
        for _, proc in dumps:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)
        key = load_keys(workdir / "pair.key")[1]
        packets = [p for out, _ in dumps for p in udp_payloads(out.read_bytes())]
    return packets, key


def select(packets: list[tuple[Flow, bytes]]) -> dict[str, dict[str, bytes]]:
    """File name -> bytes per class: up to PER_SHAPE datagrams of each shape, and
    RUNS_PER_FLOW runs of RUN_LENGTH consecutive datagrams of each flow."""
    chosen: dict[str, dict[str, bytes]] = {name: {} for name in CLASSES.values()}
    per_shape: dict[tuple[object, ...], int] = defaultdict(int)
    flows: dict[tuple[str, Flow], list[bytes]] = defaultdict(list)
    seen: set[bytes] = set()
    for flow, data in packets:
        if not data.startswith(MAGIC) or len(data) < HEADER_SIZE or data in seen:
            continue
        seen.add(data)
        kind = CLASSES.get(int.from_bytes(data[50:52], "big"))
        if kind is None:
            continue
        flows[(kind, flow)].append(data)
        key = (kind, flow[0], *shape(data))
        if per_shape[key] < PER_SHAPE:
            per_shape[key] += 1
            chosen[kind][hashlib.sha1(data).hexdigest()[:16]] = data
    for (kind, _), datagrams in sorted(flows.items()):
        # the start of the flow (small echo sequence numbers) and evenly after it
        step = max(len(datagrams) // RUNS_PER_FLOW, 1)
        for start in range(0, len(datagrams) - RUN_LENGTH + 1, step):
            run = b"".join(datagrams[start:start + RUN_LENGTH])
            chosen[kind][f"seq-{hashlib.sha1(run).hexdigest()[:12]}"] = run
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5,
                        help="time in each phase (settled, after the switchover, ...)")
    parser.add_argument("--out", type=Path, default=CORPUS)
    args = parser.parse_args(argv)
    if shutil.which("tcpdump") is None:
        print("fuzzcorpus: tcpdump not found (apt-get install tcpdump)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vipd-fuzzcorpus-") as tmp:
        packets, key = capture(Path(tmp), args.seconds)
    chosen = select(packets)
    for kind, files in chosen.items():
        if not files:
            raise RuntimeError(f"no {kind} datagram captured ({len(packets)} packets)")
        folder = args.out / kind
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / f"{name}.bin").write_bytes(data)
    meta = {"cluster": "lab", "nodes": ["node1", "node2"], "witness": "witness",
            "witness_source": "198.51.100.4", "peer_source": "198.51.100.1",
            "keys": {"1": key.hex()},
            "note": "the throwaway key of a namespace lab run by simulations/fuzzcorpus.py"}
    (args.out / "lab.json").write_text(json.dumps(meta, indent=1) + "\n")
    counts = ", ".join(f"{len(files)} {kind}" for kind, files in chosen.items())
    print(f"fuzzcorpus: {len(packets)} packets captured; kept {counts} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
