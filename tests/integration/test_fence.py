"""The kernel fence on the real kernel: a VIP answers ARP and traffic only while its gate
element is in the nftables set, and the kernel shuts the gate by itself when the element
times out (what cuts off a frozen or killed holder within milliseconds)."""

from __future__ import annotations

import socket
import time
from ipaddress import ip_interface

import pytest

from support.netns import Lab
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
