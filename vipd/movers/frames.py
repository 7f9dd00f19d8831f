"""Announcement frames: gratuitous ARP and unsolicited neighbour advertisements.

Gratuitous ARP is a broadcast ARP request with sender IP = target IP = VIP (a Linux
receiver updates an existing neighbour entry from it even with ``arp_accept=0``). IPv6
uses an unsolicited neighbour advertisement to ff02::1 with the override flag set
(without it a receiver keeps a REACHABLE entry), source address = the VIP (as the kernel
itself does), hop limit 255, and our own ICMPv6 checksum. Pure functions, so tests pin
them byte for byte (tests/unit/test_vip_frames.py).
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Interface, IPv6Address

from vipd.movers.base import VipInterface

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ARPHRD_ETHER = 1
ARPOP_REQUEST = 1
IPPROTO_ICMPV6 = 58
ND_NEIGHBOR_ADVERT = 136
ND_OPT_TARGET_LINKADDR = 2
ND_NA_FLAG_OVERRIDE = 0x20000000

BROADCAST_MAC = b"\xff" * 6
ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"


def _check_mac(mac: bytes) -> None:
    if len(mac) != 6:
        raise ValueError(f"expected a 6-byte Ethernet address, got {mac!r}")


def build_garp(mac: bytes, ip: IPv4Address) -> bytes:
    """Ethernet frame of a gratuitous ARP request announcing ``ip`` at ``mac``.

    A request rather than a reply: Linux treats both as gratuitous, but a reply also
    needs target MAC = sender MAC, and some stacks only look at requests. The target
    MAC is zero, as RFC 5227 recommends for announcements.
    """
    _check_mac(mac)
    arp = struct.pack("!HHBBH6s4s6s4s", ARPHRD_ETHER, ETH_P_IP, 6, 4, ARPOP_REQUEST,
                      mac, ip.packed, b"\x00" * 6, ip.packed)
    return BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP) + arp


def icmpv6_checksum(src: IPv6Address, dst: IPv6Address, message: bytes) -> int:
    """RFC 4443 checksum of ``message`` (checksum field zeroed) with the pseudo-header."""
    data = src.packed + dst.packed + struct.pack("!I3xB", len(message), IPPROTO_ICMPV6)
    data += message
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_unsolicited_na(mac: bytes, ip: IPv6Address, *, override: bool = True) -> bytes:
    """Ethernet frame of an unsolicited neighbour advertisement of ``ip`` at ``mac``.

    Sent from the VIP itself to all nodes (ff02::1) with hop limit 255 (receivers drop
    anything else), solicited flag clear (required for a multicast destination) and
    override set so that receivers replace an entry pointing at the old node.
    ``override=False`` exists for tests that show why the flag matters.
    """
    _check_mac(mac)
    flags = ND_NA_FLAG_OVERRIDE if override else 0
    option = struct.pack("!BB6s", ND_OPT_TARGET_LINKADDR, 1, mac)
    message = struct.pack("!BBHI16s", ND_NEIGHBOR_ADVERT, 0, 0, flags, ip.packed) + option
    checksum = icmpv6_checksum(ip, ALL_NODES, message)
    message = message[:2] + struct.pack("!H", checksum) + message[4:]
    ipv6 = struct.pack("!IHBB16s16s", 6 << 28, len(message), IPPROTO_ICMPV6, 255,
                       ip.packed, ALL_NODES.packed)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + message


def announcement(mac: bytes, vip: VipInterface) -> tuple[bytes, int]:
    """The frame announcing ``vip`` and its EtherType."""
    if isinstance(vip, IPv4Interface):
        return build_garp(mac, vip.ip), ETH_P_ARP
    return build_unsolicited_na(mac, vip.ip), ETH_P_IPV6
