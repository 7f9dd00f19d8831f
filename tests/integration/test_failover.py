"""Failover of a real vipd pair on the real kernel (network namespaces, see conftest.py).

Two daemons (`python -m vipd.cli run`) in namespaces node1 (priority 150) and node2
(priority 100) share VIP4 and VIP6; a responder on each node answers on the VIP with its
name and a probe in the client namespace records who answers (vipd.demo.pairlab). Faults are
the real thing: SIGKILL of the process group, link down, a failing exec health check,
SIGTERM, restarts. The kernel's view (``ip -j addr``) is the oracle for who holds a VIP.

Bounds are generous (seconds): the point is that failover happens, ends with exactly one
holder, and that a graceful stop is much cheaper for clients than a crash. The measured
client outages are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import time

import pytest

from support.pairlab_checks import expect, expect_only, logs, start_pair, stays, transitions
from vipd.config import load_config
from vipd.core.protocol import Advert, Flag, KeyRing, Session, State
from vipd.daemon import election_config
from vipd.demo.lab import run_in_netns
from vipd.demo.pairlab import PORT, VIP4, VIP6, PairLab, outage
from vipd.keys import load_keys

pytestmark = pytest.mark.netns

FAILOVER = 5.0  # s: a takeover must be visible in the kernel within this
IP_TRANSPARENT = 19  # not in Python 3.11's socket module
ETH_P_ALL = 0x0003
NODE1, NODE2 = "198.51.100.1", "198.51.100.2"


# --- helpers ---------------------------------------------------------------------------

def warm_probe(pair: PairLab, target: str = VIP4) -> None:
    """Start the client probe and give it time to resolve the VIP and get answers."""
    pair.start_probe(target=target)
    time.sleep(0.5)


def lines_since(pair: PairLab, name: str, mark: int) -> list[str]:
    return pair.log_lines(name)[mark:]


# --- 1: start --------------------------------------------------------------------------

def test_start_elects_node1_with_both_vips(pair: PairLab) -> None:
    pair.start("node1")
    pair.start("node2")
    expect_only(pair, "node1", timeout=10.0)
    expect_only(pair, "node1", vip=VIP6, timeout=2.0)
    warm_probe(pair)
    stays(pair, ["node1"], 1.0)
    assert pair.holders(VIP6) == ["node1"]
    samples = pair.stop_probe()
    answered = [who for _, who in samples if who]
    assert answered, "the client got no answer from the VIP at all"
    assert set(answered) == {"node1"}, f"answers from {set(answered)}"
    assert not [line for line in pair.log_lines("node2") if "-> ACTIVE" in line], logs(pair)


# --- 2: crash (SIGKILL) ----------------------------------------------------------------

def test_kill_active_fails_over_and_stale_vip_expires(pair: PairLab) -> None:
    start_pair(pair)
    warm_probe(pair)
    killed_at = time.time()
    t0 = time.monotonic()
    pair.kill("node1")
    expect(pair, lambda: "node2" in pair.holders(), FAILOVER, "node2 to take the VIP")
    took = time.monotonic() - t0
    time.sleep(0.5)
    gap, last = outage(pair.stop_probe(), killed_at)
    print(f"\nkill -9: node2 holds the VIP after {1000 * took:.0f} ms, "
          f"client outage {1000 * gap:.0f} ms")
    assert gap < 5.0, f"client outage {gap} s after kill -9"
    assert last == "node2"
    # The dead node's copy has no renewal any more: the kernel drops it (lease 3 s).
    expect_only(pair, "node2")
    expect_only(pair, "node2", vip=VIP6, timeout=2.0)
    assert pair.host("node1").address(VIP4) is None


# --- 3: link down ----------------------------------------------------------------------

def test_link_down_fails_over_and_split_brain_resolves(pair: PairLab) -> None:
    start_pair(pair)
    warm_probe(pair)
    down_at = time.time()
    pair.link("node1", False)
    expect(pair, lambda: "node2" in pair.holders(), FAILOVER, "node2 to take the VIP")
    time.sleep(0.5)
    gap, last = outage(pair.stop_probe(), down_at)
    print(f"\nlink down: client outage {1000 * gap:.0f} ms")
    assert gap < 5.0 and last == "node2"
    # node1 tracks its own link: with the link down it goes FAULT and drops its copy, so
    # even during the partition the VIP is on one node only.
    expect(pair, lambda: pair.holders() == ["node2"], 3.0, "node1 to drop its copy")
    assert any("-> FAULT" in line and "link.eth0" in line for line in pair.log_lines("node1")), \
        logs(pair)
    warm_probe(pair)
    up_at = time.time()
    mark = len(pair.log_lines("node2"))
    pair.link("node1", True)
    expect(pair, lambda: len(pair.holders()) == 1, 5.0, "a single holder after link up")
    time.sleep(1.0)  # long enough for a (wrong) move back to show up in the probe
    gap_up, last_up = outage(pair.stop_probe(), up_at)
    print(f"link up again: client outage {1000 * gap_up:.0f} ms, answering {last_up}")
    # Preempt is off: node2 keeps the VIP; node1 must drop its copy (split brain over),
    # and the clients, who moved to node2 at the takeover, must not move again.
    moved_back = [line for line in lines_since(pair, "node2", mark) if "ACTIVE -> " in line]
    assert not moved_back, (f"the VIP moved back to node1 after the partition healed "
                            f"(preempt off; clients moved twice)\n{logs(pair)}")
    assert last_up == "node2"
    stays(pair, ["node2"], 1.0)
    expect_only(pair, "node2", vip=VIP6, timeout=2.0)


# --- 4: health check fails -------------------------------------------------------------

def test_failing_health_check_moves_vip_and_faults_node1(pair: PairLab) -> None:
    start_pair(pair)
    t0 = time.monotonic()
    pair.set_health("node1", False)
    expect(pair, lambda: "node2" in pair.holders(), FAILOVER, "node2 to take the VIP")
    print(f"\nhealth failure: node2 holds the VIP after "
          f"{1000 * (time.monotonic() - t0):.0f} ms")
    expect_only(pair, "node2", timeout=3.0)
    expect_only(pair, "node2", vip=VIP6, timeout=3.0)
    assert pair.host("node1").address(VIP4) is None and pair.host("node1").address(VIP6) is None
    faults = [line for line in pair.log_lines("node1") if "-> FAULT" in line]
    assert faults, logs(pair)
    assert "service" in faults[0], faults[0]  # names the failing check
    stays(pair, ["node2"], 0.5)


# --- 5: graceful stop (SIGTERM) --------------------------------------------------------

def test_sigterm_hands_over_with_small_outage(pair: PairLab) -> None:
    start_pair(pair)
    warm_probe(pair)
    stopped_at = time.time()
    t0 = time.monotonic()
    try:
        code = pair.stop("node1", timeout=2.0)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node1 did not exit within 2 s of SIGTERM\n{logs(pair)}")
    exited = time.monotonic() - t0
    expect_only(pair, "node2", timeout=3.0)
    time.sleep(0.5)
    gap, last = outage(pair.stop_probe(), stopped_at)
    print(f"\nSIGTERM: node1 exited {code} after {1000 * exited:.0f} ms, "
          f"client outage {1000 * gap:.0f} ms")
    assert code == 0, logs(pair)
    assert last == "node2"
    assert gap < 1.0, f"graceful stop cost clients {gap} s\n{logs(pair)}"
    expect_only(pair, "node2", vip=VIP6, timeout=2.0)


# --- 6: the old active returns -------------------------------------------------------

def test_returning_node_does_not_preempt_without_preempt(pair: PairLab) -> None:
    start_pair(pair)
    pair.kill("node1")
    expect(pair, lambda: "node2" in pair.holders(), FAILOVER, "node2 to take the VIP")
    mark = len(pair.log_lines("node1"))
    pair.start("node1")
    # node1's start removes its stale copy (or the lease does); then node2 alone, for 3 s.
    expect_only(pair, "node2")
    stays(pair, ["node2"], 3.0)
    node1_after = lines_since(pair, "node1", mark)
    assert any("INIT -> STANDBY" in line for line in node1_after), logs(pair)
    assert not [line for line in node1_after if "-> ACTIVE" in line], logs(pair)


@pytest.mark.pair(preempt=True, preempt_delay=1.0)
def test_returning_node_preempts_after_delay(pair: PairLab) -> None:
    start_pair(pair)
    pair.kill("node1")
    expect(pair, lambda: "node2" in pair.holders(), FAILOVER, "node2 to take the VIP")
    expect_only(pair, "node2")  # the crashed node's copy expired: node1 holds nothing
    mark = len(pair.log_lines("node1"))
    t0 = time.monotonic()
    pair.start("node1")
    first_seen = None
    end = t0 + 10.0
    while time.monotonic() < end:
        holders = pair.holders()
        if first_seen is None and "node1" in holders:
            first_seen = time.monotonic() - t0
        if holders == ["node1"]:
            break
        time.sleep(0.02)
    assert first_seen is not None, f"node1 never took the VIP back\n{logs(pair)}"
    print(f"\npreempt (delay 1 s): node1 holds the VIP {1000 * first_seen:.0f} ms "
          f"after its start")
    assert first_seen >= 0.95, f"node1 preempted after {first_seen} s, delay is 1 s"
    expect_only(pair, "node1", timeout=3.0)
    expect_only(pair, "node1", vip=VIP6, timeout=2.0)
    takeovers = [line for line in lines_since(pair, "node1", mark)
                 if "STANDBY -> ACTIVE" in line]
    assert len(takeovers) == 1, logs(pair)
    assert "node2 hands over" in takeovers[0], takeovers[0]
    stays(pair, ["node1"], 0.5)


# --- 7: IPv6 ---------------------------------------------------------------------------

def test_ipv6_vip_moves_with_the_ipv4_vip(pair: PairLab) -> None:
    start_pair(pair)
    expect_only(pair, "node1", vip=VIP6, timeout=2.0)
    warm_probe(pair, target=VIP6)
    killed_at = time.time()
    pair.kill("node1")
    expect(pair, lambda: "node2" in pair.holders(VIP6), FAILOVER, "node2 to take the VIP6")
    time.sleep(0.5)
    samples = pair.stop_probe()
    gap, last = outage(samples, killed_at)
    print(f"\nkill -9, IPv6 VIP: client outage {1000 * gap:.0f} ms")
    assert any(who == "node1" for sent, who in samples if sent < killed_at)
    assert gap < 5.0 and last == "node2"
    expect_only(pair, "node2", vip=VIP6)
    expect_only(pair, "node2", timeout=2.0)


# --- 8: forged and replayed heartbeats -------------------------------------------------

def _send(packets: list[bytes], spoof: str | None, seconds: float = 0.0) -> None:
    """From the calling namespace, send `packets` to node2's heartbeat port (repeating
    them for `seconds`), with a spoofed source address if `spoof` is given."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if spoof is not None:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            s.bind((spoof, 0))
        end = time.monotonic() + seconds
        while True:
            for data in packets:
                s.sendto(data, (NODE2, PORT))
            if time.monotonic() >= end:
                return
            time.sleep(0.02)
    finally:
        s.close()


