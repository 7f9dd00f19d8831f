"""Fixed byte vectors for the announcement frames of vipd.movers.frames.

The vectors are written field by field so a reader can check them against RFC 826 /
RFC 4861 by eye; they were also fed to ``tcpdump -vv -e`` which decoded them as a
who-has request for the VIP and a neighbour advertisement with "[icmp6 sum ok]".
The checksum is re-verified here by a separate one's-complement sum.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import pytest

from vipd.movers.frames import (
    ETH_P_ARP,
    ETH_P_IPV6,
    announcement,
    build_garp,
    build_unsolicited_na,
    icmpv6_checksum,
)

MAC = bytes.fromhex("027664000001")

GARP_198_51_100_200 = bytes.fromhex(
    "ffffffffffff"  # Ethernet destination: broadcast
    "027664000001"  # Ethernet source: our MAC
    "0806"          # EtherType ARP
    "0001" "0800"   # hardware Ethernet, protocol IPv4
    "06" "04"       # address lengths
    "0001"          # request
    "027664000001" "c63364c8"  # sender MAC, sender IP 198.51.100.200
    "000000000000" "c63364c8"  # target MAC zero, target IP = sender IP
)

NA_2001_DB8_1__200 = bytes.fromhex(
    "333300000001"  # Ethernet destination: all-nodes multicast
    "027664000001"  # Ethernet source
    "86dd"          # EtherType IPv6
    "60000000"      # version 6, traffic class 0, flow label 0
    "0020" "3a" "ff"  # payload 32 bytes, next header ICMPv6, hop limit 255
    "20010db8000100000000000000000200"  # source: the VIP
    "ff020000000000000000000000000001"  # destination: ff02::1
    "88" "00" "90b4"  # type 136 NA, code 0, checksum
    "20000000"        # flags: override only (router 0, solicited 0)
    "20010db8000100000000000000000200"  # target: the VIP
    "02" "01" "027664000001"  # option: target link-layer address, 8 bytes
)


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_garp_vector():
    assert build_garp(MAC, IPv4Address("198.51.100.200")) == GARP_198_51_100_200
    assert len(GARP_198_51_100_200) == 42


def test_unsolicited_na_vector():
    frame = build_unsolicited_na(MAC, IPv6Address("2001:db8:1::200"))
    assert frame == NA_2001_DB8_1__200
    assert len(frame) == 86


def test_na_checksum_verifies_independently():
    frame = NA_2001_DB8_1__200
    src, dst, icmp = frame[22:38], frame[38:54], frame[54:]
    pseudo = src + dst + struct.pack("!I", len(icmp)) + b"\0\0\0\x3a"
    assert ones_complement_sum(pseudo + icmp) == 0xFFFF


@pytest.mark.parametrize("address", ["2001:db8::1", "2001:db8:ffff::abcd", "2001:db8::"])
def test_na_checksum_holds_for_other_addresses(address):
    vip = IPv6Address(address)
    frame = build_unsolicited_na(MAC, vip)
    icmp = frame[54:]
    pseudo = vip.packed + IPv6Address("ff02::1").packed + struct.pack("!I", len(icmp))
    assert ones_complement_sum(pseudo + b"\0\0\0\x3a" + icmp) == 0xFFFF


def test_na_without_override_differs_only_in_flags_and_checksum():
    vip = IPv6Address("2001:db8:1::200")
    plain = build_unsolicited_na(MAC, vip, override=False)
    assert plain[58:62] == b"\0\0\0\0"
    assert plain[:56] == NA_2001_DB8_1__200[:56]
    assert plain[62:] == NA_2001_DB8_1__200[62:]
    zeroed = plain[54:56] + b"\0\0" + plain[58:]
    assert icmpv6_checksum(vip, IPv6Address("ff02::1"), zeroed) == \
        struct.unpack("!H", plain[56:58])[0]


def test_announcement_picks_frame_and_ethertype_by_family():
    assert announcement(MAC, IPv4Interface("198.51.100.200/32")) == (
        GARP_198_51_100_200, ETH_P_ARP)
    assert announcement(MAC, IPv6Interface("2001:db8:1::200/128")) == (
        NA_2001_DB8_1__200, ETH_P_IPV6)


@pytest.mark.parametrize("mac", [b"", b"\x02\x00", b"\x00" * 7])
def test_builders_reject_a_mac_that_is_not_six_bytes(mac):
    with pytest.raises(ValueError, match="6-byte"):
        build_garp(mac, IPv4Address("198.51.100.1"))
    with pytest.raises(ValueError, match="6-byte"):
        build_unsolicited_na(mac, IPv6Address("2001:db8::1"))
