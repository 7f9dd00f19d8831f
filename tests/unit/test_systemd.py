"""systemd integration (vipd/systemd.py, and where vipd/daemon.py uses it).

The Notifier is tested against real AF_UNIX datagram sockets (a path in tmp_path and an
abstract name), as systemd's $NOTIFY_SOCKET would be. The daemon-level tests reuse the
loopback two-daemon pair of tests/support/daemons.py: $NOTIFY_SOCKET, $WATCHDOG_USEC
(200 ms) and $WATCHDOG_PID (this process) are set before each Daemon is built, every node
gets its own socket, and a reader thread records each datagram with a snapshot of the sender's
election state taken when it arrives (the sender is in the middle of, or has just left,
the `_handle` that sent it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from support.daemons import Node, Pair, eventually
from vipd.core.protocol import State
from vipd.systemd import Notifier

WATCHDOG_USEC = 200_000
WATCHDOG_PERIOD = WATCHDOG_USEC / 1e6
DEAD_INTERVAL = 0.1  # support.daemons' pair: 20 ms interval, dead_after 5


# ---------------------------------------------------------------------------- helpers


def bound_socket(address: str | Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.settimeout(0.2)
    return sock


def nothing_more(sock: socket.socket, wait: float = 0.1) -> bool:
    sock.settimeout(wait)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() on arrival
    raw: bytes
    fields: dict[str, str]
    snapshot: Any  # what NotifyReader.snapshot returned on arrival

    def has(self, key: str, value: str | None = None) -> bool:
        return key in self.fields and (value is None or self.fields[key] == value)


class NotifyReader:
    """A stand-in for systemd: a bound datagram socket and a thread collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = bound_socket(path)
        self.sock.settimeout(0.05)
        self.messages: list[Message] = []
        self.snapshot: Callable[[], Any] = lambda: None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"notify {path.name}",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.sock.recv(4096)
            except TimeoutError:
                continue
            snap = self.snapshot()
            fields = dict(line.split("=", 1) for line in raw.decode().split("\n"))
            self.messages.append(Message(time.monotonic(), raw, fields, snap))

    def with_key(self, key: str, value: str | None = None, since: int = 0) -> list[Message]:
        return [m for m in self.messages[since:] if m.has(key, value)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def dump(self) -> str:
        return "\n".join(f"{m.at:.3f} {m.raw!r} {m.snapshot}" for m in self.messages)


def start_with_notify(node: Node, reader: NotifyReader,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Build and start the node's Daemon with $NOTIFY_SOCKET naming this reader."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(reader.path))
    node.start()
    d = node.daemon
    assert d.notifier.enabled and d.notifier.watchdog == WATCHDOG_PERIOD
    reader.snapshot = lambda: (d.election.state,
                               d._loop is not None and d.election.ready(d.loop_time()))


@pytest.fixture
def readers(tmp_path: Path) -> Iterator[dict[str, NotifyReader]]:
    """One NOTIFY_SOCKET per node ("a", "b"); closed after the pair (fixture order)."""
    made = {name: NotifyReader(tmp_path / f"notify-{name}.sock") for name in ("a", "b")}
    try:
        yield made
    finally:
        for reader in made.values():
            reader.close()


@pytest_asyncio.fixture
async def pair(readers: dict[str, NotifyReader], tmp_path: Path,
               caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
               ) -> AsyncIterator[Pair]:
    """support.daemons' pair with the watchdog environment set (NOTIFY_SOCKET per node)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        await p.close()


async def started(pair: Pair, readers: dict[str, NotifyReader],
                  monkeypatch: pytest.MonkeyPatch) -> None:
    start_with_notify(pair.a, readers["a"], monkeypatch)
    start_with_notify(pair.b, readers["b"], monkeypatch)
    await pair.settled()
    await eventually(lambda: bool(readers["a"].with_key("READY")
                                  and readers["b"].with_key("READY")),
                     what="READY=1 from both daemons")


# ---------------------------------------------------------------------------- Notifier


def test_notify_sends_one_datagram_of_key_value_lines(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with bound_socket(path) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        assert notifier.enabled
        assert notifier.notify(READY=1, STATUS="x y") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=x y"
        assert nothing_more(sock)
        assert notifier.notify(WATCHDOG=1) is True  # the socket is reused
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()
        notifier.close()  # idempotent


def test_notify_to_an_abstract_socket() -> None:
    name = f"vipd-test-{os.getpid()}-{secrets.token_hex(4)}"
    with bound_socket("\0" + name) as sock:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == "\0" + name
        assert notifier.notify(READY=1, STATUS="ACTIVE term 3") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ACTIVE term 3"
        notifier.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}])
def test_without_notify_socket_nothing_is_sent(environ: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: object, **kwargs: object) -> None:
        raise AssertionError("Notifier opened a socket without NOTIFY_SOCKET")

    monkeypatch.setattr("vipd.systemd.socket.socket", no_socket)
    notifier = Notifier(environ)
    assert not notifier.enabled
    assert notifier.notify(READY=1) is False
    assert notifier.notify(WATCHDOG=1) is False
    notifier.close()


def test_missing_socket_logs_one_error_and_recovers(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vipd.systemd")
    path = tmp_path / "missing.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    assert notifier.notify(READY=1) is False
    assert notifier.notify(WATCHDOG=1) is False
    errors = [r for r in caplog.records
              if r.name == "vipd.systemd" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert str(path) in errors[0].getMessage()
    # systemd (re)creates its socket: the next notification gets through.
    with bound_socket(path) as sock:
        assert notifier.notify(WATCHDOG=1) is True
        assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.close()


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "3000000"}, 3.0),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "<mine>"}, 3.0),
    ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "<mine>"}, 0.2),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "<other>"}, None),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "garbage"}, None),
    ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": ""}, None),
    ({"WATCHDOG_USEC": "garbage"}, None),
    ({"WATCHDOG_USEC": "3s"}, None),
    ({"WATCHDOG_USEC": "-3000000"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_PID": "<mine>"}, None),
    ({}, None),
])
def test_watchdog_period_from_the_environment(environ: dict[str, str],
                                              expected: float | None) -> None:
    pids = {"<mine>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {key: pids.get(value, value) for key, value in environ.items()}
    assert Notifier(env).watchdog == expected


# ---------------------------------------------------------------------------- daemon


@pytest.mark.asyncio
async def test_ready_once_after_the_first_decision_and_status_per_transition(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await started(pair, readers, monkeypatch)
    await asyncio.sleep(0.3)
    for name, node in (("a", pair.a), ("b", pair.b)):
        reader = readers[name]
        ready = reader.with_key("READY")
        assert len(ready) == 1, reader.dump()
        first = ready[0]
        assert first.fields["READY"] == "1"
        state, was_ready = first.snapshot
        assert state in (State.STANDBY, State.ACTIVE) and was_ready, reader.dump()
        # Only status and watchdog pings may precede READY=1 (STATUS= of INIT -> STANDBY
        # and the first WATCHDOG=1 are sent before the election's first decision).
        before = reader.messages[:reader.messages.index(first)]
        assert all(set(m.fields) <= {"STATUS", "WATCHDOG"} for m in before), reader.dump()
        assert re.fullmatch(rf"{node.state.name} term {node.term}, peer \w+ \w+",
                            first.fields["STATUS"]), first.fields
    statuses = [m.fields["STATUS"] for m in readers["a"].with_key("STATUS")]
    assert any(re.match(rf"ACTIVE term {pair.a.term}\b", s) for s in statuses), statuses
    assert any(s.startswith("STANDBY term ") for s in statuses), statuses
    statuses_b = [m.fields["STATUS"] for m in readers["b"].with_key("STATUS")]
    assert any(s.startswith("STANDBY term ") for s in statuses_b), statuses_b
    assert not any(s.startswith("ACTIVE") for s in statuses_b), statuses_b


@pytest.mark.asyncio
async def test_ready_waits_for_the_holddown_without_a_peer(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Alone, the first decision is the takeover after one dead interval: READY=1 comes
    with it, not at start."""
    began = time.monotonic()
    start_with_notify(pair.a, readers["a"], monkeypatch)
    reader = readers["a"]
    await eventually(lambda: bool(reader.with_key("READY")), what="READY=1")
    ready = reader.with_key("READY")[0]
    assert ready.at - began >= DEAD_INTERVAL, reader.dump()
    assert ready.snapshot[0] is State.ACTIVE, reader.dump()
    assert ready.fields["STATUS"].startswith(f"ACTIVE term {pair.a.term}, peer not heard")
    index = reader.messages.index(ready)
    active = [i for i, m in enumerate(reader.messages)
              if m.fields.get("STATUS", "").startswith("ACTIVE term ")]
    assert active and active[0] < index, reader.dump()  # the transition, then READY=1


@pytest.mark.asyncio
async def test_watchdog_pings_at_half_the_period(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await started(pair, readers, monkeypatch)
    mark = len(readers["a"].messages)
    began = time.monotonic()
    await asyncio.sleep(1.5)
    pings = [m.at for m in readers["a"].with_key("WATCHDOG", "1", since=mark)
             if m.at <= began + 1.5]
    assert len(pings) >= 5, readers["a"].dump()
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < WATCHDOG_PERIOD, gaps  # systemd's deadline is the full period
    assert readers["b"].with_key("WATCHDOG", "1", since=0)
    assert all(m.raw == b"WATCHDOG=1" for m in readers["a"].with_key("WATCHDOG"))


@pytest.mark.asyncio
async def test_reload_sends_reloading_then_ready(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await started(pair, readers, monkeypatch)
    reader = readers["a"]
    await asyncio.sleep(0.1)
    assert len(reader.with_key("READY")) == 1
    mark = len(reader.messages)
    pair.a.write(priority=140)  # a real change, to be sure the reload ran
    pair.a.daemon._on_reload_signal()
    await eventually(lambda: bool(reader.with_key("READY", since=mark)),
                     what="READY=1 after the reload")
    assert pair.a.daemon.config.priority == 140
    after = [m for m in reader.messages[mark:] if "WATCHDOG" not in m.fields]
    assert [sorted(m.fields) for m in after[:2]] == [["MONOTONIC_USEC", "RELOADING"],
                                                     ["READY", "STATUS"]], \
        reader.dump()
    assert after[0].fields["RELOADING"] == "1"
    # Type=notify-reload wants the reload's CLOCK_MONOTONIC time in microseconds.
    usec = int(after[0].fields["MONOTONIC_USEC"])
    assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 60_000_000
    assert after[1].fields["READY"] == "1"
    assert after[1].fields["STATUS"].startswith("ACTIVE term ")
    assert len(reader.with_key("RELOADING")) == 1
    assert len(reader.with_key("READY")) == 2


@pytest.mark.asyncio
async def test_stop_sends_stopping(pair: Pair, readers: dict[str, NotifyReader],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    await started(pair, readers, monkeypatch)
    reader = readers["a"]
    mark = len(reader.messages)
    code = await pair.a.stop()
    assert code == 0
    stopping = reader.with_key("STOPPING", since=mark)
    assert len(stopping) == 1, reader.dump()
    assert stopping[0].fields["STOPPING"] == "1"
    assert stopping[0].fields.get("STATUS", "").startswith("stopping")
    later = reader.messages[reader.messages.index(stopping[0]) + 1:]
    assert not any(m.has("READY") for m in later), reader.dump()
    await eventually(lambda: pair.b.state is State.ACTIVE, what="b ACTIVE")


async def quiet_for(reader: NotifyReader, key: str, quiet: float, timeout: float
                    ) -> float | None:
    """Wait until `reader` has had no `key` message for `quiet` s; returns when the last
    one arrived (None: none at all)."""
    began = time.monotonic()
    while True:
        found = reader.with_key(key)
        last = found[-1].at if found else None
        if time.monotonic() - max(last or began, began) >= quiet:
            return last
        if time.monotonic() > began + timeout:
            raise AssertionError(f"{key} still arriving after {timeout} s:\n{reader.dump()}")
        await asyncio.sleep(0.02)


def wedge(node: Node, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """The election timer stops firing: nothing re-arms it, the armed one is cancelled.
    Returns the real `_rearm`."""
    d = node.daemon
    real = d.driver._rearm

    def no_timer() -> None:
        d.driver._timer.cancel()

    monkeypatch.setattr(d.driver, "_rearm", no_timer)
    no_timer()
    return real


@pytest.mark.asyncio
async def test_watchdog_stops_when_the_timer_is_wedged(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    await started(pair, readers, monkeypatch)
    reader, d = readers["a"], pair.a.daemon
    wedge(pair.a, monkeypatch)
    d.driver._timer._last_fire = time.monotonic() - 60  # and it last fired long ago
    await asyncio.sleep(WATCHDOG_PERIOD / 2 + 0.05)  # a ping already in flight arrives
    mark = len(reader.messages)
    await asyncio.sleep(0.5)
    assert d.driver._timer._last_fire < time.monotonic() - 59  # still wedged
    assert reader.with_key("WATCHDOG", since=mark) == [], reader.dump()
    assert readers["b"].with_key("WATCHDOG", since=0)  # the other daemon still pings


@pytest.mark.asyncio
async def test_watchdog_stops_soon_after_the_timer_stops_and_resumes(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without faking the last fire: the pings stop once the timer has been silent for
    the stale limit (1 s here), and come back when it fires again."""
    await started(pair, readers, monkeypatch)
    reader, d = readers["a"], pair.a.daemon
    real_rearm = wedge(pair.a, monkeypatch)
    wedged_at = time.monotonic()
    last = await quiet_for(reader, "WATCHDOG", quiet=0.5, timeout=3.0)
    stale = max(1.0, 4 * d.config.heartbeat.interval)
    assert last is not None and last >= wedged_at, reader.dump()  # not at once: stale
    assert last <= wedged_at + stale + WATCHDOG_PERIOD / 2 + 0.1, reader.dump()
    mark = len(reader.messages)
    monkeypatch.setattr(d.driver, "_rearm", real_rearm)  # the timer works again
    d.driver._rearm()
    await eventually(lambda: len(reader.with_key("WATCHDOG", since=mark)) >= 2,
                     timeout=2.0, what="WATCHDOG=1 again")


@pytest.mark.asyncio
async def test_watchdog_keeps_pinging_on_a_node_that_only_answers(
        pair: Pair, readers: dict[str, NotifyReader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that answers its peer's heartbeats need not fire its timer at all: its
    armed (not overdue) timer counts as working, so systemd does not restart it."""
    await started(pair, readers, monkeypatch)
    reader, d = readers["a"], pair.a.daemon
    d.driver._timer._last_fire = time.monotonic() - 60  # as if every send had been an answer
    handle = d.driver._timer._handle
    assert handle is not None and handle.when() >= time.monotonic() - 1.0
    await asyncio.sleep(WATCHDOG_PERIOD / 2 + 0.05)
    mark = len(reader.messages)
    d.driver._timer._last_fire = time.monotonic() - 60
    await asyncio.sleep(WATCHDOG_PERIOD / 2 + 0.1)
    assert reader.with_key("WATCHDOG", since=mark), reader.dump()