def _capture_heartbeat(timeout: float = 3.0) -> bytes:
    """In the switch namespace: one heartbeat node1 -> node2, off node2's bridge port."""
    # ETH_P_ALL: frames the bridge forwards are *outgoing* on this port, and only
    # ETH_P_ALL taps see outgoing frames.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.bind(("node2", 0))
        s.settimeout(0.2)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                frame = s.recv(2048)
            except TimeoutError:
                continue
            ip = frame[14:]
            if frame[12:14] != b"\x08\x00" or len(ip) < 28 or ip[9] != socket.IPPROTO_UDP:
                continue
            if socket.inet_ntoa(ip[12:16]) != NODE1 or socket.inet_ntoa(ip[16:20]) != NODE2:
                continue
            ihl = (ip[0] & 0x0F) * 4
            _, dport, length, _ = struct.unpack("!HHHH", ip[ihl:ihl + 8])
            if dport == PORT:
                return bytes(ip[ihl + 8:ihl + length])
        raise AssertionError("no heartbeat node1 -> node2 seen on the bridge")
    finally:
        s.close()


def _heartbeats(pair: PairLab, keys: KeyRing, count: int) -> list[bytes]:
    """`count` heartbeats claiming node1 resigns (ACTIVE, RESIGNING, a huge term): if
    node2 accepted any of them it would take over at once."""
    cfg = load_config(pair.nodes["node1"].config)
    session = Session(cluster="lab", node="node1", keys=keys, boot_id=secrets.randbits(64),
                      digest=election_config(cfg).digest)
    advert = Advert(state=State.ACTIVE, flags=Flag.HEALTHY | Flag.RESIGNING, term=2**40,
                    priority=150, effective_priority=150)
    return [session.seal(advert, time.monotonic(), time.time_ns()) for _ in range(count)]


