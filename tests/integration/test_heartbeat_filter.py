"""The kernel fence's heartbeat filter on the real kernel: datagrams to the heartbeat port
reach the socket from the peer (and the witness), and from any other host the kernel drops
them before the socket, counted in nftables and in vipd_heartbeat_filtered_total, never in
vipd_heartbeats_rejected_total; the filter goes with the fence at stop."""

from __future__ import annotations

import socket
import subprocess
import time
from ipaddress import ip_address, ip_interface

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.netns import Lab
from support.pairlab_checks import expect, logs, start_pair
from vipd.configtypes import Endpoint
from vipd.demo.lab import Host
from vipd.demo.pairlab import PORT, PairLab
from vipd.fence import HeartbeatFilter, KernelFence

pytestmark = pytest.mark.netns

HB_PORT = 5405
PAYLOAD = b"not a heartbeat"


def send(host: Host, target: str, count: int = 1) -> None:
    """``count`` datagrams to ``target`` (host:port endpoint text) from ``host``'s
    namespace (its own address as the source)."""
    end = Endpoint.parse(target)
    family = socket.AF_INET6 if end.host.version == 6 else socket.AF_INET

    def go() -> None:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            for _ in range(count):
                sock.sendto(PAYLOAD, (str(end.host), end.port))
    host.run(go)


def received(sock: socket.socket, wait: float = 0.5) -> list[str]:
    """Sources of the datagrams that reached ``sock`` within ``wait`` s."""
    sources: list[str] = []
    sock.settimeout(wait)
    while True:
        try:
            _, addr = sock.recvfrom(2048)
        except TimeoutError:
            return sources
        sources.append(addr[0])
        sock.settimeout(0.05)


@pytest.mark.parametrize("family", [4, 6])
def test_only_the_listed_sources_reach_the_socket(lab: Lab, family: int) -> None:
    def addr(host: Host) -> str:
        return str(host.ipv4.ip if family == 4 else host.ipv6.ip)

    node, peer, other = lab.node1, lab.node2, lab.client
    bind = Endpoint(ip_address(addr(node)), HB_PORT)
    sock = node.run(lambda: socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                                          socket.SOCK_DGRAM))
    sock.bind((str(bind.host), bind.port))
    fence = node.run(lambda: KernelFence(
        "lab", [ip_interface("198.51.100.100/32")],
        heartbeat=HeartbeatFilter(bind, (ip_address(addr(peer)),))))
    try:
        send(other, str(bind))
        assert received(sock) == [addr(other)], "without the filter anyone reaches it"
        node.run(fence.install)
        assert node.run(fence.filtered) == 0
        send(peer, str(bind))
        send(other, str(bind), count=5)
        assert received(sock) == [addr(peer)], "the peer passes, the other host does not"
        assert node.run(fence.filtered) == 5
        other_port = Endpoint(bind.host, bind.port + 1)
        with node.run(lambda: socket.socket(sock.family, socket.SOCK_DGRAM)) as bystander:
            bystander.bind((str(other_port.host), other_port.port))
            send(other, str(other_port))
            assert received(bystander) == [addr(other)], "other ports are not filtered"
        assert node.run(fence.filtered) == 5
    finally:
        node.run(fence.remove)
    send(other, str(bind))
    assert received(sock) == [addr(other)], "removed, the filter lets everyone in again"
    assert "vipd_lab" not in node.exec("nft", "list", "tables").stdout
    sock.close()


def samples(pair: PairLab, node: str) -> dict[str, float]:
    """``name{labels}`` -> value of one scrape of ``node``."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(pair.metrics(node)):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


def rejected(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("vipd_heartbeats_rejected_total"))


def tables(pair: PairLab, node: str) -> str:
    return subprocess.run(["ip", "netns", "exec", pair.host(node).ns, "nft", "list", "tables"],
                          capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.mark.pair(arbiter="witness", api=True)
def test_a_pair_hears_its_peer_and_witness_and_the_kernel_drops_the_rest(
        pair: PairLab) -> None:
    """The fence is on (the witness requires it), so the witness's replies and node2's
    heartbeats pass the filter (node1 holds 3 of 3 votes); the client's datagrams are
    dropped by node1's kernel; node2's own junk reaches node1's socket and is rejected."""
    start_pair(pair)
    target = f"198.51.100.1:{PORT}"
    expect(pair, lambda: samples(pair, "node1").get("vipd_votes_held") == 3.0, 5.0,
           "node1 to hold 3 votes (the peer's and the witness's replies pass the filter)")
    before = samples(pair, "node1")
    assert before["vipd_heartbeat_filtered_total"] == 0.0, logs(pair)

    send(pair.host("client"), target, count=50)
    time.sleep(0.3)
    after = samples(pair, "node1")
    assert after["vipd_heartbeat_filtered_total"] == 50.0
    assert rejected(after) == rejected(before), "a filtered datagram reached the socket"

    send(pair.host("node2"), target, count=3)  # from the peer's address: the socket's
    expect(pair, lambda: rejected(samples(pair, "node1")) == rejected(before) + 3, 2.0,
           "node2's three junk datagrams rejected by node1's daemon")
    assert samples(pair, "node1")["vipd_heartbeat_filtered_total"] == 50.0
    assert pair.status("node1")["heartbeat_filtered"] == 50
    assert pair.holders() == ["node1"], "nothing moved"

    assert "vipd_lab" in tables(pair, "node1")
    assert pair.stop("node1") == 0
    assert "vipd_lab" not in tables(pair, "node1"), "the filter stays behind after stop"
