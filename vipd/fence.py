"""A gate the kernel closes by itself: the VIPs answer only while the holder renews it.

A frozen or killed process cannot release anything, and address lifetimes count whole
seconds. So the VIPs sit behind nftables tables of their own, one per cluster: an `arp`
table drops ARP requests for a VIP and ARP replies from it, and an `inet` table drops
IPv4/IPv6 traffic to and from a VIP (neighbour advertisements included: the kernel sends
them from the VIP), unless the VIP is an element of the `lease4` / `lease6` set. The
elements carry a timeout in milliseconds: the holder re-adds them with every renewal,
and when it stops (crash, SIGSTOP, a paused VM) the kernel drops them and the gate shuts
within the timeout, where the address lifetime would take seconds. Our own gratuitous
ARP / NA leave through packet sockets, which netfilter does not see: only a holder
sends them.

With heartbeat settings (a pair) the `inet` table also filters the heartbeat port: UDP
to the heartbeat bind address and port is dropped in the kernel unless it comes from a
peer or a witness (whose replies come back to the same socket), counted in the named
counter `heartbeat_filtered`. A flood from elsewhere then costs the daemon no wakeup at
all; the source address is all the kernel can check (a spoofed peer address still reaches
the socket and fails the MAC there).

libnftables (Debian's libnftables1) through ctypes: a few functions, one context per
fence, no process per renewal (a "flush + add element" batch costs about 60 us).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from vipd.configtypes import Endpoint
from vipd.errors import VipError
from vipd.movers.base import VipInterface

log = logging.getLogger(__name__)

LIBRARY = "libnftables.so.1"
FILTERED = "heartbeat_filtered"  # the named counter of heartbeats dropped in the kernel


class FenceError(VipError):
    """nftables is missing or refused a command."""


class Nft:
    """One libnftables context: commands in, output out, errors as FenceError."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL(LIBRARY)
        except OSError as exc:
            raise FenceError(f"cannot load {LIBRARY} ({exc}): the kernel fence needs "
                             "nftables' library; install it with: apt-get install "
                             "libnftables1 nftables") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise FenceError("nft_ctx_new failed: cannot talk to nftables")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str) -> str:
        """Run ``commands`` as one transaction; their output."""
        lib = self._lib
        if lib.nft_run_cmd_from_buffer(self._ctx, commands.encode()) != 0:
            error = (lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode().strip()
            raise FenceError(f"nftables refused the fence commands: {error or 'no detail'}")
        return (lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def check_nftables(talk: bool) -> str:
    """Raise FenceError (saying what to install) unless libnftables loads and, with
    ``talk``, the kernel answers a harmless command (needs CAP_NET_ADMIN)."""
    nft = Nft()
    try:
        if talk:
            nft.run("list tables arp")
            return "nftables works (libnftables loaded, the kernel answers)"
        return f"{LIBRARY} loads"
    finally:
        nft.close()


@dataclass(frozen=True)
class HeartbeatFilter:
    """Who may reach the heartbeat socket at ``bind``: the ``sources`` (the peers'
    and the witnesses' addresses, of bind's family: the config checks that)."""

    bind: Endpoint
    sources: tuple[IPv4Address | IPv6Address, ...]

    def rules(self) -> list[str]:
        """The set of sources, and the chain that drops the rest before the socket."""
        b = self.bind
        v6 = b.host.version == 6
        ip, kind = ("ip6", "ipv6_addr") if v6 else ("ip", "ipv4_addr")
        sources = ", ".join(sorted({str(s) for s in self.sources}))
        to = "" if b.host.is_unspecified else f"{ip} daddr {b.host} "
        drop = f"counter name {FILTERED} drop"
        lines = [f"  set heartbeat_sources {{ type {kind}; elements = {{ {sources} }} }}",
                 f"  counter {FILTERED} {{ comment \"heartbeats to {b} from elsewhere\" }}",
                 # Before the gate's chain; nothing here accepts, so other filters still see
                 # what passes.
                 "  chain heartbeat { type filter hook input priority filter - 10; "
                 "policy accept;",
                 f"    {to}udp dport {b.port} {ip} saddr != @heartbeat_sources {drop}"]
        if v6 and b.host.is_unspecified:
            # A socket bound to :: takes IPv4 too (as ::ffff:a.b.c.d): never a peer.
            lines.append(f"    meta nfproto ipv4 udp dport {b.port} {drop}")
        return [*lines, "  }"]


class KernelFence:
    """The gate of one cluster's VIPs (in the calling thread's network namespace), and
    with ``heartbeat`` the filter in front of the heartbeat socket."""

    def __init__(self, cluster: str, vips: Iterable[VipInterface], nft: Nft | None = None,
                 heartbeat: HeartbeatFilter | None = None) -> None:
        self.table = f"vipd_{cluster.replace('-', '_').replace('.', '_')}"
        self.v4 = sorted(str(v.ip) for v in vips if isinstance(v, IPv4Interface))
        self.v6 = sorted(str(v.ip) for v in vips if isinstance(v, IPv6Interface))
        self.heartbeat = heartbeat
        self._nft = nft or Nft()

    def install(self) -> None:
        """Create the tables, gate shut (replacing any left by an earlier run)."""
        self._nft.run(self.remove_commands() + self._tables())
        log.info("kernel fence installed (nftables tables arp/inet %s): %s shut", self.table,
                 ", ".join(self.v4 + self.v6))
        if self.heartbeat is not None:
            log.info("heartbeats to %s accepted from %s only (dropped in the kernel, counted "
                     "in inet %s counter %s)", self.heartbeat.bind,
                     ", ".join(map(str, self.heartbeat.sources)), self.table, FILTERED)

    def open(self, timeout: float) -> None:
        """Open (or keep open) the gate for ``timeout`` seconds from now."""
        ms = max(1, round(timeout * 1000))
        self._nft.run("".join(self._renew(family, setname, addrs, ms)
                              for family, setname, addrs in self._sets()))

    def close(self) -> None:
        """Shut the gate now."""
        self._nft.run("".join(f"flush set {family} {self.table} {setname}\n"
                              for family, setname, addrs in self._sets() if addrs))

    def remove(self) -> None:
        self._nft.run(self.remove_commands())

    def filtered(self) -> int | None:
        """Heartbeat datagrams the kernel dropped since install (None: no filter)."""
        if self.heartbeat is None:
            return None
        out = self._nft.run(f"list counter inet {self.table} {FILTERED}\n")
        found = re.search(r"\bpackets (\d+)", out)
        if found is None:
            raise FenceError(f"nftables listed counter inet {self.table} {FILTERED} without "
                             f"a packet count: {out.strip()!r}")
        return int(found.group(1))

    def remove_commands(self) -> str:
        # "add" then "delete": deleting a table that does not exist is an error.
        return "".join(f"add table {family} {self.table}\ndelete table {family} {self.table}\n"
                       for family in ("arp", "inet"))

    def _sets(self) -> list[tuple[str, str, list[str]]]:
        return [("arp", "lease4", self.v4), ("inet", "lease4", self.v4),
                ("inet", "lease6", self.v6)]

    def _renew(self, family: str, setname: str, addrs: list[str], ms: int) -> str:
        if not addrs:
            return ""
        elements = ", ".join(f"{a} timeout {ms}ms" for a in addrs)
        return (f"flush set {family} {self.table} {setname}\n"
                f"add element {family} {self.table} {setname} {{ {elements} }}\n")

    def _tables(self) -> str:
        t, v4, v6 = self.table, ", ".join(self.v4), ", ".join(self.v6)
        lines = [f"table arp {t} {{",
                 "  set lease4 { type ipv4_addr; flags timeout; }"]
        if v4:
            lines += ["  chain in { type filter hook input priority 0; policy accept;",
                      f"    arp daddr ip {{ {v4} }} arp daddr ip != @lease4 drop", "  }",
                      "  chain out { type filter hook output priority 0; policy accept;",
                      f"    arp saddr ip {{ {v4} }} arp saddr ip != @lease4 drop", "  }"]
        lines += ["}", f"table inet {t} {{",
                  "  set lease4 { type ipv4_addr; flags timeout; }",
                  "  set lease6 { type ipv6_addr; flags timeout; }",
                  "  chain in { type filter hook input priority 0; policy accept;"]
        if v4:
            lines.append(f"    ip daddr {{ {v4} }} ip daddr != @lease4 drop")
        if v6:
            lines.append(f"    ip6 daddr {{ {v6} }} ip6 daddr != @lease6 drop")
        lines.append("  }")
        if self.heartbeat is not None:
            lines += self.heartbeat.rules()
        lines.append("  chain out { type filter hook output priority 0; policy accept;")
        if v4:
            lines.append(f"    ip saddr {{ {v4} }} ip saddr != @lease4 drop")
        if v6:
            lines.append(f"    ip6 saddr {{ {v6} }} ip6 saddr != @lease6 drop")
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"
