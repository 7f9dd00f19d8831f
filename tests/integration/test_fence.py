"""The kernel fence on the real kernel: a VIP answers ARP and traffic only while its gate
element is in the nftables set, and the kernel shuts the gate by itself when the element
times out (what cuts off a frozen or killed holder within milliseconds)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from ipaddress import ip_interface

import pytest

from support.netns import Lab
from support.pairlab_checks import expect, logs, start_pair
from vipd.config import load_config
from vipd.demo.pairlab import PairLab
from vipd.fence import KernelFence

pytestmark = pytest.mark.netns

VIP = "198.51.100.100"
VIP6 = "2001:db8:1::100"
GATE = 0.3  # s: the element's timeout in these tests
PORT = 7001


def answers_arp(lab: Lab) -> bool:
    """The client asks who has the VIP (one request, 0.5 s for the reply)."""
    done = lab.client.exec("arping", "-c", "1", "-w", "0.5", "-I", "eth0", VIP, check=False)
    return done.returncode == 0


def answers_tcp6(lab: Lab) -> bool:
    """The client connects to a listener on the IPv6 VIP (neighbour discovery included:
    the node's advertisement comes from the VIP, so the gate covers it too)."""
    def connect() -> bool:
        try:
            socket.create_connection((VIP6, PORT), timeout=0.5).close()
        except OSError:
            return False
        return True
    return bool(lab.client.run(connect))


def test_the_gate_passes_only_while_its_element_lives(lab: Lab) -> None:
    node = lab.node1
    node.ip("addr", "add", f"{VIP}/32", "dev", "eth0")
    node.ip("addr", "add", f"{VIP6}/128", "dev", "eth0", "nodad")
    listener = node.run(lambda: socket.create_server((VIP6, PORT), family=socket.AF_INET6,
                                                     backlog=64))
    assert answers_arp(lab) and answers_tcp6(lab), "the VIP answers without a fence"
    fence = node.run(lambda: KernelFence("lab", [ip_interface(f"{VIP}/32"),
                                                 ip_interface(f"{VIP6}/128")]))
    try:
        node.run(fence.install)
        assert not answers_arp(lab), "installed, the gate starts shut"
        assert not answers_tcp6(lab)
        node.run(fence.open, 5.0)
        assert answers_arp(lab) and answers_tcp6(lab), "open: the VIP answers"
        node.run(fence.open, GATE)
        time.sleep(GATE + 0.2)  # nobody renews: the kernel drops the element
        assert not answers_arp(lab), f"the gate did not shut {GATE} s after the last renewal"
        assert not answers_tcp6(lab)
        node.run(fence.open, 5.0)
        assert answers_arp(lab)
        node.run(fence.close)
        assert not answers_arp(lab), "close shuts it at once"
    finally:
        node.run(fence.remove)
        listener.close()
    assert answers_arp(lab), "removing the fence leaves the address alone"
    assert "vipd_lab" not in node.exec("nft", "list", "tables").stdout


NODE1_MAC = "02:76:64:00:00:01"


def in_ns(pair: PairLab, role: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", pair.host(role).ns, *argv],
                          capture_output=True, text=True, check=False, timeout=30)


def tables(pair: PairLab, role: str) -> str:
    return in_ns(pair, role, "nft", "list", "tables").stdout


def arp_repliers(pair: PairLab, seconds: float = 1.0) -> set[str]:
    """The MACs that answer the client's ARP requests for the VIP over ``seconds``
    (Habets' arping: one request every 0.2 s)."""
    count = max(1, round(seconds / 0.2))
    done = in_ns(pair, "client", "arping", "-c", str(count), "-W", "0.2", "-i", "eth0", VIP)
    return {m.lower() for m in re.findall(r"\b(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}\b",
                                          done.stdout)}


@pytest.mark.pair(extra="fence: kernel\n")
def test_a_killed_holder_stops_answering_within_the_dead_interval(pair: PairLab) -> None:
    """kill -9 leaves the address on node1 for its 3 s lifetime; the gate shuts one dead
    interval after the last renewal, so clients stop getting node1's ARP replies long
    before: while node1 still has the address, only node2 answers."""
    start_pair(pair)
    assert NODE1_MAC in arp_repliers(pair, 0.5), logs(pair)
    dead = load_config(pair.nodes["node1"].config).heartbeat.dead_interval
    pair.kill("node1")
    killed = time.monotonic()
    expect(pair, lambda: "node2" in pair.holders(), 5.0, "node2 to take the VIP")
    time.sleep(max(0.0, killed + dead + 0.15 - time.monotonic()))
    assert "node1" in pair.holders(), "the lease removed the address already: no proof"
    repliers = arp_repliers(pair, 1.0)
    assert "node1" in pair.holders(), "the lease removed the address during the check"
    assert NODE1_MAC not in repliers, (f"node1's kernel still answers {dead + 0.15:.2f}+ s "
                                       f"after the kill: {repliers}\n{logs(pair)}")
    assert repliers, "nobody answers: node2 should"
    assert "vipd_lab" in tables(pair, "node2")


@pytest.mark.pair(extra="fence: kernel\n")
def test_a_clean_stop_and_vipd_release_remove_the_fence(pair: PairLab) -> None:
    start_pair(pair)
    assert "vipd_lab" in tables(pair, "node1")
    assert pair.stop("node1") == 0
    expect(pair, lambda: pair.holders() == ["node2"], 5.0, "node2 alone to hold the VIP")
    assert "vipd_lab" not in tables(pair, "node1")
    pair.kill("node2")
    config = str(pair.nodes["node2"].config)
    released = in_ns(pair, "node2", sys.executable, "-m", "vipd.cli", "release", "-c", config)
    assert released.returncode == 0, released.stderr
    assert "vipd_lab" not in tables(pair, "node2")
    assert pair.holders() == []
