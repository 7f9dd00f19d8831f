"""A LAN of network namespaces, the ground `vipd demo` and the benchmarks run on.

Topology: one "switch" namespace holding a bridge ``br0`` (STP off, forward delay 0,
multicast snooping off) and, for every host role, a namespace whose ``eth0`` is a veth
plugged into the bridge. Host number ``n`` (1-based, in role order) gets
198.51.100.n/24, 2001:db8:1::n/64 and MAC 02:76:64:00:00:0n. Nothing is configured in
the host's own namespace: every ``ip`` command runs with ``-n NS`` or inside
``ip netns exec NS``; the veth pair is created inside the switch namespace and its
peer is born in the host namespace.

Two ways to run code in a namespace, and when to use which:

* `run_in_netns` / `Host.run`: a fresh thread that ``setns``-es itself into the
  namespace and runs a function there. Sockets and netlink handles it opens belong to
  that namespace, and threads it starts inherit it; exceptions and return values are
  passed back. It does not remount /sys, so code run this way must not read
  /sys/class/net (netlink and sockets are fine).
* `Host.spawn`: a subprocess under ``ip netns exec``, for long-running daemons. Spawned
  processes get their own process group and are SIGKILLed with everything else in the
  namespace when the lab is destroyed.

Partitions: `Lab.block` drops frames between two hosts' bridge ports (both ways or one
way) with an nftables ``bridge`` table in the switch namespace; `Lab.heal` removes it.
A port is one host (one MAC), and the bridge's forward hook sees every copy of a flooded
frame with its output port, so broadcasts (ARP requests) are cut too, as by a pulled
cable; a rule on MAC or IP pairs would let them through.

The tests add their own helpers on top (tests/support/netns.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any, Self, TypeVar

from vipd.fence import FenceError, Nft

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
SUBNET4 = "198.51.100"
SUBNET6 = "2001:db8:1"
DEFAULT_ROLES = ("node1", "node2", "client")
PARTITION_TABLE = "vipdlab_partition"

# Measured here: a new namespace copies the host's IPv4 all/default sysctls, so the
# ones that change ARP behaviour are set explicitly; IPv6 DAD, RS and RA are switched
# off so that addresses are usable at once and the wire stays quiet.
_IPV4_CONF = {"rp_filter": 0, "arp_ignore": 0, "arp_announce": 0, "arp_accept": 0}
_IPV6_CONF = {"disable_ipv6": 0, "accept_dad": 0, "dad_transmits": 0, "accept_ra": 0,
              "router_solicitations": 0}


def wait_ready(proc: subprocess.Popen[Any], ready: str, what: str, timeout: float) -> None:
    """Wait until a helper process in a namespace creates its ``ready`` file; raise
    RuntimeError naming it if it exits or takes longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {proc.poll()}; expected {ready})")
        time.sleep(0.005)


