"""A paused process, a VIP removed behind vipd's back, and two nodes with one name, on
the real kernel (network namespaces, see conftest.py; the defects of issue 10).

The same pair as test_failover.py: node1 (priority 150) and node2 (priority 100) share
VIP4 and VIP6, heartbeats every 40 ms, the peer dead after 8 missed (the dead interval,
320 ms, read from the config), vip_lease 3 s. Faults: SIGSTOP/SIGCONT of one daemon
(a VM pause, a stuck process, a stop-the-world stall), ``ip addr del`` of the VIP on
the active node, and a config copied without changing ``node:``.

Proving "never": while a fault runs, a `Watch` records in the background

* the kernel's VIP4 holders (`PairLab.holders`, i.e. ``ip -j addr``), sampled every
  ~5 ms (one sample takes ~6 ms: 10-20 ms apart);
* every RTM_NEWADDR / RTM_DELADDR of VIP4 in each node's namespace, from a netlink
  multicast socket opened before the fault: this sees a copy that lives for less than
  one sample (a renewal of a held address is also an RTM_NEWADDR, so "add" events count
  only where the node did not hold the VIP);
* optionally, ARP frames the client receives with a given sender MAC and sender IP
  VIP4 (gratuitous ARP of a node that should not announce the VIP).

Bounds are generous (shared, noisy machines): multiples of the dead interval where the
election's timing matters, seconds where the kernel's lease does.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from support.pairlab_checks import LEASE_GONE, expect, expect_only, logs, start_pair, stays
from vipd.config import load_config
from vipd.demo.lab import enter_netns
from vipd.demo.pairlab import VIP4, VIP6, PairLab

pytestmark = pytest.mark.netns

FAILOVER = 5.0  # s: a takeover must be visible in the kernel within this
SETTLE = 1.2  # s: start_pair waits > 3 dead intervals (the pair is settled > 1 s)
READDED = 5.0  # s: a VIP deleted by hand on the active is back within this
REACTS = 0.5  # s: ... and, reacting to the netlink event, well before its next renewal
NODE1, NODE2 = "198.51.100.1", "198.51.100.2"
NODE2_MAC = bytes.fromhex("027664000002")
METRICS = "http://127.0.0.1:9441/metrics"  # metrics.listen default, in each node's netns

RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR, RTM_DELADDR = 20, 21
IFA_LOCAL = 2
ETH_P_ARP = 0x0806


# --- helpers (the shared ones are in support.pairlab_checks) -----------------------------

def dead_interval(pair: PairLab) -> float:
    return load_config(pair.nodes["node1"].config).heartbeat.dead_interval


def daemon_pid(pair: PairLab, name: str) -> int:
    """The vipd python process itself (``ip netns exec`` execs it, keeping the pid)."""
    proc = pair.nodes[name].daemon
    assert proc is not None and proc.poll() is None, f"{name} is not running\n{logs(pair)}"
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"vipd.cli" in argv, f"pid {proc.pid} of {name} is not vipd: {argv}"
    return proc.pid


def message(line: str) -> tuple[str, str]:
    """(level, message) of a text log line: '<date>T<time> LEVEL node message'."""
    parts = line.split(None, 3)
    return (parts[1], parts[3]) if len(parts) == 4 else ("", line)


def scrape(pair: PairLab, name: str) -> str | None:
    """GET /metrics from a thread inside `name`'s namespace; None when it fails."""
    def get() -> str | None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(METRICS, timeout=2.0) as resp:
                body: bytes = resp.read()
                return body.decode()
        except OSError:
            return None
    return pair.host(name).run(get, timeout=10.0)


