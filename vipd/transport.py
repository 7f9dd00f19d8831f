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

from vipd.config import Endpoint
from vipd.errors import VipdError

log = logging.getLogger(__name__)

OnDatagrams = Callable[[list[tuple[bytes, str]]], None]

IP_FREEBIND = 15  # not in Python 3.11's socket module
RECV_SIZE = 2048  # more than any heartbeat (protocol.MAX_DATAGRAM); longer ones are cut
DRAIN_LIMIT = 1024  # more than a socket buffer holds: a flood cannot keep drain() busy


class TransportError(VipdError):
    """The heartbeat socket could not be opened."""


class HeartbeatTransport:
    """The heartbeat socket, read straight from the event loop's selector.

    Deliberately not an asyncio DatagramTransport: an idle pair spends its CPU on
    wakeups, and the transport and protocol layers (write buffering and flow control,
    for a socket that sends one small datagram per interval) cost more per wakeup than
    authenticating the heartbeat. A send that would block (a full socket buffer) is
    dropped and counted, like a datagram lost on the wire.
    """

    def __init__(self, sock: socket.socket, on_datagrams: OnDatagrams,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._sock: socket.socket | None = sock
        self._on_datagrams = on_datagrams
        self._loop = loop
        self.send_errors = 0
        self.receive_errors = 0
        loop.add_reader(sock.fileno(), self._read_ready)

    @classmethod
    async def open(cls, bind: Endpoint, on_datagrams: OnDatagrams) -> HeartbeatTransport:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if bind.host.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)  # start before the address is up
            sock.bind((str(bind.host), bind.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot bind the heartbeat socket to {bind}: "
                                 f"{exc.strerror or exc}") from exc
        sock.setblocking(False)
        return cls(sock, on_datagrams, loop)

    def _read_ready(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Read every queued datagram and hand them over as one batch, in order.

        Usually that is one datagram (then one more recvfrom says the queue is empty).
        After a stall (a paused VM) the peer's heartbeats of the pause wait in the
        socket: the batch lets the runtime authenticate them all before the election
        acts on the first, and the runtime drains before a timer decision too."""
        sock = self._sock
        batch: list[tuple[bytes, str]] = []
        while sock is not None and len(batch) < DRAIN_LIMIT:
            try:
                data, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # An ICMP error queued on the socket (peer port unreachable while it
                # restarts) surfaces here; counted, never fatal.
                self.receive_errors += 1
                continue
            batch.append((data, addr[0]))
        if batch:
            self._on_datagrams(batch)

    def send(self, data: bytes, peers: Iterable[tuple[str, int]]) -> int:
        """Send to each of ``peers`` ((host, port) tuples, made once: this runs for every
        heartbeat); returns how many datagrams went out."""
        sock = self._sock
        if sock is None:
            return 0
        sent = 0
        for peer in peers:
            try:
                sock.sendto(data, peer)
                sent += 1
            except OSError:
                self.send_errors += 1
        return sent

    def close(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
