"""NetlinkMover on the real kernel, in a namespace lab (see conftest.py).

The kernel's view is read back with ``ip -j`` rather than pyroute2, so the mover is
not checked by the library it is built on. Announcements are checked the way a client
sees them: its neighbour entry for the VIP moves from the old holder's MAC to ours.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any

import pytest
from pyroute2 import IPRoute

from support.netns import poke
from vipd.errors import VipError
from vipd.movers import netlink as netlink_module
from vipd.movers.base import INFINITY_LIFE_TIME, announce_burst
from vipd.movers.frames import ETH_P_IPV6, build_unsolicited_na
from vipd.movers.netlink import VIPD_ADDR_PROTO, NetlinkMover

pytestmark = pytest.mark.netns

V4 = IPv4Interface("198.51.100.200/32")
V6 = IPv6Interface("2001:db8:1::200/128")
VIPS: list[IPv4Interface | IPv6Interface] = [V4, V6]


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)




def send_frame(ifname: str, frame: bytes, ethertype: int) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.sendto(frame, (ifname, ethertype))


def own_mac(ifname: str) -> bytes:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
        sock.bind((ifname, 0))
        mac: bytes = sock.getsockname()[4]
        return mac


def protos(ifname: str) -> dict[str, int | None]:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return {msg.get("address"): msg.get("proto")
                for msg in ipr.addr("dump", index=index)}


def test_acquire_adds_usable_ipv4_and_ipv6_vips(lab):
    node = lab.node1
    # DAD on, as on a real host: only IFA_F_NODAD keeps the VIP from being tentative.
    lab.sysctl(node.ns, {"net.ipv6.conf.eth0.accept_dad": 1,
                         "net.ipv6.conf.eth0.dad_transmits": 1})
    mover = NetlinkMover(node.ifname, VIPS)

    async def scenario() -> set[Any]:
        await mover.acquire(0)
        # Usable at once: binding a tentative IPv6 address fails with EADDRNOTAVAIL.
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind((str(V6.ip), 0))
        return await mover.held()

    assert node.run_async(scenario) == {V4, V6}
    v4 = node.address(str(V4.ip))
    v6 = node.address(str(V6.ip))
    assert v4 is not None and v6 is not None
    assert v4["prefixlen"] == 32 and v6["prefixlen"] == 128
    assert v4["label"] == "eth0:vipd"
    assert v6.get("nodad") is True and "tentative" not in v6
    for info in (v4, v6):
        assert info["valid_life_time"] == INFINITY_LIFE_TIME  # lease 0: permanent
    marks = node.run(protos, node.ifname)
    assert marks[str(V4.ip)] == VIPD_ADDR_PROTO and marks[str(V6.ip)] == VIPD_ADDR_PROTO
    assert marks[str(node.ipv4.ip)] != VIPD_ADDR_PROTO


def test_acquire_is_idempotent(lab):
    node = lab.node1
    mover = NetlinkMover(node.ifname, VIPS)

    async def scenario() -> set[Any]:
        await mover.acquire(30)
        await mover.acquire(30)
        await mover.acquire(0)
        return await mover.held()

    assert node.run_async(scenario) == {V4, V6}
    locals_ = [info["local"] for info in node.addresses()]
    assert locals_.count(str(V4.ip)) == 1 and locals_.count(str(V6.ip)) == 1


def test_lease_makes_vips_disappear_by_themselves(lab):
    node = lab.node1
    mover = NetlinkMover(node.ifname, VIPS)
    node.run_async(mover.acquire, 2)
    start = time.monotonic()
    for vip in VIPS:
        info = node.address(str(vip.ip))
        assert info is not None and 0 < info["valid_life_time"] <= 2, info
        assert info["preferred_life_time"] <= 2
    time.sleep(1.0)
    assert node.run_async(mover.held) == {V4, V6}, "gone before the lease ran out"
    wait_for(lambda: all(node.address(str(v.ip)) is None for v in VIPS), 6,
             "the kernel to remove VIPs whose lease ran out")
    assert time.monotonic() - start >= 1.5
    assert node.run_async(mover.held) == set()


def test_acquire_again_renews_the_lease(lab):
    node = lab.node1
    mover = NetlinkMover(node.ifname, VIPS)

    async def renew_for(seconds: float) -> list[int]:
        """Renew every 0.5 s like an active daemon; return the lifetimes ip showed."""
        seen = []
        start = time.monotonic()
        await mover.acquire(2)
        await asyncio.sleep(1.2)
        seen.append(node.address(str(V4.ip))["valid_life_time"])  # counting down
        while time.monotonic() - start < seconds:
            await mover.acquire(2)
            seen.append(node.address(str(V4.ip))["valid_life_time"])
            seen.append(node.address(str(V6.ip))["valid_life_time"])
            assert await mover.held() == {V4, V6}
            await asyncio.sleep(0.5)
        return seen

    seen = node.run_async(renew_for, 4.5)
    assert seen[0] <= 1, f"lifetime did not count down: {seen}"
    assert seen[1] == 2 and seen[2] == 2, f"ip addr does not show the renewal: {seen}"
    # 4.5 s is well past the first lease (2 s, plus up to ~1 s of kernel slack).
    assert node.run_async(mover.held) == {V4, V6}
    wait_for(lambda: node.run_async(mover.held) == set(), 6,
             "the VIPs to lapse once renewals stop")


def test_renewals_take_the_compiled_path_and_recover_from_changes(lab, monkeypatch):
    """From the second renewal on, acquire sends requests compiled once (no pyroute2
    socket); an address removed behind its back is re-added by that path, and an
    interface that was re-created (new index) makes it fall back to the full request."""
    node = lab.node1
    opened: list[int] = []

    class CountingIPRoute(netlink_module.AsyncIPRoute):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            opened.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(netlink_module, "AsyncIPRoute", CountingIPRoute)
    node.ip("link", "add", "vt0", "type", "veth", "peer", "name", "vt1")
    for link in ("vt0", "vt1"):
        node.ip("link", "set", link, "up")
    mover = NetlinkMover("vt0", VIPS)

    def lifetimes() -> dict[str, int]:
        links = json.loads(node.ip("-j", "addr", "show", "dev", "vt0"))
        return {info["local"]: info["valid_life_time"]
                for link in links for info in link.get("addr_info", [])
                if info["local"] in (str(V4.ip), str(V6.ip))}

    async def renew(times: int, lease: float = 5) -> None:
        for _ in range(times):
            await mover.acquire(lease)

    node.run_async(renew, 2)  # a takeover, then the first renewal: both full requests
    full = len(opened)
    assert full == 2
    time.sleep(1.1)
    assert all(left <= 4 for left in lifetimes().values()), lifetimes()
    node.run_async(renew, 3)
    assert len(opened) == full, "renewals still opened pyroute2 sockets"
    assert lifetimes() == {str(V4.ip): 5, str(V6.ip): 5}, "the compiled renewal did not renew"
    # Removed behind vipd's back: the next renewal (still compiled) puts it back, labelled.
    node.ip("addr", "del", f"{V4.ip}/32", "dev", "vt0")
    node.run_async(renew, 1)
    assert len(opened) == full
    v4 = [i for link in json.loads(node.ip("-j", "addr", "show", "dev", "vt0"))
          for i in link["addr_info"] if i["local"] == str(V4.ip)]
    assert len(v4) == 1 and v4[0]["label"] == "vt0:vipd", v4
    # The interface is re-created with a new index: the compiled requests are refused
    # (ENODEV) and acquire falls back to the full path, which finds the new index.
    node.ip("link", "del", "vt0")
    node.ip("link", "add", "vt0", "type", "veth", "peer", "name", "vt1")
    node.ip("link", "set", "vt0", "up")
    node.run_async(renew, 1)
    assert len(opened) > full, "the fallback did not use the full request"
    assert node.run_async(mover.held) == {V4, V6}
    assert lifetimes() == {str(V4.ip): 5, str(V6.ip): 5}
    # A different lease is a different request: full path, and the VIPs carry it.
    node.run_async(renew, 1, 9)
    assert lifetimes() == {str(V4.ip): 9, str(V6.ip): 9}


def test_release_removes_exactly_the_vips(lab):
    node = lab.node1
    secondary = IPv4Interface("198.51.100.201/24")  # secondary to the node's own /24
    mover = NetlinkMover(node.ifname, [*VIPS, secondary])
    unrelated = ["203.0.113.7/32", "198.51.100.200/24", "2001:db8:2::7/128"]
    for address in unrelated:
        node.ip("addr", "add", address, "dev", node.ifname, "nodad")
    before = {(i["local"], i["prefixlen"]) for i in node.addresses()}

    async def scenario() -> tuple[set[Any], set[Any], set[Any]]:
        held_before = await mover.held()  # 198.51.100.200/24 is not the /32 VIP
        await mover.acquire(0)
        held = await mover.held()
        await mover.release()
        await mover.release()  # absent counts as released
        return held_before, held, await mover.held()

    held_before, held, held_after = node.run_async(scenario)
    assert held_before == set()
    assert held == {V4, V6, secondary}
    assert held_after == set()
    after = {(i["local"], i["prefixlen"]) for i in node.addresses()}
    assert after == before
    assert (str(node.ipv4.ip), 24) in after and ("198.51.100.200", 24) in after


def test_missing_interface_raises_vip_error_naming_it(lab):
    mover = NetlinkMover("nosuch0", VIPS)

    async def attempt(method: str) -> VipError:
        with pytest.raises(VipError) as caught:
            await getattr(mover, method)(*((0,) if method == "acquire" else ()))
        return caught.value

    for method in ("acquire", "held", "announce"):
        error = lab.node1.run_async(attempt, method)
        assert "nosuch0" in str(error), (method, error)
    assert isinstance(lab.node1.run_async(attempt, "announce").__cause__, OSError)
    lab.node1.run_async(mover.release)  # no interface holds nothing: released


def test_permission_denied_raises_vip_error(lab):
    code = (
        "import asyncio, ipaddress\n"
        "from vipd.errors import VipError\n"
        "from vipd.movers.netlink import NetlinkMover\n"
        "m = NetlinkMover('eth0', [ipaddress.ip_interface('198.51.100.200/32')])\n"
        "for call in (lambda: m.acquire(0), m.announce):\n"
        "    try:\n"
        "        asyncio.run(call())\n"
        "    except VipError as e:\n"
        "        print('VipError', type(e.__cause__).__name__, e)\n"
        "    else:\n"
        "        print('no error')\n"
    )
    no_caps = ["setpriv", "--bounding-set", "-net_admin,-net_raw",
               "--inh-caps", "-net_admin,-net_raw"]
    out = lab.node1.python(code, prefix=no_caps).stdout.splitlines()
    assert len(out) == 2, out
    for line in out:
        assert line.startswith("VipError "), out
        assert "permission denied" in line and "eth0" in line, out
    assert "198.51.100.200/32" in out[0] and "NetlinkError" in out[0]
    assert lab.node1.address("198.51.100.200") is None


def test_gratuitous_arp_moves_the_client_to_the_new_holder(lab):
    old = NetlinkMover(lab.node2.ifname, [V4])
    new = NetlinkMover(lab.node1.ifname, [V4])
    vip = str(V4.ip)
    lab.node2.run_async(old.acquire, 0)
    lab.client.run(poke, vip)
    wait_for(lambda: lab.client.lladdr(vip) == lab.node2.mac, 3,
             "the client to resolve the VIP to node2")
    lab.node2.run_async(old.release)
    lab.node1.run_async(new.acquire, 0)
    time.sleep(0.3)
    assert lab.client.lladdr(vip) == lab.node2.mac, "adding an address announced it"
    lab.node1.run_async(announce_burst, new, 3, 0.05)
    wait_for(lambda: lab.client.lladdr(vip) == lab.node1.mac, 3,
             "the client's neighbour entry to move to node1 after the GARP")


def test_unsolicited_na_moves_the_client_to_the_new_holder(lab):
    old = NetlinkMover(lab.node2.ifname, [V6])
    new = NetlinkMover(lab.node1.ifname, [V6])
    vip = str(V6.ip)
    lab.node2.run_async(old.acquire, 0)
    lab.client.run(poke, vip)
    wait_for(lambda: lab.client.lladdr(vip) == lab.node2.mac, 3,
             "the client to resolve the VIP to node2")
    lab.node2.run_async(old.release)
    lab.node1.run_async(new.acquire, 0)
    # Control: without the override flag the client keeps its entry.
    mac = lab.node1.run(own_mac, lab.node1.ifname)
    frame = build_unsolicited_na(mac, V6.ip, override=False)
    lab.node1.run(send_frame, lab.node1.ifname, frame, ETH_P_IPV6)
    time.sleep(0.3)
    assert lab.client.lladdr(vip) == lab.node2.mac, "NA without override took effect"
    lab.node1.run_async(new.announce)
    wait_for(lambda: lab.client.lladdr(vip) == lab.node1.mac, 3,
             "the client's neighbour entry to move to node1 after the NA")