def metric_sum(text: str | None, name: str, label: str) -> float | None:
    """Sum of the samples of `name` carrying `label` (e.g. 'action="readded"'); None
    when there is no such sample at all."""
    if text is None:
        return None
    values = [float(line.rsplit(None, 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and label in line.split("}", 1)[0]]
    return sum(values) if values else None


def check(problems: list[str], pair: PairLab) -> None:
    assert not problems, ("\n".join(f"* {p}" for p in problems)
                          + f"\nholders now: v4={pair.holders(VIP4)} v6={pair.holders(VIP6)}"
                          + f"\n{logs(pair)}")


# --- background recorders ------------------------------------------------------------------

def _addr_events(ns: str, vip: str, ready: threading.Event, stop: threading.Event,
                 out: list[tuple[float, str]]) -> None:
    """Append (monotonic time, 'add' | 'del') for every RTM_NEWADDR / RTM_DELADDR of the
    IPv4 address `vip` in namespace `ns` ('overrun' if the kernel dropped events)."""
    try:
        enter_netns(ns)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except OSError as exc:
        out.append((time.monotonic(), f"error: {exc}"))
        ready.set()
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, RTMGRP_IPV4_IFADDR))
        sock.settimeout(0.05)
        ready.set()
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:  # ENOBUFS: events were lost
                out.append((time.monotonic(), f"overrun: {exc}"))
                continue
            now = time.monotonic()
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < 16:
                    break
                end = min(off + length, len(data))
                if kind in (RTM_NEWADDR, RTM_DELADDR) and off + 24 <= end:
                    family = data[off + 16]
                    attr = off + 24
                    while attr + 4 <= end:
                        alen, atype = struct.unpack_from("=HH", data, attr)
                        if alen < 4:
                            break
                        if (family == socket.AF_INET and atype == IFA_LOCAL and alen == 8
                                and attr + 8 <= end
                                and socket.inet_ntoa(data[attr + 4:attr + 8]) == vip):
                            out.append((now, "add" if kind == RTM_NEWADDR else "del"))
                        attr += (alen + 3) & ~3
                off += (length + 3) & ~3
    except Exception as exc:  # reported by the test (Watch.errors), never raised here
        out.append((time.monotonic(), f"error: {exc!r}"))
    finally:
        sock.close()
        ready.set()


def _arp_frames(ns: str, mac: bytes, vip: str, ready: threading.Event,
                stop: threading.Event, out: list[tuple[float, str]]) -> None:
    """In namespace `ns` (the client): append (time, 'arp op N') for every ARP frame
    on eth0 with sender MAC `mac` and sender IP `vip`; (time, 'seen') for others."""
    try:
        enter_netns(ns)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    except OSError as exc:
        out.append((time.monotonic(), f"error: {exc}"))
        ready.set()
        return
    try:
        sock.bind(("eth0", 0))
        sock.settimeout(0.05)
        ready.set()
        packed = socket.inet_aton(vip)
        while not stop.is_set():
            try:
                frame = sock.recv(2048)
            except TimeoutError:
                continue
            if len(frame) < 42 or frame[12:14] != b"\x08\x06":
                continue
            if frame[22:28] == mac and frame[28:32] == packed:
                op = struct.unpack_from("!H", frame, 20)[0]
                out.append((time.monotonic(), f"arp op {op}"))
            else:
                out.append((time.monotonic(), "seen"))
    except Exception as exc:  # reported by the test (Watch.errors), never raised here
        out.append((time.monotonic(), f"error: {exc!r}"))
    finally:
        sock.close()
        ready.set()