def test_forged_and_replayed_heartbeats_change_nothing(pair: PairLab) -> None:
    start_pair(pair)
    stays(pair, ["node1"], 0.5)
    mark1, mark2 = len(pair.log_lines("node1")), len(pair.log_lines("node2"))
    client, switch = pair.host("client"), pair.lab.switch
    wrong_key = KeyRing({1: secrets.token_bytes(32)})
    real_key = KeyRing(load_keys(pair.workdir / "pair.key"))

    # (a) Signed with a wrong key, from the client's own address, for 1 s.
    client.run(_send, _heartbeats(pair, wrong_key, 50), None, 1.0)
    # (b) Validly signed (the pair's key), from the client's address: sent once, then
    #     the very same bytes 20 more times. The source check stops all of them.
    valid = _heartbeats(pair, real_key, 1)[0]
    client.run(_send, [valid], None)
    client.run(_send, [valid] * 20, None)
    # (c) Beyond the source check: node1's address spoofed from the client. A wrong key
    #     fails the MAC; a real heartbeat of node1, captured on the bridge and replayed
    #     (after node1 sent newer ones, within the clock-skew window) is a replay.
    client.run(_send, _heartbeats(pair, wrong_key, 20), NODE1, 0.5)
    captured = run_in_netns(switch, _capture_heartbeat)
    time.sleep(0.2)
    client.run(_send, [captured] * 20, NODE1)

    stays(pair, ["node1"], 1.0)
    assert pair.holders(VIP6) == ["node1"]
    after1, after2 = lines_since(pair, "node1", mark1), lines_since(pair, "node2", mark2)
    assert transitions(after1) == [] and transitions(after2) == [], logs(pair)
    rejected = [line for line in after2 if "rejected" in line]
    for reason in ("unknown_peer", "bad_mac", "replay"):
        assert any(f"({reason})" in line for line in rejected), (reason, logs(pair))
    assert any("198.51.100.3" in line for line in rejected), rejected


# --- start-up election when a health result is slow (found while writing test 1) ---

def test_start_with_slow_first_health_result_still_elects_node1(pair: PairLab) -> None:
    """Both start together; node1's first health result takes 0.5 s (a service that is
    slow to answer at boot). Health *unknown* for a moment is not *unhealthy*: node1
    (priority 150) must still win, not node2 (100), which without preemption would keep
    the VIP for good."""
    cfg = pair.nodes["node1"].config
    health = pair.nodes["node1"].health_file
    text = cfg.read_text()
    fast = f"command: [/usr/bin/test, -e, {health}]}}, interval: 100ms, timeout: 80ms"
    slow = (f'command: [/bin/sh, -c, "sleep 0.5; test -e {health}"]}}, '
            "interval: 1s, timeout: 900ms")
    assert fast in text, text
    cfg.write_text(text.replace(fast, slow))
    pair.start("node1")
    pair.start("node2")
    expect(pair, lambda: any("check service: unknown -> up" in line
                             for line in pair.log_lines("node1")),
           10.0, "node1's health check to pass")
    expect_only(pair, "node1", timeout=5.0)
    stays(pair, ["node1"], 0.5)
