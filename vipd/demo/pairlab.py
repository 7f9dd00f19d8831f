"""A vipd pair in a namespace lab: two daemons, a responder per node, a client probe.

Shared by `vipd demo`, the integration tests and simulations/bench_failover.py, so all
three measure the same thing. Addresses are documentation ranges inside namespaces this
module creates (the network rule of the README and docs/install.md: tests, demos and
benchmarks use documentation ranges only, inside namespaces they made).

The responder answers UDP requests to the VIP with its node name (bound with
IP_FREEBIND, so it runs on both nodes and answers wherever the VIP is). The probe sends a
request every few ms from the client namespace and records (send time, answering node),
which gives the client-visible outage and who answers.

A node's daemon can run with a faked wall clock (`fake_clock`, `step_clock`: libfaketime
preloaded into that process only, its monotonic clock left alone) and be frozen and
thawed (`pause`, `resume`).

With ``arbiter="etcd"`` the lab is a group instead of a pair: three vipd nodes (node1..3,
priorities 150, 120, 100) sharing the VIPs, the client, and three hosts etcd1..3 running a
3-member etcd cluster (`start_etcd`, `etcd`: vipd.demo.etcdserver), named by the nodes'
``arbiter: {etcd: ...}``; the nodes have no heartbeat settings.

``roles`` adds hosts of the caller's own (the cloud benchmark's emulator host), and
``env`` is added to the daemons' environment.

With ``arbiter="witness"`` the lab has a fourth host, ``witness`` (198.51.100.4), running
`vipd witness` (`start_witness`, `stop_witness`, `kill_witness`) for the pair's cluster
with the pair's key, and both nodes' configs name it. ``fence`` sets the nodes' `fence`
key (None: left to vipd's default, "kernel" with a witness). ``api=True`` gives the
nodes' control API an operate token, for `status` and `switchover`; `metrics` reads a
node's /metrics. `block` and `heal` cut and mend links at the switch (`Lab.block`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vipd.demo.etcdserver import EtcdCluster
from vipd.demo.lab import DEFAULT_ROLES, Host, Lab, new_prefix
from vipd.keys import generate_key_line
from vipd.tokens import new_token
from vipd.transport import IP_FREEBIND

VIP4 = "198.51.100.100"
VIP6 = "2001:db8:1::100"
PORT = 5405
ECHO_PORT = 7000
WITNESS_PORT = 5406
ETCD_MEMBERS = ("etcd1", "etcd2", "etcd3")
ETCD_PORTS = (2379, 2380)  # client, peer
GROUP_PRIORITIES = (150, 120, 100)
API = "http://127.0.0.1:9440"  # each node's own, inside its namespace (vipd's defaults)
METRICS = "http://127.0.0.1:9441/metrics"
FENCE_TABLE = "vipd_lab"  # vipd.fence.KernelFence's table for the lab's cluster "lab"
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
FAULTS = {
    "kill": "SIGKILL of vipd and the service on the active node (a node crash)",
    "link-down": "the active node's network link goes down",
    "health": "the active node's health check starts failing",
    "stop": "SIGTERM to vipd on the active node (graceful stop: handover)",
}


@dataclass
class Node:
    name: str
    index: int
    priority: int
    config: Path
    log: Path
    health_file: Path
    daemon: subprocess.Popen[str] | None = None
    responder: subprocess.Popen[str] | None = None
    clock_file: Path | None = None  # the daemon runs under libfaketime (fake_clock)
    faked_pids: list[int] = field(default_factory=list)  # whose shm libfaketime leaves


@dataclass
class PairLab:
    """Build with `PairLab.create(workdir)`, always `destroy()` (use as a context manager)."""

    workdir: Path
    lab: Lab
    nodes: dict[str, Node] = field(default_factory=dict)
    probe: subprocess.Popen[str] | None = None
    probe_out: Path | None = None
    witness_config: Path | None = None  # with arbiter="witness"
    witness: subprocess.Popen[str] | None = None
    token: str | None = None  # the nodes' API operate token (api=True)
    fence_table: str | None = None  # the nodes' nftables fence table, if they have one
    etcd: EtcdCluster | None = None  # with arbiter="etcd", once started
    etcd_hosts: tuple[str, ...] = ()  # with arbiter="etcd": the members' hosts
    env: dict[str, str] = field(default_factory=dict)  # added to the daemons' environment

    @classmethod
    def create(cls, workdir: Path, *, preempt: bool = False, preempt_delay: float = 0.0,
               ipv6: bool = True, extra: str = "", interval: str | None = None,
               dead_after: int | None = None, checks: bool = True, arbiter: str = "none",
               fence: str | None = None, api: bool = False, ttl: str = "1s",
               roles: tuple[str, ...] = ()) -> PairLab:
        if arbiter not in ("none", "witness", "etcd") or fence not in (None, "none", "kernel"):
            raise ValueError(f"arbiter {arbiter!r}, fence {fence!r}: expected arbiter "
                             f"'none', 'witness' or 'etcd', fence None, 'none' or 'kernel'")
        workdir.mkdir(parents=True, exist_ok=True)
        key = workdir / "pair.key"
        _private(key, generate_key_line(1))
        witness, group = arbiter == "witness", arbiter == "etcd"
        names = ("node1", "node2", "node3") if group else ("node1", "node2")
        roles_of_lab = ((*names, "client", *ETCD_MEMBERS) if group else
                        (*DEFAULT_ROLES, "witness") if witness else DEFAULT_ROLES)
        lab = Lab.create(new_prefix(), (*roles_of_lab, *roles))
        pair = cls(workdir, lab)
        if group:
            pair.etcd_hosts = ETCD_MEMBERS
            endpoints = ", ".join(f'"{lab[m].ipv4.ip}:{ETCD_PORTS[0]}"' for m in ETCD_MEMBERS)
            extra = f"arbiter: {{etcd: {{endpoints: [{endpoints}], ttl: {ttl}}}}}\n{extra}"
        if witness:
            pair.witness_config = workdir / "witness.yaml"
            pair.witness_config.write_text(
                f"name: witness\nlisten: {pair.witness_address}\n"
                f"metrics: {{listen: 127.0.0.1:9442}}\n"
                f"clusters: {{lab: {{key_file: {key}, nodes: [node1, node2]}}}}\n")
            extra = f'arbiter: {{witness: ["{pair.witness_address}"]}}\n{extra}'
        if fence is not None:
            extra = f"fence: {fence}\n{extra}"
        if fence == "kernel" or (fence is None and (witness or group)):
            pair.fence_table = FENCE_TABLE
        if api:
            pair.token, line = new_token("lab", "operate")
            _private(workdir / "tokens", line)
            extra = f"api: {{tokens_file: {workdir / 'tokens'}}}\n{extra}"
        vips = f'[{VIP4}/32, "{VIP6}/128"]' if ipv6 else f"[{VIP4}/32]"
        priorities = GROUP_PRIORITIES if group else (150, 100)
        for index, prio in enumerate(priorities, start=1):
            name, other = f"node{index}", 3 - index
            health = workdir / f"{name}.healthy"
            health.touch()
            cfg = workdir / f"{name}.yaml"
            cfg.write_text(
                f"node: {name}\ncluster: lab\ninterface: eth0\nvips: {vips}\n"
                f"priority: {prio}\npreempt: {str(preempt).lower()}\n"
                f"preempt_delay: {preempt_delay}\n"
                + ("" if group else (
                    f'heartbeat: {{bind: "198.51.100.{index}:{PORT}", '
                    f'peers: ["198.51.100.{other}:{PORT}"]'
                    + (f", interval: {interval}" if interval else "")
                    + (f", dead_after: {dead_after}" if dead_after else "") + "}\n"
                    f"auth: {{key_file: {key}}}\n"))
                + (f"health:\n  - {{name: service, exec: {{command: [/usr/bin/test, -e, "
                   f"{health}]}}, interval: 100ms, timeout: 80ms, rise: 2, fall: 2}}\n"
                   if checks else "")
                + f"state_dir: {workdir / ('state-' + name)}\n"
                # The lab runs as root with its files in 0700 temp dirs: checks keep uid 0
                # (with every capability dropped) instead of the default "nobody".
                f"exec_user: root\n{extra}")
            pair.nodes[name] = Node(name, index, prio, cfg, workdir / f"{name}.log", health)
        return pair

    def __enter__(self) -> PairLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def host(self, name: str) -> Host:
        return self.lab[name]

    @property
    def witness_address(self) -> str:
        return f"{self.lab['witness'].ipv4.ip}:{WITNESS_PORT}"

    # --- the witness ---------------------------------------------------------------------

    def start_witness(self) -> None:
        """Start `vipd witness` on the witness host (it grants nothing for one lease)."""
        if self.witness_config is None:
            raise RuntimeError("this lab has no witness (PairLab.create(arbiter='witness'))")
        if self.witness is not None and self.witness.poll() is None:
            return
        with (self.workdir / "witness.log").open("a") as log:
            self.witness = self.lab["witness"].spawn(
                sys.executable, "-m", "vipd.cli", "witness", "--config",
                str(self.witness_config), stderr=log)

    def stop_witness(self, timeout: float = 5.0) -> int | None:
        """SIGTERM and wait; the exit code (None: it was not running)."""
        proc, self.witness = self.witness, None
        if proc is None or proc.poll() is not None:
            return None
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def kill_witness(self) -> None:
        proc, self.witness = self.witness, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # --- etcd (arbiter="etcd") -----------------------------------------------------------

    def start_etcd(self) -> EtcdCluster:
        """The 3-member etcd cluster on etcd1..3, healthy as seen from the client host."""
        if not self.etcd_hosts:
            raise RuntimeError("this lab has no etcd (PairLab.create(arbiter='etcd'))")
        if self.etcd is None:
            self.etcd = EtcdCluster.start(
                self.workdir / "etcd", [str(self.lab[m].ipv4.ip) for m in self.etcd_hosts],
                ports=[ETCD_PORTS] * len(self.etcd_hosts),
                spawns=[self.lab[m].spawn for m in self.etcd_hosts],
                run_at_clients=lambda check: self.lab["client"].run(check))
        return self.etcd

    # --- a node's API and metrics (from a thread in its namespace) ------------------------

    def status(self, name: str) -> dict[str, Any]:
        """GET /v1/status of node ``name`` (needs api=True)."""
        code, body = self.lab[name].run(_http, f"{API}/v1/status", self.token, None)
        if code != 200:
            raise RuntimeError(f"{name}: GET /v1/status answered {code}: {body[:200]}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def switchover(self, name: str, to: str | None = None) -> int:
        """POST /v1/switchover to node ``name`` (needs api=True), in a group optionally
        naming the member ``to``; the HTTP status."""
        body = json.dumps({"to": to} if to else {}).encode()
        code, _ = self.lab[name].run(_http, f"{API}/v1/switchover", self.token, body)
        return code

    def metrics(self, name: str) -> str:
        code, body = self.lab[name].run(_http, METRICS, None, None)
        if code != 200:
            raise RuntimeError(f"{name}: GET /metrics answered {code}")
        return body

    # --- processes -----------------------------------------------------------------------

    def start(self, name: str, *, responder: bool = True) -> None:
        node = self.nodes[name]
        self._drop_faketime_shm(node)
        with node.log.open("a") as log:  # the children keep their own copies of the fd
            env = _faketime_env(node.clock_file) if node.clock_file else None
            if self.env:
                env = {**(env or os.environ), **self.env}
            node.daemon = self.lab[name].spawn(
                sys.executable, "-m", "vipd.cli", "run", "-c", str(node.config), stderr=log,
                env=env)
            if node.clock_file:
                node.faked_pids.append(node.daemon.pid)
            if responder and node.responder is None:
                node.responder = self.lab[name].spawn(
                    sys.executable, "-m", "vipd.demo.pairlab", "responder", name, stderr=log)

    def start_settled(self, *, responder: bool = True, lead: float = 0.3) -> str | None:
        """node1, then the others ``lead`` s after node1's daemon logged its first state
        (node1 is up well within their hold-down and wins however slowly Python starts on
        a loaded machine), after the witness or etcd if there is one; returns the single
        VIP holder once there is one, None after 10 s."""
        if self.witness_config is not None:
            self.start_witness()
        if self.etcd_hosts:
            self.start_etcd()
        first, *others = self.nodes
        before = len(self.log_lines(first)) if self.nodes[first].log.exists() else 0
        self.start(first, responder=responder)
        self.wait_for(lambda: any("INIT -> " in line
                                  for line in self.log_lines(first)[before:]), 10.0)
        time.sleep(lead)
        for name in others:
            self.start(name, responder=responder)
        return self.wait_single_holder(10)

    def kill(self, name: str, *, with_service: bool = True) -> None:
        """A crash: SIGKILL to the daemon's whole process group (and the service)."""
        node = self.nodes[name]
        procs = [node.daemon] + ([node.responder] if with_service else [])
        for proc in procs:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if with_service:
            node.responder = None
        self._drop_faketime_shm(node)

    def stop(self, name: str, timeout: float = 5.0) -> int:
        node = self.nodes[name]
        assert node.daemon is not None
        node.daemon.send_signal(signal.SIGTERM)
        code = node.daemon.wait(timeout)
        self._drop_faketime_shm(node)
        return code

    def pause(self, name: str) -> None:
        """SIGSTOP to the daemon alone (a VM stall, a stuck process): its kernel keeps
        the addresses and answers ARP for them until their lifetime runs out."""
        self._running_daemon(name).send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self._running_daemon(name).send_signal(signal.SIGCONT)

    def _running_daemon(self, name: str) -> subprocess.Popen[str]:
        proc = self.nodes[name].daemon
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{name}: no running daemon to signal")
        return proc  # `ip netns exec` execs the daemon: this pid is the daemon's

    # --- a faked wall clock --------------------------------------------------------------

    def fake_clock(self, name: str) -> None:
        """From its next start on, node ``name``'s daemon runs with libfaketime preloaded:
        its wall clock is offset by what `step_clock` sets (0 to begin with), at once,
        and its monotonic clock is the real one. The host's clock is never touched; only
        that process (and the checks it spawns) see the offset."""
        if not FAKETIME_LIB.exists():
            raise RuntimeError(f"{FAKETIME_LIB} not found: a faked clock needs libfaketime "
                               f"(Debian package libfaketime)")
        self.nodes[name].clock_file = self.workdir / f"{name}.faketime"
        self.step_clock(name, 0)

    def step_clock(self, name: str, offset: float) -> None:
        """Set node ``name``'s wall-clock offset in seconds; libfaketime rereads the file
        on every clock read (FAKETIME_NO_CACHE), so the step takes effect at once."""
        path = self.nodes[name].clock_file
        if path is None:
            raise RuntimeError(f"{name}: the clock is not faked (call fake_clock first)")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{offset:+g}\n")
        tmp.replace(path)  # a clock read never sees a half-written file

    def _drop_faketime_shm(self, node: Node) -> None:
        """libfaketime leaves a semaphore and a shared-memory file per process that loaded
        it (named by its pid) and removes neither when the process is killed; remove
        those of this node's daemons that have ended."""
        alive = node.daemon.pid if node.daemon and node.daemon.poll() is None else None
        for pid in [p for p in node.faked_pids if p != alive]:
            for path in (f"/dev/shm/faketime_shm_{pid}", f"/dev/shm/sem.faketime_sem_{pid}"):
                Path(path).unlink(missing_ok=True)
            node.faked_pids.remove(pid)

    def block(self, a: str, b: str, *, oneway: bool = False) -> None:
        """A partition between hosts ``a`` and ``b`` (both ways unless ``oneway``: only
        from ``a`` to ``b``), cut at the switch until `heal` (`Lab.block`)."""
        self.lab.block(a, b, oneway=oneway)

    def heal(self) -> None:
        self.lab.heal()

    def link(self, name: str, up: bool) -> None:
        self.lab[name].ip("link", "set", "eth0", "up" if up else "down")

    def set_health(self, name: str, healthy: bool) -> None:
        path = self.nodes[name].health_file
        if healthy:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def inject(self, fault: str, name: str) -> None:
        """One of FAULTS on node `name` (the demo's and the benchmark's faults)."""
        if fault == "kill":
            self.kill(name)
        elif fault == "link-down":
            self.link(name, False)
        elif fault == "health":
            self.set_health(name, False)
        elif fault == "stop":
            self.stop(name)
        else:
            raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")

    def holders(self, vip: str = VIP4) -> list[str]:
        return [n for n in self.nodes if self.lab[n].address(vip) is not None]

    def log_lines(self, name: str) -> list[str]:
        return self.nodes[name].log.read_text().splitlines()

    def wait_for(self, predicate: Any, timeout: float = 10.0, step: float = 0.02) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(step)
        return bool(predicate())

    def wait_single_holder(self, timeout: float = 10.0) -> str | None:
        ok = self.wait_for(lambda: len(self.holders()) == 1, timeout)
        return self.holders()[0] if ok else None

    # --- client probe --------------------------------------------------------------------

    def start_probe(self, every: float = 0.005, target: str = VIP4) -> None:
        """Start the probe and return once its first request is out (Python start-up
        takes 0.2-2 s; a fault injected before that would be under-measured)."""
        self.probe_out = self.workdir / f"probe-{time.monotonic_ns()}.jsonl"
        ready = Path(f"{self.probe_out}.ready")
        self.probe = self.lab["client"].spawn(
            sys.executable, "-m", "vipd.demo.pairlab", "probe", target, str(every),
            str(self.probe_out))
        if not self.wait_for(ready.exists, 15, 0.005):
            raise RuntimeError(f"the client probe did not start within 15 s ({ready})")

    def stop_probe(self) -> list[tuple[float, str | None]]:
        """Returns (wall time sent, answering node or None) for every request."""
        assert self.probe is not None and self.probe_out is not None
        self.probe.send_signal(signal.SIGTERM)
        self.probe.wait(5)
        self.probe = None
        rows = [json.loads(line) for line in self.probe_out.read_text().splitlines()]
        return [(r[0], r[1]) for r in rows]

    def destroy(self) -> None:
        """Daemons, responders, the witness and the probe were all spawned through the
        lab's hosts, so the lab kills them with its namespaces."""
        try:
            self.lab.destroy()
        finally:
            for node in self.nodes.values():
                self._drop_faketime_shm(node)