class Watch:
    """Records VIP4's holders (samples and netlink events) and, with `arp_from`, ARP
    frames of that MAC for VIP4 at the client, from `__enter__` to `__exit__`.
    Times are time.monotonic(); `t0` is when recording started."""

    def __init__(self, pair: PairLab, arp_from: bytes | None = None) -> None:
        self.pair = pair
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.sample_errors: list[str] = []
        self.events: dict[str, list[tuple[float, str]]] = {n: [] for n in pair.nodes}
        self.arp: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._arp_from = arp_from
        self.t0 = 0.0

    def __enter__(self) -> Watch:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        readies = []
        for name in self.pair.nodes:
            ready = threading.Event()
            readies.append(ready)
            self._thread(_addr_events, self.pair.host(name).ns, VIP4, ready, self._stop,
                         self.events[name])
        if self._arp_from is not None:
            ready = threading.Event()
            readies.append(ready)
            self._thread(_arp_frames, self.pair.host("client").ns, self._arp_from, VIP4,
                         ready, self._stop, self.arp)
        for ready in readies:
            assert ready.wait(10), "a recorder thread did not start"
        for name, events in self.events.items():
            assert not [e for _, e in events if e.startswith("error")], (name, events)
        assert not [e for _, e in self.arp if e.startswith("error")], self.arp
        self.t0 = time.monotonic()
        self._thread(self._sample)
        assert self.pair.wait_for(lambda: len(self.samples) >= 2, 10), "no samples"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _thread(self, fn: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _sample(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                self.samples.append((t, tuple(self.pair.holders(VIP4))))
            except Exception as exc:  # reported by the test, never silently dropped
                self.sample_errors.append(f"{t - self.t0:.3f}: {exc}")
            self._stop.wait(0.005)

    # --- queries (times relative to `since`, for the messages) --------------------------

    def samples_where(self, bad: Callable[[tuple[str, ...]], bool], since: float,
                      ref: float | None = None) -> list[str]:
        """The samples from `since` on for which `bad(holders)`, timed from `ref`."""
        ref = since if ref is None else ref
        return [f"{t - ref:+.3f} s: {list(h)}" for t, h in self.samples
                if t >= since and bad(h)]

    def count(self, since: float) -> int:
        return sum(1 for t, _ in self.samples if t >= since)

    def node_events(self, name: str, kind: str, since: float) -> list[float]:
        """Times of `name`'s VIP4 events of `kind` ('add' or 'del') at or after `since`."""
        return [t for t, e in self.events[name] if e == kind and t >= since]

    def errors(self) -> list[str]:
        """Why the recorders may have missed something: then "never" is not proven."""
        broken = [f"{name}'s netlink recorder: {e}" for name, events in self.events.items()
                  for _, e in events if e.startswith(("overrun", "error"))]
        broken += [f"ARP recorder: {e}" for _, e in self.arp if e.startswith("error")]
        broken += [f"sampling: {e}" for e in self.sample_errors[:5]]
        return broken

    def describe(self, since: float) -> str:
        events = {n: [f"{t - since:+.3f} {e}" for t, e in ev]
                  for n, ev in self.events.items()}
        gaps = [b - a for (a, _), (b, _) in zip(self.samples, self.samples[1:], strict=False)]
        return (f"{len(self.samples)} samples (longest gap {max(gaps, default=0):.3f} s); "
                f"VIP4 netlink events (s after the fault): {events}")


def rel(times: list[float], ref: float) -> list[str]:
    return [f"{t - ref:+.3f}" for t in times]


def _pause(pid: int) -> float:
    os.kill(pid, signal.SIGSTOP)
    return time.monotonic()


# --- 1: a paused standby -------------------------------------------------------------------

@pytest.mark.parametrize("paused", [1.5, 5.0])
def test_paused_standby_does_not_take_the_vip_on_resume(pair: PairLab, paused: float) -> None:
    """node2 (standby) is SIGSTOPped for `paused` s, then continued. On resume it must
    not trust its own stale view ("node1 silent for 1500 ms": it was node2 that was
    silent): node2 never holds VIP4 or announces it, node1 holds it throughout."""
    start_pair(pair, SETTLE)
    mark2 = len(pair.log_lines("node2"))
    pid = daemon_pid(pair, "node2")
    with Watch(pair, arp_from=NODE2_MAC) as watch:
        stopped = _pause(pid)
        try:
            time.sleep(paused)
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(2.0)
    problems: list[str] = []
    active = [line for line in pair.log_lines("node2")[mark2:] if "-> ACTIVE" in line]
    if active:
        problems.append(f"node2 went ACTIVE after being paused {paused} s: {active}")
    held2 = watch.samples_where(lambda h: "node2" in h, watch.t0, stopped)
    if held2:
        problems.append(f"node2 held VIP4 in {len(held2)} of {watch.count(watch.t0)} "
                        f"samples (s after the STOP; CONT at +{resumed - stopped:.3f}): "
                        f"{held2[:10]}")
    added2 = watch.node_events("node2", "add", watch.t0)
    if added2:
        problems.append(f"VIP4 added in node2's namespace at (s after the STOP) "
                        f"{rel(added2, stopped)}")
    lost1 = watch.samples_where(lambda h: "node1" not in h, watch.t0, stopped)
    if lost1:
        problems.append(f"node1 did not hold VIP4 in {len(lost1)} samples: {lost1[:10]}")
    deleted1 = watch.node_events("node1", "del", watch.t0)
    if deleted1:
        problems.append(f"VIP4 removed in node1's namespace at (s after the STOP) "
                        f"{rel(deleted1, stopped)}")
    garp = [f"{t - stopped:+.3f} s {e}" for t, e in watch.arp if e != "seen"]
    if garp:
        problems.append(f"the client received ARP for VIP4 from node2's MAC at (s after "
                        f"the STOP) {garp[:10]}")
    problems += watch.errors()
    if problems:
        problems.append(watch.describe(stopped))
    check(problems, pair)
    # Settled again: node1 the only holder, node2 a standby that stays one.
    expect_only(pair, "node1", timeout=3.0)
    stays(pair, ["node1"], 0.5)


# --- 2: a frozen active whose lease expired ------------------------------------------------

def test_frozen_active_does_not_readd_its_expired_vip(pair: PairLab) -> None:
    """node1 (active) is SIGSTOPped for 5 s: node2 takes over after a dead interval and
    the kernel drops node1's copy when its 3 s lease ends. On SIGCONT node1 must not
    renew (= re-add) the expired VIP: that would be a second holder."""
    start_pair(pair, SETTLE)
    pid = daemon_pid(pair, "node1")
    with Watch(pair) as watch:
        stopped = _pause(pid)
        try:
            expect(pair, lambda: "node2" in pair.holders(), FAILOVER,
                   "node2 to take VIP4 from the frozen node1")
            expect(pair, lambda: pair.host("node1").address(VIP4) is None, LEASE_GONE,
                   "the kernel to drop frozen node1's VIP4 (lease 3 s)")
            gone = time.monotonic()
            time.sleep(max(stopped + 5.0 - time.monotonic(), 0.0))
            assert pair.host("node1").address(VIP4) is None, "node1 is frozen, yet holds VIP4"
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        time.sleep(3.0)
    problems: list[str] = []
    held1 = watch.samples_where(lambda h: "node1" in h, gone, resumed)
    if held1:
        problems.append(f"node1 held VIP4 again after its lease expired in {len(held1)} "
                        f"of {watch.count(gone)} samples (s after the CONT): {held1[:10]}")
    readded = watch.node_events("node1", "add", gone)
    if readded:
        problems.append(f"VIP4 re-added in node1's namespace at (s after the CONT) "
                        f"{rel(readded, resumed)}")
    lost2 = watch.samples_where(lambda h: "node2" not in h, resumed)
    if lost2:
        problems.append(f"node2 did not hold VIP4 in {len(lost2)} samples after the CONT: "
                        f"{lost2[:10]}")
    deleted2 = watch.node_events("node2", "del", gone)
    if deleted2:
        problems.append(f"VIP4 removed in node2's namespace at (s after the CONT) "
                        f"{rel(deleted2, resumed)}")
    problems += watch.errors()
    if problems:
        problems.append(f"node1's copy expired {gone - stopped:.3f} s after the STOP, the "
                        f"CONT came {resumed - stopped:.3f} s after it")
        problems.append(watch.describe(resumed))
    check(problems, pair)
    expect_only(pair, "node2", timeout=3.0)
    stays(pair, ["node2"], 0.5)


# --- 3: a VIP removed by hand on the active ------------------------------------------------

def test_vip_deleted_on_active_is_readded_logged_and_counted(pair: PairLab) -> None:
    """Someone runs ``ip addr del VIP4`` on node1 (active). node1 puts it back, says so
    in a warning naming the VIP, and counts it in vipd_vip_corrections_total."""
    start_pair(pair, SETTLE)
    mark1 = len(pair.log_lines("node1"))
    with Watch(pair) as watch:
        pair.host("node1").ip("addr", "del", f"{VIP4}/32", "dev", "eth0")
        deleted = time.monotonic()
        back = pair.wait_for(lambda: pair.host("node1").address(VIP4) is not None, READDED)
        took = time.monotonic() - deleted

        def warnings() -> list[str]:
            return [line for line in pair.log_lines("node1")[mark1:]
                    if message(line)[0] == "WARNING" and "re-added" in message(line)[1]
                    and VIP4 in message(line)[1]]

        def readded() -> float | None:
            return metric_sum(scrape(pair, "node1"), "vipd_vip_corrections_total",
                              'action="readded"')

        warned = pair.wait_for(warnings, 3.0, 0.05)
        counted = pair.wait_for(lambda: (readded() or 0) >= 1, 3.0, 0.2)
    problems: list[str] = []
    if not back:
        problems.append(f"node1 did not re-add VIP4 within {READDED} s of its deletion")
    if not warned:
        problems.append("node1 logged no WARNING line with 're-added' and "
                        f"{VIP4} (the VIP was back after {took:.3f} s: silently)")
    if not counted:
        text = scrape(pair, "node1")
        series = [line for line in (text or "").splitlines()
                  if line.startswith("vipd_vip_corrections")]
        problems.append('vipd_vip_corrections_total{action="readded"} is not >= 1 on '
                        f"node1: {series if text is not None else 'scrape failed'}")
    held2 = watch.samples_where(lambda h: "node2" in h, deleted)
    if held2 or watch.node_events("node2", "add", watch.t0):
        problems.append(f"node2 held VIP4: {held2[:10]}; {watch.describe(deleted)}")
    problems += watch.errors()
    check(problems, pair)
    expect_only(pair, "node1", timeout=3.0)


@pytest.mark.pair(extra="vip_lease: 0\n")
def test_a_deleted_permanent_vip_is_readded_on_the_netlink_event(pair: PairLab) -> None:
    """Permanent addresses (vip_lease: 0) are never renewed: only the kernel's
    RTM_DELADDR event can bring a deleted VIP back, and it does so at once."""
    start_pair(pair, SETTLE)
    for attempt in range(3):
        pair.host("node1").ip("addr", "del", f"{VIP4}/32", "dev", "eth0")
        deleted = time.monotonic()
        back = pair.wait_for(lambda: pair.host("node1").address(VIP4) is not None, READDED,
                             0.005)
        took = time.monotonic() - deleted
        assert back, f"deletion {attempt + 1}: VIP4 not back within {READDED} s\n{logs(pair)}"
        assert took < REACTS, f"deletion {attempt + 1}: VIP4 back after {took:.3f} s"
        info = pair.host("node1").address(VIP4)
        assert info is not None and info.get("valid_lft") in (None, "forever", 4294967295), info
    expect_only(pair, "node1", timeout=3.0)


def test_a_vip_added_by_hand_on_the_standby_is_removed_on_the_netlink_event(
        pair: PairLab) -> None:
    """``ip addr add VIP4`` on node2 (standby): with address events its periodic check
    runs only every minute (RECONCILE_WATCHED), so only the kernel's RTM_NEWADDR event can
    remove the stray VIP this soon; node2 says so and stays STANDBY."""
    start_pair(pair, SETTLE)
    mark = len(pair.log_lines("node2"))
    for attempt in range(3):
        pair.host("node2").ip("addr", "add", f"{VIP4}/32", "dev", "eth0")
        added = time.monotonic()
        gone = pair.wait_for(lambda: pair.host("node2").address(VIP4) is None, READDED,
                             0.005)
        took = time.monotonic() - added
        assert gone, f"addition {attempt + 1}: VIP4 still on node2 after {READDED} s\n" \
                     f"{logs(pair)}"
        assert took < REACTS, f"addition {attempt + 1}: VIP4 removed after {took:.3f} s"
    warned = [line for line in pair.log_lines("node2")[mark:]
              if "while not active: removing them" in line]
    assert len(warned) == 3, logs(pair)
    assert not [line for line in pair.log_lines("node2")[mark:] if "-> ACTIVE" in line]
    expect_only(pair, "node1", timeout=3.0)


# --- 4: two nodes with the same name -------------------------------------------------------

def test_duplicate_node_name_faults_both_and_releases(pair: PairLab) -> None:
    """node2's config says ``node: node1`` (a copied config). Today each rejects the
    other's heartbeats as its own ("own_node"), hears no peer and stays ACTIVE: two
    holders forever. Fixed: a heartbeat with our name but another boot id, from a
    configured peer address, is a duplicate node; both go FAULT and release."""
    config2 = pair.nodes["node2"].config
    text = config2.read_text()
    assert "node: node2\n" in text, text
    config2.write_text(text.replace("node: node2\n", "node: node1\n"))
    dead = dead_interval(pair)
    pair.start("node1")
    expect_only(pair, "node1", timeout=10.0)
    pair.start("node2")
    expect(pair, lambda: any("starting: node node1" in line
                             for line in pair.log_lines("node2")),
           10.0, "the second node1 (in node2's namespace) to start")
    bound = 10 * dead
    released = pair.wait_for(lambda: pair.holders(VIP4) == [] and pair.holders(VIP6) == [],
                             bound)
    problems: list[str] = []
    if not released:
        problems.append(f"VIP4/VIP6 still held within {bound:.2f} s ({bound / dead:.0f} dead "
                        f"intervals) of the duplicate's start: v4={pair.holders(VIP4)} "
                        f"v6={pair.holders(VIP6)}")
    else:
        end = time.monotonic() + 3 * dead
        while time.monotonic() < end:
            seen = pair.holders(VIP4)
            if seen:
                problems.append(f"VIP4 taken again by {seen} after both released")
                break
            time.sleep(0.02)
    for name, own, other in (("node1", NODE1, NODE2), ("node2", NODE2, NODE1)):
        errors = [line for line in pair.log_lines(name) if message(line)[0] == "ERROR"]
        naming = [line for line in errors if "node1" in message(line)[1]
                  and own in message(line)[1] and other in message(line)[1]]
        if not naming:
            problems.append(f"{name}'s log has no ERROR line naming the duplicated name "
                            f"node1 and both addresses {own} and {other}; ERROR lines: "
                            f"{errors}")
        metrics = scrape(pair, name)
        duplicates = metric_sum(metrics, "vipd_heartbeats_rejected_total",
                                'reason="duplicate_node"')
        if not duplicates:
            rejected = [line for line in (metrics or "").splitlines()
                        if line.startswith("vipd_heartbeats_rejected_total{")]
            problems.append(f'{name}: vipd_heartbeats_rejected_total{{reason="duplicate_node"}}'
                            f" is {duplicates}, expected > 0 "
                            f"({rejected if metrics is not None else 'scrape failed'})")
        fault = metric_sum(metrics, "vipd_state", 'state="FAULT"')
        if fault != 1.0:
            states = [line for line in (metrics or "").splitlines()
                      if line.startswith("vipd_state{") and line.endswith(" 1.0")]
            problems.append(f"{name} is not in FAULT: {states}")
    check(problems, pair)
