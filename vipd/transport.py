"""UDP heartbeat endpoint: unicast to each configured peer address.

Unicast UDP works where clouds block multicast and IP protocol 112 (VRRP). Several peer
addresses mean several paths to the same peer (e.g. two NICs): every heartbeat goes to
all of them and the receiver drops the redundant copies as duplicates.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from typing import cast

from vipd.config import Endpoint
from vipd.errors import VipdError

log = logging.getLogger(__name__)

OnDatagram = Callable[[bytes, str], None]


class TransportError(VipdError):
    """The heartbeat socket could not be opened."""


class HeartbeatTransport(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: OnDatagram) -> None:
        self._on_datagram = on_datagram
        self._transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0

    @classmethod
    async def open(cls, bind: Endpoint, on_datagram: OnDatagram) -> HeartbeatTransport:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if bind.host.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # IP_FREEBIND (15; not in Python 3.11's socket module): start before the address is up.
            sock.setsockopt(socket.SOL_IP, 15, 1)
            sock.bind((str(bind.host), bind.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot bind the heartbeat socket to {bind}: "
                                 f"{exc.strerror or exc}") from exc
        sock.setblocking(False)
        proto = cls(on_datagram)
        await loop.create_datagram_endpoint(lambda: proto, sock=sock)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self._on_datagram(data, str(addr[0]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (peer port unreachable while it restarts) are expected; counted only.
        self.send_errors += 1

    def send(self, data: bytes, peers: Iterable[tuple[str, int]]) -> None:
        """`peers` as (host, port) tuples, made once: this runs for every heartbeat."""
        if self._transport is None:
            return
        for peer in peers:
            try:
                self._transport.sendto(data, peer)
            except OSError:
                self.send_errors += 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
