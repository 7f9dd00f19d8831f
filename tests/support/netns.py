"""The namespace lab of `vipd.demo.lab` with what only the tests use on top.

`Lab` and `Host` extend the demo's: ``lab.node1`` / ``node2`` / ``client``;
`Host.run_async` (``asyncio.run`` in a thread inside the namespace: how the mover tests
drive the real `NetlinkMover` in-process, its ``asyncio.to_thread`` workers included);
`Host.exec` / `Host.python`, subprocesses under ``ip netns exec`` for commands and for
code that needs different privileges (``setpriv``); the neighbour table. Plus what the
integration conftest needs to skip or fail and to clean up (`unavailable_reason`,
`sweep`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

from vipd.demo import lab as demo_lab
from vipd.demo.lab import DEFAULT_ROLES, delete_namespace, list_namespaces, run_in_netns

T = TypeVar("T")


def unavailable_reason(probe_name: str) -> str | None:
    """Why namespaces cannot be built here, or None when they can (tries one)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network-namespace tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "network-namespace tests need the ip command (apt-get install iproute2)"
    added = subprocess.run(["ip", "netns", "add", probe_name], capture_output=True,
                           text=True, check=False)
    if added.returncode != 0:
        return f"cannot create a network namespace: {added.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe_name], capture_output=True, check=False)
    return None


def sweep(prefix: str) -> list[str]:
    """Delete leftover namespaces whose names start with ``prefix``; return them."""
    leftovers = [ns for ns in list_namespaces() if ns.startswith(prefix)]
    for ns in leftovers:
        delete_namespace(ns)
    return leftovers


def run_async_in_netns(ns: str, coro_fn: Callable[..., Coroutine[Any, Any, T]],
                       *args: Any, timeout: float = 60.0) -> T:
    """``asyncio.run(coro_fn(*args))`` on a fresh event loop in a thread inside ``ns``."""
    return run_in_netns(ns, lambda: asyncio.run(coro_fn(*args)), timeout=timeout)


def poke(address: str) -> None:
    """One UDP datagram to ``address`` (run it in a namespace): the sender resolves it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"vipd-test", (address, 9))


class Host(demo_lab.Host):
    def run_async(self, coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any,
                  timeout: float = 60.0) -> T:
        return run_async_in_netns(self.ns, coro_fn, *args, timeout=timeout)

    def exec(self, *argv: str, prefix: Sequence[str] = (), check: bool = True,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace; ``prefix`` goes before it (e.g. setpriv)."""
        full = ["ip", "netns", "exec", self.ns, *prefix, *argv]
        done = subprocess.run(full, capture_output=True, text=True, check=False,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def python(self, code: str, *, prefix: Sequence[str] = (), check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code`` (this interpreter, this sys.path) in the namespace."""
        env_path = os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)
        return self.exec("env", f"PYTHONPATH={env_path}", sys.executable, "-c", code,
                         prefix=prefix, check=check, timeout=timeout)

    def neighbour(self, address: str) -> dict[str, Any] | None:
        entries = json.loads(self.ip("-j", "neigh", "show", "to", address, "dev",
                                     self.ifname))
        return entries[0] if entries else None

    def lladdr(self, address: str) -> str | None:
        """The MAC this host's neighbour table holds for ``address``, if any."""
        entry = self.neighbour(address)
        return entry.get("lladdr") if entry else None


class Lab(demo_lab.Lab):
    """`vipd.demo.lab.Lab` whose hosts are this module's `Host`."""

    def __init__(self, prefix: str, roles: Sequence[str] = DEFAULT_ROLES) -> None:
        super().__init__(prefix, roles)
        self.hosts = {role: Host(h.role, h.ns, h.number) for role, h in self.hosts.items()}

    def __getitem__(self, role: str) -> Host:
        return cast(Host, self.hosts[role])

    @property
    def node1(self) -> Host:
        return self["node1"]

    @property
    def node2(self) -> Host:
        return self["node2"]

    @property
    def client(self) -> Host:
        return self["client"]