def new_prefix() -> str:
    """A namespace name prefix unique to this process and run."""
    return f"vt{os.getpid()}{secrets.token_hex(2)}-"


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n ns] args...`` and return its stdout; failures name the command."""
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done.stdout


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def delete_namespace(ns: str) -> None:
    """Kill every process inside ``ns`` (they are the lab's own), then delete it."""
    pids = ip("netns", "pids", ns, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", ns, check=False)


_libc: ctypes.CDLL | None = None


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace ``ns``."""
    global _libc
    fd = os.open(os.path.join(NETNS_RUN_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns = getattr(os, "setns", None)  # Python >= 3.12
        if setns is not None:
            setns(fd, CLONE_NEWNET)
            return
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def run_in_netns(ns: str, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
    """Call ``fn(*args)`` in a new thread inside ``ns``; return or raise its outcome."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(ns)
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller, who re-raises it
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"code in network namespace {ns} still running after "
                           f"{timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass
class Host:
    """One namespace on the lab LAN with its ``eth0``."""

    role: str
    ns: str
    number: int
    ifname: str = "eth0"
    procs: list[subprocess.Popen[str]] = field(default_factory=list, repr=False)

    @property
    def mac(self) -> str:
        return f"02:76:64:00:00:{self.number:02x}"

    @property
    def ipv4(self) -> IPv4Interface:
        return IPv4Interface(f"{SUBNET4}.{self.number}/24")

    @property
    def ipv6(self) -> IPv6Interface:
        return IPv6Interface(f"{SUBNET6}::{self.number:x}/64")

    def ip(self, *args: str, check: bool = True) -> str:
        return ip(*args, ns=self.ns, check=check)

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0) -> T:
        return run_in_netns(self.ns, fn, *args, timeout=timeout)

    def spawn(self, *argv: str, **popen: Any) -> subprocess.Popen[str]:
        """Start a long-running process in the namespace, killed when the lab goes."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], text=True,
                                start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def addresses(self) -> list[dict[str, Any]]:
        """``ip -j addr show dev eth0``: the kernel's view, independent of pyroute2."""
        links = json.loads(self.ip("-j", "addr", "show", "dev", self.ifname))
        return [info for link in links for info in link.get("addr_info", [])]

    def address(self, local: str) -> dict[str, Any] | None:
        for info in self.addresses():
            if info.get("local") == local:
                return info
        return None

    def kill_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self.procs.clear()


class Lab:
    """Namespaces named ``<prefix>sw`` and ``<prefix><role>``, deleted by `destroy`."""

    def __init__(self, prefix: str, roles: Sequence[str] = DEFAULT_ROLES) -> None:
        if len(set(roles)) != len(roles) or any(len(r) > 15 or not r for r in roles):
            raise ValueError(f"lab roles must be unique names of 1..15 chars: {roles}")
        self.prefix = prefix
        self.switch = f"{prefix}sw"
        self.hosts = {role: Host(role, f"{prefix}{role}", n)
                      for n, role in enumerate(roles, start=1)}
        self._created: list[str] = []
        self.switch_procs: list[subprocess.Popen[str]] = []

    @classmethod
    def create(cls, prefix: str, roles: Sequence[str] = DEFAULT_ROLES) -> Self:
        lab = cls(prefix, roles)
        try:
            lab._build()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def sysctl(self, ns: str, settings: dict[str, object]) -> None:
        pairs = [f"{key}={value}" for key, value in settings.items()]
        argv = ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *pairs]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"sysctl in {ns} failed: {done.stderr.strip()}")

    def _conf(self, ifaces: Sequence[str]) -> dict[str, object]:
        settings: dict[str, object] = {}
        for iface in ifaces:
            settings.update({f"net.ipv4.conf.{iface}.{k}": v for k, v in _IPV4_CONF.items()})
            settings.update({f"net.ipv6.conf.{iface}.{k}": v for k, v in _IPV6_CONF.items()})
        return settings

    def _build(self) -> None:
        for ns in (self.switch, *(h.ns for h in self.hosts.values())):
            ip("netns", "add", ns)
            self._created.append(ns)
        # The switch has no addresses; no IPv6 on it keeps the wire quiet.
        self.sysctl(self.switch, {"net.ipv6.conf.all.disable_ipv6": 1,
                                  "net.ipv6.conf.default.disable_ipv6": 1})
        subprocess.run(["ip", "netns", "exec", self.switch, "sh", "-c",
                        "for f in /proc/sys/net/bridge/bridge-nf-call-*; do "
                        "[ -e \"$f\" ] && echo 0 > \"$f\"; done; true"],
                       check=True, capture_output=True, timeout=30)
        ip("link", "add", "name", "br0", "type", "bridge", "stp_state", "0",
           "forward_delay", "0", "mcast_snooping", "0", ns=self.switch)
        ip("link", "set", "br0", "up", ns=self.switch)
        for host in self.hosts.values():
            self.sysctl(host.ns, self._conf(("all", "default")))
            ip("link", "add", "name", host.role, "type", "veth", "peer", "name",
               host.ifname, "address", host.mac, "netns", host.ns, ns=self.switch)
            self.sysctl(host.ns, self._conf((host.ifname,)))
            ip("link", "set", host.role, "master", "br0", "up", ns=self.switch)
            host.ip("link", "set", "lo", "up")
            host.ip("link", "set", host.ifname, "up")
            host.ip("addr", "add", str(host.ipv4), "dev", host.ifname)
            host.ip("addr", "add", str(host.ipv6), "dev", host.ifname, "nodad")
        self._wait_ready()

    def block(self, a: str, b: str, *, oneway: bool = False) -> None:
        """Drop every frame from host ``a`` to host ``b`` (and from ``b`` to ``a`` unless
        ``oneway``) at the switch, until `heal`."""
        for role in (a, b):
            if role not in self.hosts:
                raise ValueError(f"no host {role!r} in this lab; expected one of "
                                 f"{', '.join(self.hosts)}")
        pairs = [(a, b)] if oneway else [(a, b), (b, a)]
        rules = "".join(f'add rule bridge {PARTITION_TABLE} forward iifname "{src}" '
                        f'oifname "{dst}" drop\n' for src, dst in pairs)
        self.nft(f"add table bridge {PARTITION_TABLE}\n"
                 f"add chain bridge {PARTITION_TABLE} forward {{ type filter hook forward "
                 f"priority -200; policy accept; }}\n{rules}")

    def heal(self) -> None:
        """Remove every `block`."""
        self.nft(f"add table bridge {PARTITION_TABLE}\n"
                 f"delete table bridge {PARTITION_TABLE}\n")

    def blocked(self) -> list[tuple[str, str]]:
        """The (from, to) host pairs `block` cuts now."""
        try:
            text = self.nft(f"list table bridge {PARTITION_TABLE}")
        except RuntimeError:
            return []
        return [(m[0], m[1]) for m in re.findall(r'iifname "([^"]+)" oifname "([^"]+)" drop',
                                                 text)]

    def switch_spawn(self, *argv: str, **popen: Any) -> subprocess.Popen[str]:
        """Start a process in the switch namespace (a forwarder between ports), killed
        when the lab goes."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.switch, *argv], text=True,
                                start_new_session=True, **popen)
        self.switch_procs.append(proc)
        return proc

    def nft(self, commands: str) -> str:
        """nftables commands as one transaction in the switch namespace (libnftables,
        no process start: a block lands within a millisecond of the call)."""
        def run() -> str:
            nft = Nft()
            try:
                return nft.run(commands)
            finally:
                nft.close()

        try:
            return run_in_netns(self.switch, run)
        except FenceError as exc:
            raise RuntimeError(f"partition commands in {self.switch} failed: {exc}") from exc

    def _wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until every bridge port forwards (it may pass through learning)."""
        deadline = time.monotonic() + timeout
        while True:
            ports = json.loads(ip("-j", "-d", "link", "show", "master", "br0",
                                  ns=self.switch))
            states = {p["ifname"]: p.get("linkinfo", {}).get("info_slave_data", {})
                      .get("state") for p in ports}
            if len(states) == len(self.hosts) and all(
                    s == "forwarding" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"bridge ports not forwarding after {timeout} s: "
                                   f"{states}")
            time.sleep(0.05)

    def destroy(self) -> None:
        """Kill what runs in the lab and delete its namespaces, even after failures."""
        try:
            for host in self.hosts.values():
                host.kill_procs()
            for proc in self.switch_procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            self.switch_procs.clear()
        finally:
            for ns in reversed(self._created):
                delete_namespace(ns)
            self._created.clear()
