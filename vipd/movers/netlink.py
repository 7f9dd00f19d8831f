"""The netlink mover: VIPs on a local interface, and telling the LAN where they went.

Theory of operation
-------------------
The netlink mover knows one interface and the VIP list of one config, and offers the
four idempotent operations of `vipd.movers.base.VipMover`: acquire (add or renew),
release (remove), held (what the kernel has now) and announce (one round of gratuitous
ARP / unsolicited neighbour advertisement, frames from `vipd.movers.frames`).

How vipd recognises its own addresses: by exact match of (address, prefix length)
against the configured VIP list, nothing else. That works on every kernel and for VIPs
left behind by a previous run. For the operator's eyes vipd also marks what it adds:
IPv4 VIPs get the label ``<ifname>:vipd`` when that fits in IFNAMSIZ (15 characters;
otherwise the kernel's default label, the interface name), and every VIP carries
``IFA_PROTO`` = `VIPD_ADDR_PROTO` (kernels >= 5.18 store it, older ones ignore it).

Lease: each VIP carries a kernel valid and preferred lifetime of ``ceil(lease)``
seconds (the kernel counts whole seconds; 0 means permanent). `acquire` re-sends the
address with NLM_F_REPLACE, which renews the lifetime in place, so a daemon that dies
or hangs loses its VIPs by the kernel's own hand. IPv6 VIPs are added with IFA_F_NODAD
so they are usable at once instead of "tentative" for about a second.

Caveat for IPv4 VIPs with a prefix shorter than /32: if such a VIP ever became the
*primary* address of its subnet, the kernel removes the subnet's secondaries with it on
release (unless ``promote_secondaries`` is set). Host-sized VIPs (/32, /128), the
normal case, are unaffected.

Sockets: each operation opens its own netlink socket (pyroute2's `AsyncIPRoute` on the
running loop) and closes it at once, so nothing is shared and nothing needs a close() at
shutdown; the socket belongs to the network namespace of the calling thread, which is
what the namespace tests rely on.

Renewals: the active node renews the lease every second, and pyroute2's request path
costs about 0.8 ms of CPU per call (a cold process pays more): at idle that was a
fifth of vipd's whole CPU use. So once a renewal has gone through the full path with
the same interface index and lifetime, pyroute2 compiles the same requests into
bytes (`IPBatch`, its request compiler) and later renewals send those bytes on a raw
netlink socket and check the kernel's acknowledgements: about 10 us. Any failure there
(interface re-created, address refused) falls back to the full path, which reports it.

Every acquire first sends an exclusive add (NLM_F_EXCL) and only then the replace that
renews: the kernel answers EEXIST for a VIP that is present, and adds one that is not.
So a renewal knows, at no extra round trip, that a VIP had gone missing (deleted by
hand, or by a lapsed lease) and says so: the daemon logs and counts every such repair.

Announcing: one AF_PACKET socket per round, bound to the interface, which also tells
us the interface's MAC; the frames are built by `vipd.movers.frames`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv6Interface, ip_interface
from typing import Any

from pyroute2 import AsyncIPRoute, IPBatch
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from vipd.errors import VipError
from vipd.movers.base import VipInterface, lifetime_seconds
from vipd.movers.frames import ARPHRD_ETHER, announcement

log = logging.getLogger(__name__)

VIPD_ADDR_PROTO = 0x76
"""IFA_PROTO value marking addresses added by vipd ('v'); kernel-owned values are 0..3."""

IFNAMSIZ = 16
LABEL_SUFFIX = ":vipd"

NLMSG_ERROR = 2
_NLMSG_ACK = struct.Struct("=IHHIIi")  # nlmsghdr (len, type, flags, seq, pid) + error

SEND_TIMEOUT = 1.0
"""A packet socket send only waits when the device queue is full; never wait long."""


def vipd_label(ifname: str) -> str | None:
    """The IPv4 label vipd puts on its addresses, or None when it would not fit."""
    label = ifname + LABEL_SUFFIX
    return label if len(label) < IFNAMSIZ else None


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None) if isinstance(exc, NetlinkError) else None
    if code is None and isinstance(exc, OSError):
        code = exc.errno
    if code in (errno.EPERM, errno.EACCES):
        return ("permission denied (vipd needs CAP_NET_ADMIN to change addresses and "
                "CAP_NET_RAW to announce them)")
    if code == errno.ENODEV:
        return "no such interface"
    if code == errno.ENETDOWN:
        return "the interface is down"
    if isinstance(code, int):
        return f"{os.strerror(code)} (errno {code})"
    return str(exc)


def _raise_failures(what: str, ifname: str,
                    failures: Sequence[tuple[VipInterface, Exception]]) -> None:
    if not failures:
        return
    detail = "; ".join(f"{vip}: {_reason(exc)}" for vip, exc in failures)
    raise VipError(f"cannot {what} on interface {ifname}: {detail}") from failures[0][1]


class NetlinkMover:
    """`VipMover` on the local kernel through rtnetlink (pyroute2) and packet sockets.

    It acts in the network namespace of the thread that calls it. A missing interface
    makes acquire, held and announce raise `VipError`, but release succeeds: addresses
    die with their interface, so none of ours can be left (that is the safe direction).
    """

    def __init__(self, ifname: str, vips: Iterable[VipInterface]) -> None:
        self.ifname = ifname
        self.vips: tuple[VipInterface, ...] = tuple(dict.fromkeys(vips))
        self.label = vipd_label(ifname)
        # The async pyroute2 API on the caller's event loop: the synchronous one runs a
        # private event loop per call (~2.3 ms of CPU against ~0.35 ms per request).
        # The interface index is looked up again after any failed acquire (an interface
        # that was re-created has a new one); renewals skip the lookup.
        self._ifindex: int | None = None
        # (index, lifetime) of the last full acquire that succeeded, and the requests
        # compiled for the fast renewal path once a second one succeeded with the same.
        self._last_full: tuple[int, int] | None = None
        self._compiled: tuple[int, int, bytes, bytes] | None = None

    def __repr__(self) -> str:
        return f"NetlinkMover({self.ifname!r}, {[str(v) for v in self.vips]})"

    async def acquire(self, lease: float) -> set[VipInterface]:
        lifetime = lifetime_seconds(lease)
        compiled = self._compiled
        if compiled is not None and compiled[:2] == (self._ifindex, lifetime):
            try:
                return self._send_renewal(compiled[2], compiled[3])
            except OSError as exc:  # the full path below reports what is wrong
                log.debug("fast VIP renewal on %s failed (%s); using the full request",
                          self.ifname, _reason(exc))
                self._compiled = None
                self._ifindex = None
        added: set[VipInterface] = set()
        async with self._netlink("add VIPs") as ipr:
            index = self._ifindex
            if index is None:
                index = await self._require_index(ipr, "add VIPs")
            failures: list[tuple[VipInterface, Exception]] = []
            for vip in self.vips:
                request = self._add_request(index, vip, lifetime)
                try:
                    try:
                        await ipr.addr("add", **request)
                        added.add(vip)
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise
                        await ipr.addr("replace", **request)  # present: renew it
                except (NetlinkError, OSError) as exc:
                    failures.append((vip, exc))
            self._ifindex = None if failures else index
            _raise_failures("add VIPs (expected the kernel to accept them)",
                            self.ifname, failures)
        log.debug("VIPs %s on %s with lifetime %s s", self.vips, self.ifname, lifetime)
        # Compile on the second full acquire with the same settings, i.e. on a renewal:
        # never on a takeover's path, where the few ms it takes would delay announcing.
        if self._last_full == (index, lifetime):
            requests = [self._add_request(index, vip, lifetime) for vip in self.vips]
            excl, replace = await asyncio.to_thread(_compile_requests, requests)
            self._compiled = (index, lifetime, excl, replace)
        self._last_full = (index, lifetime)
        return added

    def _send_renewal(self, excl: bytes, replace: bytes) -> set[VipInterface]:
        """The compiled exclusive adds (EEXIST: present), then the compiled replaces."""
        added = set()
        for vip, error in zip(self.vips, _send_compiled(excl, len(self.vips)), strict=True):
            if error == 0:
                added.add(vip)
            elif error != errno.EEXIST:
                raise OSError(error, os.strerror(error))
        for error in _send_compiled(replace, len(self.vips)):
            if error:
                raise OSError(error, os.strerror(error))
        return added

    async def release(self) -> None:
        async with self._netlink("remove VIPs") as ipr:
            index = await self._index(ipr)
            if index is None:
                # Addresses die with their interface: nothing of ours can be left.
                log.info("interface %s does not exist, so it holds none of %s",
                         self.ifname, self.vips)
                return
            failures: list[tuple[VipInterface, Exception]] = []
            for vip in self.vips:
                try:
                    await ipr.addr("del", index=index, address=str(vip.ip),
                                   prefixlen=vip.network.prefixlen)
                except NetlinkError as exc:
                    if exc.code in (errno.EADDRNOTAVAIL, errno.ENODEV):
                        continue  # absent already: the goal is reached
                    failures.append((vip, exc))
                except OSError as exc:
                    failures.append((vip, exc))
            _raise_failures("remove VIPs", self.ifname, failures)
        log.debug("VIPs %s released from %s", self.vips, self.ifname)

    async def held(self) -> set[VipInterface]:
        wanted = set(self.vips)
        present: set[VipInterface] = set()
        async with self._netlink("list addresses") as ipr:
            index = await self._require_index(ipr, "list VIPs")
            try:
                messages = [m async for m in await ipr.addr("dump", index=index)]
            except (NetlinkError, OSError) as exc:
                raise VipError(f"cannot list the addresses of interface {self.ifname}: "
                               f"{_reason(exc)}") from exc
        for msg in messages:
            if msg["index"] != index:
                continue
            # For IPv4 IFA_ADDRESS is the peer on point-to-point links; the address
            # that is ours is IFA_LOCAL.
            key = "local" if msg["family"] == socket.AF_INET else "address"
            address = msg.get(key)
            if address is None:
                continue
            vip = ip_interface(f"{address}/{msg['prefixlen']}")
            if vip in wanted:
                present.add(vip)
        return present

    async def announce(self) -> None:
        # Packet sockets block for microseconds; a worker thread keeps even that off the loop.
        await asyncio.to_thread(self._announce)

    async def watch_addresses(self, changed: Callable[[str, bool], None]) -> None:
        """Call ``changed(vip, present)`` for each of our VIPs the kernel reports added
        (RTM_NEWADDR: by hand, or our own add or renewal) or deleted (RTM_DELADDR: by
        hand, its lifetime running out, our own release), so that a holder puts a deleted
        VIP back and a standby removes one that appeared, at once and without polling
        (STYLE: reconcile on netlink events). Matched by address and prefix only: the
        check that follows is idempotent."""
        mine = {(str(v.ip), v.network.prefixlen): str(v) for v in self.vips}
        async with self._netlink("watch address changes") as ipr:
            await ipr.bind(groups=RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            while True:  # get() yields what one read brought
                async for msg in ipr.get():
                    event = msg.get("event")
                    if event not in ("RTM_NEWADDR", "RTM_DELADDR"):
                        continue
                    address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                    vip = mine.get((address, msg.get("prefixlen")))
                    if vip is not None:
                        changed(vip, event == "RTM_NEWADDR")

    @asynccontextmanager
    async def _netlink(self, what: str) -> AsyncIterator[AsyncIPRoute]:
        """A netlink socket for one operation, in the calling thread's network namespace."""
        try:
            ipr = AsyncIPRoute()
            await ipr.setup_endpoint()
        except OSError as exc:
            raise VipError(f"cannot open a netlink socket to {what} on interface "
                           f"{self.ifname}: {_reason(exc)}") from exc
        try:
            yield ipr
        finally:
            ipr.close()

    async def _index(self, ipr: AsyncIPRoute) -> int | None:
        found = await ipr.link_lookup(ifname=self.ifname)
        return found[0] if found else None

    async def _require_index(self, ipr: AsyncIPRoute, what: str) -> int:
        index = await self._index(ipr)
        if index is None:
            raise VipError(f"cannot {what}: interface {self.ifname} does not exist "
                           f"(expected the configured interface to be present)")
        return index

    def _add_request(self, index: int, vip: VipInterface, lifetime: int) -> dict[str, Any]:
        request: dict[str, Any] = {
            "index": index,
            "address": str(vip.ip),
            "prefixlen": vip.network.prefixlen,
            "valid_lft": lifetime,
            "preferred_lft": lifetime,
            "proto": VIPD_ADDR_PROTO,
        }
        if isinstance(vip, IPv6Interface):
            request["flags"] = IFA_F_NODAD
        elif self.label is not None:
            request["label"] = self.label
        return request

    def _announce(self) -> None:
        if not self.vips:
            return
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except OSError as exc:
            raise VipError(f"cannot open a packet socket to announce VIPs on interface "
                           f"{self.ifname}: {_reason(exc)}") from exc
        with sock:
            sock.settimeout(SEND_TIMEOUT)
            try:
                sock.bind((self.ifname, 0))
            except OSError as exc:
                raise VipError(f"cannot announce VIPs on interface {self.ifname}: "
                               f"{_reason(exc)} (expected the configured interface to "
                               f"exist)") from exc
            _, _, _, hatype, mac = sock.getsockname()
            if hatype != ARPHRD_ETHER or len(mac) != 6:
                raise VipError(f"cannot announce VIPs on interface {self.ifname}: it is "
                               f"not Ethernet (hardware type {hatype}); gratuitous ARP "
                               f"and neighbour advertisements need an Ethernet interface")
            failures: list[tuple[VipInterface, Exception]] = []
            for vip in self.vips:
                frame, ethertype = announcement(mac, vip)
                try:
                    sock.sendto(frame, (self.ifname, ethertype))
                except OSError as exc:
                    failures.append((vip, exc))
            _raise_failures("announce VIPs", self.ifname, failures)


