"""Two vipd daemons in one event loop, heartbeating over UDP on 127.0.0.1, each with its
own FakeMover: the pair of the daemon, metrics and systemd unit tests.

Both daemons install their signal handlers on the same loop, so no test delivers a real
signal: they call ``_on_stop_signal()`` / ``_on_reload_signal()`` instead. A crash is a
transport that stops sending followed by cancelling the task (the cancelled daemon still
releases its own FakeMover's VIPs; what the tests look at is the peer's reaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterable
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

import yaml

from support.fakes import FakeMover
from vipd.config import load_config
from vipd.core.protocol import State
from vipd.daemon import Daemon
from vipd.keys import generate_key_line
from vipd.movers.base import VipInterface

VIPS = ["192.0.2.10/32", "2001:db8::10/128"]
VIP_SET = {ip_interface(v) for v in VIPS}
LEASE = 1.0
WAIT = 5.0  # generous: a failover here takes ~100 ms


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_ports(count: int) -> list[int]:
    """Distinct free UDP ports on 127.0.0.1 (all bound at once, so never the same)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


async def eventually(cond: Callable[[], bool], timeout: float = WAIT,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:g}s")
        await asyncio.sleep(0.01)


class JournalMover(FakeMover):
    """A FakeMover that also notes each successful acquire/release in a journal shared by
    both nodes, so the order across the pair can be asserted."""

    def __init__(self, vips: Iterable[VipInterface], node: str,
                 journal: list[tuple[str, str]]) -> None:
        super().__init__(vips)
        self.node = node
        self.journal = journal

    async def acquire(self, lease: float) -> set[VipInterface]:
        added = await super().acquire(lease)
        self.journal.append((self.node, "acquire"))
        return added

    async def release(self) -> None:
        await super().release()
        self.journal.append((self.node, "release"))


class Node:
    def __init__(self, name: str, settings: dict[str, Any], path: Path,
                 journal: list[tuple[str, str]]) -> None:
        self.name = name
        self.settings = settings
        self.config_path = path
        self.mover = JournalMover(VIP_SET, name, journal)
        self._daemon: Daemon | None = None
        self._task: asyncio.Task[int] | None = None

    @property
    def daemon(self) -> Daemon:
        assert self._daemon is not None, f"node {self.name} not started"
        return self._daemon

    @property
    def task(self) -> asyncio.Task[int]:
        assert self._task is not None, f"node {self.name} not started"
        return self._task

    @property
    def state(self) -> State:
        return self.daemon.election.state

    @property
    def term(self) -> int:
        return self.daemon.election.term

    def write(self, **changes: Any) -> None:
        self.settings.update(changes)
        self.config_path.write_text(yaml.safe_dump(self.settings))

    def start(self) -> None:
        self.write()
        self._daemon = Daemon(load_config(self.config_path), config_path=self.config_path,
                              mover=self.mover)
        self._task = asyncio.create_task(self._daemon.run(), name=f"daemon {self.name}")

    async def stop(self, timeout: float = 2.0) -> int:
        self.daemon._on_stop_signal()
        return await asyncio.wait_for(self.task, timeout)

    async def crash(self) -> None:
        """Silence the heartbeats first, so the peer sees a dead node, then kill the task."""
        assert self.daemon.transport is not None
        self.daemon.transport.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def teardown(self) -> BaseException | None:
        """Stop if still running; returns the daemon's exception, if it raised one."""
        if self._task is None:
            return None
        if not self._task.done():
            if self.daemon._loop is not None:
                self.daemon._on_stop_signal()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 3.0)
            except TimeoutError:
                self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._task.cancelled():
            return None
        return self._task.exception()


class Pair:
    """Node a (priority 150) and node b (priority 100), configured but not started, so a
    test can edit ``settings`` and the movers first."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.journal: list[tuple[str, str]] = []
        self.key_file = tmp_path / "keys"
        self.key_file.write_text(generate_key_line(1) + "\n")
        self.key_file.chmod(0o600)
        port_a, port_b = free_udp_ports(2)
        self.a = self._node("a", 150, port_a, port_b)
        self.b = self._node("b", 100, port_b, port_a)

    def _node(self, name: str, priority: int, port: int, peer_port: int) -> Node:
        settings: dict[str, Any] = {
            "node": name, "cluster": "test", "interface": "fake0", "vips": list(VIPS),
            "priority": priority,
            "heartbeat": {"bind": f"127.0.0.1:{port}", "peers": [f"127.0.0.1:{peer_port}"],
                          "interval": "20ms", "dead_after": 5},
            "auth": {"key_file": str(self.key_file)},
            "vip_lease": "1s",
            "state_dir": str(self.tmp_path / f"state-{name}"),
            # Two daemons share one host: neither needs the control API or metrics.
            "api": {"listen": None},
            "metrics": {"listen": None},
            # fake0 exists only for the FakeMover: there is no link to track.
            "track_interface": False,
        }
        if os.geteuid() == 0:
            # Checks and hooks use files in root's 0700 tmp_path: keep uid 0 (every
            # capability is still dropped); the default "nobody" could not reach them.
            settings["exec_user"] = "root"
        return Node(name, settings, self.tmp_path / f"{name}.yaml", self.journal)

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b

    def start(self) -> None:
        self.a.start()
        self.b.start()

    async def settled(self) -> None:
        """a ACTIVE holding the VIPs, b STANDBY holding none."""
        await eventually(lambda: self.a.state is State.ACTIVE and self.b.state is State.STANDBY
                         and self.a.mover.addresses == VIP_SET and not self.b.mover.addresses,
                         what="a ACTIVE with the VIPs, b STANDBY without")

    async def close(self) -> None:
        errors = [await node.teardown() for node in (self.b, self.a)]
        for error in errors:
            if error is not None:
                raise error



def exec_check(flag: Path) -> dict[str, Any]:
    return {"name": "flag", "exec": {"command": ["/usr/bin/test", "-e", str(flag)]},
            "interval": "50ms", "timeout": "40ms", "rise": 1, "fall": 1}