def _private(path: Path, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")


def _http(url: str, token: str | None, data: bytes | None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers,
                                     method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def _faketime_env(clock_file: Path) -> dict[str, str]:
    """libfaketime in one daemon: its wall clock from ``clock_file``, monotonic time
    untouched. Without FAKETIME_FORCE_MONOTONIC_FIX=0, libfaketime 0.9.10's fix of
    pthread_cond_timedwait makes a Python thread waiting for the GIL spin, which starved
    the faked daemon (stalls of 100-350 ms twice a second, measured by the fault
    campaign, simulations/README.md)."""
    env = {k: v for k, v in os.environ.items() if k != "FAKETIME"}  # it would win
    return {**env, "LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME_TIMESTAMP_FILE": str(clock_file),
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_FORCE_MONOTONIC_FIX": "0"}


def failed_runs(samples: list[tuple[float, str | None]], after: float) -> list[float]:
    """Lengths of the runs of unanswered requests at or after `after`, in order; a run
    still open at the end of the samples counts as infinite."""
    runs: list[float] = []
    first_fail = None
    for sent, who in samples:
        if sent < after:
            continue
        if who is None and first_fail is None:
            first_fail = sent
        elif who is not None and first_fail is not None:
            runs.append(sent - first_fail)
            first_fail = None
    if first_fail is not None:
        runs.append(float("inf"))
    return runs


def outage(samples: list[tuple[float, str | None]], after: float) -> tuple[float, str | None]:
    """Client-visible outage: from the first unanswered request at or after `after` to
    the next answered one (0 if none failed). Returns (seconds, who answers at the end)."""
    answered_last = next((who for _, who in reversed(samples) if who), None)
    runs = failed_runs(samples, after)
    return (runs[0] if runs else 0.0), answered_last


# --- the two tiny programs run inside the lab -----------------------------------------------

def _responder(name: str) -> None:
    socks = []
    for family, vip in ((socket.AF_INET, VIP4), (socket.AF_INET6, VIP6)):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.bind((vip, ECHO_PORT))
        socks.append(s)
    import selectors
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            data, addr = sock.recvfrom(64)
            # The VIP may leave between receive and reply (ENETUNREACH): keep serving.
            with contextlib.suppress(OSError):
                sock.sendto(data[:8] + name.encode(), addr)


def _probe(target: str, every: float, out: str) -> None:
    """Request every `every` s; a request counts as answered if its reply comes within 50 ms."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    sent: dict[int, float] = {}
    who: dict[int, str] = {}
    seq = 0
    next_send = time.monotonic()
    drain_until: float | None = None  # after SIGTERM: no more requests, keep reading 60 ms
    while drain_until is None or time.monotonic() < drain_until:
        now = time.monotonic()
        if stop and drain_until is None:
            drain_until = now + 0.06
        if drain_until is None and now >= next_send:
            seq += 1
            sent[seq] = time.time()
            with contextlib.suppress(OSError):
                s.sendto(struct.pack("!Q", seq), (target, ECHO_PORT))
            if seq == 1:
                Path(f"{out}.ready").touch()
            next_send += every
        try:
            data, _ = s.recvfrom(64)
        except OSError:  # BlockingIOError included: nothing to read yet
            time.sleep(0.0005)
            continue
        got = struct.unpack("!Q", data[:8])[0]
        if got in sent and time.time() - sent[got] < 0.05:
            who[got] = data[8:].decode()
    with open(out, "w") as f:
        for n in sorted(sent):
            f.write(json.dumps([sent[n], who.get(n)]) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "responder":
        _responder(sys.argv[2])
    elif sys.argv[1] == "probe":
        _probe(sys.argv[2], float(sys.argv[3]), sys.argv[4])