def _compile_requests(requests: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """The RTM_NEWADDR exclusive-add and replace requests for ``requests`` as bytes, by
    pyroute2's compiler. IPBatch runs its own event loop, so this belongs in a worker
    thread."""
    compiled = []
    for command in ("add", "replace"):
        batch = IPBatch()
        try:
            for request in requests:
                batch.addr(command, **request)
            compiled.append(bytes(batch.batch))
        finally:
            batch.close()
    return compiled[0], compiled[1]


def _send_compiled(data: bytes, count: int) -> list[int]:
    """Send ``count`` compiled requests on a raw netlink socket; the errno of each ack
    (0 = done), in request order.

    rtnetlink handles a request inside the sending call, so the acks are queued by the
    time send() returns: no waiting. Raises OSError for any surprise in the replies."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        sock.send(data)
        errors = []
        for _ in range(count):
            reply = sock.recv(65536, socket.MSG_DONTWAIT)
            if len(reply) < _NLMSG_ACK.size:
                raise OSError(errno.EPROTO, f"short netlink reply ({len(reply)} bytes)")
            _, kind, _, _, _, error = _NLMSG_ACK.unpack_from(reply)
            if kind != NLMSG_ERROR:
                raise OSError(errno.EPROTO, f"netlink reply of type {kind}, expected an ack")
            errors.append(-error)
        return errors
