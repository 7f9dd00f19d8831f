"""Debian's etcd-server run for the demo, the tests and the benchmarks: one member or a
cluster of several, on loopback or inside a lab namespace, in a throwaway data dir.

Timing settings: `--heartbeat-interval 50 --election-timeout 500` (ms). etcd refuses a
lease TTL below about 1.5 x the election timeout (it raises it), so vipd's `ttl: 1s`
needs an election timeout of at most ~600 ms (docs/election.md, "Groups on etcd").
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEARTBEAT_MS = 50
ELECTION_MS = 500
Spawn = Callable[..., "subprocess.Popen[Any]"]  # runs argv where a member lives


def etcd_binary() -> str | None:
    return shutil.which("etcd")


@dataclass(frozen=True)
class ServerTls:
    """Client-facing TLS of the members: their certificate, and the CA whose client
    certificates they require (``--client-cert-auth``); ``client_*`` for the health check."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class EtcdCluster:
    """Start with `EtcdCluster.start(...)`, always `stop()` (or use as a context manager).
    ``spawns``: per member, how to run a command where it lives (a lab host's spawn;
    default: a local process); ``run_at_clients`` runs the health check where the
    clients are (a lab host's run; default: here)."""

    members: list[Member]
    log: Path
    spawns: Sequence[Spawn] = field(repr=False)
    tls: ServerTls | None = None
    run_at_clients: Callable[[Callable[[], bool]], bool] = field(
        default=lambda check: check(), repr=False)

    @classmethod
    def start(cls, workdir: Path, hosts: Sequence[str] = ("127.0.0.1",), *,
              ports: Sequence[tuple[int, int]] | None = None,
              spawns: Sequence[Spawn] | None = None, tls: ServerTls | None = None,
              run_at_clients: Callable[[Callable[[], bool]], bool] | None = None,
              timeout: float = 15.0) -> EtcdCluster:
        """One member per host; ``ports``: (client, peer) per member (default: free
        loopback ports, for members on 127.0.0.1); ``tls``: clients must use TLS with a
        certificate of its CA."""
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd not found: install Debian's etcd-server "
                               "(apt-get install etcd-server)")
        ports = list(ports) if ports is not None else [(_free_port(), _free_port())
                                                        for _ in hosts]
        scheme = "https" if tls is not None else "http"
        members = [Member(f"etcd{i + 1}", host, c, p, workdir / f"etcd{i + 1}", scheme=scheme)
                   for i, (host, (c, p)) in enumerate(zip(hosts, ports, strict=True))]
        cluster = cls(members, workdir / "etcd.log", spawns or [_popen] * len(members), tls)
        if run_at_clients is not None:
            cluster.run_at_clients = run_at_clients
        for member in members:
            cluster._launch(binary, member)
        if not cluster.wait_healthy(timeout):
            cluster.stop()
            raise RuntimeError(f"etcd did not become healthy within {timeout:g} s "
                               f"(log: {cluster.log})")
        return cluster

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        return [(m.host, m.client_port) for m in self.members]

    def _launch(self, binary: str, member: Member, state: str = "new") -> None:
        """Start one member; ``state`` "existing" rejoins the cluster with its data."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--name", member.name, "--data-dir", str(member.data_dir),
                "--listen-client-urls", member.client_url,
                "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url,
                "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", state,
                "--heartbeat-interval", str(HEARTBEAT_MS),
                "--election-timeout", str(ELECTION_MS), "--log-level", "warn"]
        if self.tls is not None:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                     "--client-cert-auth", "--trusted-ca-file", str(self.tls.ca)]
        with self.log.open("ab") as log:
            spawn = self.spawns[self.members.index(member)]
            member.proc = spawn(*argv, stdout=log, stderr=log)

    def health(self, member: Member) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(f"{member.client_url}/health", timeout=1,
                                        context=context) as r:
                return b'"true"' in r.read()
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float) -> bool:
        def healthy() -> bool:
            return all(self.health(m) for m in self.members if m.proc and m.proc.poll() is None)

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.run_at_clients(healthy):
                return True
            time.sleep(0.05)
        return False

    def kill(self, name: str) -> None:
        member = next(m for m in self.members if m.name == name)
        if member.proc is not None and member.proc.poll() is None:
            member.proc.send_signal(signal.SIGKILL)
            member.proc.wait(5)

    def restart(self, name: str) -> None:
        """Kill member ``name`` and start it again on its data dir."""
        binary = etcd_binary()
        assert binary is not None
        self.kill(name)
        self._launch(binary, next(m for m in self.members if m.name == name), "existing")

    def stop(self) -> None:
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                member.proc.send_signal(signal.SIGKILL)
                member.proc.wait(5)


def _popen(*argv: str, stdout: Any, stderr: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=stdout, stderr=stderr,  # type: ignore[call-overload]
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
