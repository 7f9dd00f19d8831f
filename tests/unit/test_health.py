"""Probes against real loopback servers and processes, and the monitor driving them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from vipd.config import ExecCheck, HealthCheck, HttpCheck, LinkCheck, TcpCheck
from vipd.health import (
    ExecProbe,
    HealthMonitor,
    HttpProbe,
    LinkProbe,
    ProbeResult,
    TcpProbe,
    make_probe,
)

# ---------------------------------------------------------------------------- helpers

real_sleep = asyncio.sleep  # unaffected when a test spies on asyncio.sleep


async def eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await real_sleep(0.01)


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs. A killed grandchild is reparented to PID 1, which
    in a container may never reap it, so a zombie counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s


async def read_pid(path: Path) -> int:
    await eventually(lambda: path.exists() and path.read_text().strip() != "")
    return int(path.read_text())


@contextlib.asynccontextmanager
async def running(monitor: HealthMonitor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(monitor.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------- http


@pytest_asyncio.fixture
async def http_server() -> AsyncIterator[TestServer]:
    release = asyncio.Event()

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="status: all good\n")

    async def fail(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/slow", slow)
    app.router.add_get("/redirect", redirect)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        release.set()
        await server.close()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.asyncio
async def test_http_up_on_expected_status(
    http_server: TestServer, session: aiohttp.ClientSession
) -> None:
    result = await HttpProbe(session, str(http_server.make_url("/ok")), timeout=2).probe()
    assert result == ProbeResult(True, "HTTP 200", result.duration)
    assert 0 <= result.duration < 2


@pytest.mark.asyncio
async def test_http_down_on_other_status(
    http_server: TestServer, session: aiohttp.ClientSession
) -> None:
    result = await HttpProbe(session, str(http_server.make_url("/fail")), timeout=2).probe()
    assert not result.ok
    assert result.detail == "HTTP 503"


@pytest.mark.asyncio
async def test_http_expected_status_other_than_200(
    http_server: TestServer, session: aiohttp.ClientSession
) -> None:
    url = str(http_server.make_url("/fail"))
    result = await HttpProbe(session, url, timeout=2, status=503).probe()
    assert result.ok


@pytest.mark.asyncio
async def test_http_does_not_follow_redirects(
    http_server: TestServer, session: aiohttp.ClientSession
) -> None:
    url = str(http_server.make_url("/redirect"))
    result = await HttpProbe(session, url, timeout=2).probe()
    assert (result.ok, result.detail) == (False, "HTTP 302")


@pytest.mark.asyncio
async def test_http_body_substring(
    http_server: TestServer, session: aiohttp.ClientSession
) -> None:
    url = str(http_server.make_url("/ok"))
    assert (await HttpProbe(session, url, timeout=2, body="all good").probe()).ok
    result = await HttpProbe(session, url, timeout=2, body="healthy").probe()
    assert not result.ok
    assert result.detail == "HTTP 200, body lacks 'healthy'"


@pytest.mark.asyncio
async def test_http_timeout(http_server: TestServer, session: aiohttp.ClientSession) -> None:
    url = str(http_server.make_url("/slow"))
    result = await HttpProbe(session, url, timeout=0.15).probe()
    assert (result.ok, result.detail) == (False, "timeout after 0.15s")
    assert result.duration < 2


@pytest.mark.asyncio
async def test_http_connect_refused(session: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{free_port()}/healthz"
    result = await HttpProbe(session, url, timeout=2).probe()
    assert (result.ok, result.detail) == (False, "connect refused")


# ---------------------------------------------------------------------------- tcp


@pytest.mark.asyncio
async def test_tcp_up_when_listening() -> None:
    with listener() as s:
        result = await TcpProbe("127.0.0.1", s.getsockname()[1], timeout=2).probe()
    assert (result.ok, result.detail) == (True, "connected")


@pytest.mark.asyncio
async def test_tcp_down_on_closed_port() -> None:
    result = await TcpProbe("127.0.0.1", free_port(), timeout=2).probe()
    assert (result.ok, result.detail) == (False, "connect refused")


@pytest.mark.asyncio
async def test_tcp_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this host")
    with s:
        s.listen(1)
        result = await TcpProbe("::1", s.getsockname()[1], timeout=2).probe()
    assert result.ok


# ---------------------------------------------------------------------------- exec


@pytest.mark.asyncio
async def test_exec_true_is_up() -> None:
    result = await ExecProbe(["/bin/true"], timeout=2).probe()
    assert (result.ok, result.detail) == (True, "exit 0")


@pytest.mark.asyncio
async def test_exec_false_is_down() -> None:
    result = await ExecProbe(["/bin/false"], timeout=2).probe()
    assert (result.ok, result.detail) == (False, "exit 1")


@pytest.mark.asyncio
async def test_exec_detail_has_first_stderr_line() -> None:
    cmd = ["/bin/sh", "-c", "echo >&2; echo 'disk full' >&2; echo more >&2; exit 3"]
    result = await ExecProbe(cmd, timeout=2).probe()
    assert (result.ok, result.detail) == (False, "exit 3: disk full")


@pytest.mark.asyncio
async def test_exec_keeps_only_a_little_of_a_flood_of_stderr() -> None:
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('x' * 1_000_000); sys.exit(2)"]
    result = await ExecProbe(cmd, timeout=5).probe()
    assert not result.ok
    assert result.detail.startswith("exit 2: xxx")
    assert len(result.detail) <= 160


@pytest.mark.asyncio
async def test_exec_killed_by_signal() -> None:
    result = await ExecProbe(["/bin/sh", "-c", "kill -TERM $$"], timeout=2).probe()
    assert (result.ok, result.detail) == (False, "killed by SIGTERM")


@pytest.mark.asyncio
async def test_exec_missing_command() -> None:
    result = await ExecProbe(["/nonexistent/check"], timeout=2).probe()
    assert not result.ok
    assert result.detail.startswith("cannot run /nonexistent/check: ")


def test_exec_needs_a_command() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ExecProbe([], timeout=1)


@pytest.mark.asyncio
async def test_exec_timeout_kills_the_process_group(tmp_path: Path) -> None:
    parent, child = tmp_path / "parent", tmp_path / "child"
    script = f"echo $$ > {parent}; sleep 5 & echo $! > {child}; wait"
    start = time.monotonic()
    result = await ExecProbe(["/bin/sh", "-c", script], timeout=0.2).probe()
    assert (result.ok, result.detail) == (False, "timeout after 0.2s")
    assert time.monotonic() - start < 3
    pids = [await read_pid(parent), await read_pid(child)]
    await eventually(lambda: all(gone(pid) for pid in pids), timeout=2)


@pytest.mark.asyncio
async def test_exec_leftover_background_child_is_killed(tmp_path: Path) -> None:
    child = tmp_path / "child"
    script = f"sleep 5 & echo $! > {child}; exit 0"
    start = time.monotonic()
    result = await ExecProbe(["/bin/sh", "-c", script], timeout=3).probe()
    assert (result.ok, result.detail) == (True, "exit 0")
    assert time.monotonic() - start < 2  # did not wait for the child holding stderr
    pid = await read_pid(child)
    await eventually(lambda: gone(pid), timeout=2)


@pytest.mark.asyncio
async def test_exec_cancelled_probe_kills_the_process(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    probe = ExecProbe(["/bin/sh", "-c", f"echo $$ > {parent}; exec sleep 5"], timeout=10)
    task = asyncio.create_task(probe.probe())
    pid = await read_pid(parent)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: gone(pid), timeout=2)


# ---------------------------------------------------------------------------- make_probe


@pytest.mark.asyncio
async def test_probes_take_their_settings_from_the_check(
    session: aiohttp.ClientSession,
) -> None:
    web = HealthCheck(name="web", http=HttpCheck(url="http://127.0.0.1:8080/healthz",
                                                 status=204, body="ok"),
                      interval=0.2, timeout=0.15, rise=3, fall=4)
    assert (web.name, web.kind, web.interval, web.timeout, web.rise, web.fall) == (
        "web", "http", 0.2, 0.15, 3, 4)
    probe = make_probe(web, session)
    assert isinstance(probe, HttpProbe)
    assert (probe.url, probe.status, probe.body, probe.timeout) == (
        "http://127.0.0.1:8080/healthz", 204, "ok", 0.15)
    tcp = HealthCheck(name="db", tcp=TcpCheck(host="127.0.0.1", port=5432))
    assert (tcp.kind, tcp.interval, tcp.timeout, tcp.rise, tcp.fall) == ("tcp", 0.2, 0.15, 2, 2)
    probe = make_probe(tcp, None)
    assert isinstance(probe, TcpProbe)
    assert (probe.host, probe.port, probe.timeout) == ("127.0.0.1", 5432, 0.15)
    ex = HealthCheck(name="custom", exec=ExecCheck(command=["/bin/check", "-q"]))
    probe = make_probe(ex, None)
    assert isinstance(probe, ExecProbe)
    assert probe.command == ("/bin/check", "-q")


def test_probes_from_checks_validated_from_mappings() -> None:
    check = HealthCheck.model_validate({"name": "c", "exec": {"command": ["/bin/true"]},
                                        "interval": 2, "rise": 1})
    probe = make_probe(check, None)
    assert isinstance(probe, ExecProbe)
    assert (check.kind, probe.command, check.interval, check.rise) == (
        "exec", ("/bin/true",), 2, 1)
    check = HealthCheck.model_validate({"name": "w", "http": {"url": "http://127.0.0.1/"}})
    assert isinstance(check.probe, HttpCheck)
    assert (check.probe.status, check.probe.body) == (200, None)


@pytest.mark.asyncio
async def test_probes_from_the_config_model(session: aiohttp.ClientSession) -> None:
    checks = [
        {"name": "web", "http": {"url": "http://127.0.0.1:8080/healthz", "body": "ok"},
         "interval": "300ms", "timeout": "150ms", "rise": 3, "fall": 1},
        {"name": "db", "tcp": {"host": "127.0.0.1", "port": 5432}},
        {"name": "custom", "exec": {"command": ["/usr/local/bin/check-app", "-q"]}},
    ]
    web, db, custom = [HealthCheck.model_validate(c) for c in checks]
    assert (web.name, web.kind, web.interval, web.timeout, web.rise, web.fall) == (
        "web", "http", 0.3, 0.15, 3, 1)
    http = make_probe(web, session)
    assert isinstance(http, HttpProbe)
    assert (http.url, http.status, http.body, http.timeout) == (
        "http://127.0.0.1:8080/healthz", 200, "ok", 0.15)
    tcp = make_probe(db, None)
    assert isinstance(tcp, TcpProbe)
    assert (db.kind, tcp.host, tcp.port) == ("tcp", "127.0.0.1", 5432)
    ex = make_probe(custom, None)
    assert isinstance(ex, ExecProbe)
    assert (custom.kind, ex.command) == ("exec", ("/usr/local/bin/check-app", "-q"))


def test_make_probe_by_kind() -> None:
    tcp = HealthCheck(name="t", interval=1, timeout=0.5, rise=1, fall=1,
                      tcp=TcpCheck(host="127.0.0.1", port=1))
    ex = HealthCheck(name="e", interval=1, timeout=0.5, rise=1, fall=1,
                     exec=ExecCheck(command=["/bin/true"]))
    http = HealthCheck(name="h", interval=1, timeout=0.5, rise=1, fall=1,
                       http=HttpCheck(url="http://127.0.0.1/"))
    assert isinstance(make_probe(tcp, None), TcpProbe)
    assert isinstance(make_probe(ex, None), ExecProbe)
    link = make_probe(LinkCheck(interface="eth0"), None)
    assert isinstance(link, LinkProbe)
    assert link.path == "/sys/class/net/eth0/operstate"
    with pytest.raises(ValueError, match="session"):
        make_probe(http, None)


# ---------------------------------------------------------------------------- monitor


Event = tuple[bool | None, str, ProbeResult]


def tcp_check(name: str, port: int) -> HealthCheck:
    # The config requires timeout < interval; 80 ms is ample for a loopback connect.
    return HealthCheck(name=name, tcp=TcpCheck(host="127.0.0.1", port=port),
                       interval=0.1, timeout=0.08, rise=2, fall=2)


@pytest.mark.asyncio
async def test_monitor_tcp_check_up_then_down() -> None:
    events: list[Event] = []
    with listener() as s:
        port = s.getsockname()[1]
        monitor = HealthMonitor([tcp_check("svc", port)], lambda *e: events.append(e))
        assert monitor.healthy is None
        async with running(monitor):
            await eventually(lambda: len(events) == 1)
            assert events[0][:2] == (True, "svc")
            assert monitor.healthy is True
            s.close()
            await eventually(lambda: len(events) == 2)
            healthy, name, result = events[1]
            assert (healthy, name, result.ok, result.detail) == (
                False, "svc", False, "connect refused")
            [status] = monitor.status()
            assert (status.name, status.kind, status.up, status.detail) == (
                "svc", "tcp", False, "connect refused")
            assert status.changed_at is not None
            assert status.changed_at <= time.monotonic()


@pytest.mark.asyncio
async def test_monitor_ands_two_checks() -> None:
    events: list[Event] = []
    with listener() as a, listener() as b:
        checks = [tcp_check("a", a.getsockname()[1]), tcp_check("b", b.getsockname()[1])]
        monitor = HealthMonitor(checks, lambda *e: events.append(e))
        async with running(monitor):
            await eventually(lambda: all(st.up for st in monitor.status()))
            await eventually(lambda: len(events) == 1)
            assert events[0][0] is True
            b.close()
            await eventually(lambda: len(events) == 2)
            assert events[1][:2] == (False, "b")
            assert [st.up for st in monitor.status()] == [True, False]
            a.close()
            await eventually(lambda: monitor.status()[0].up is False)
    assert [e[0] for e in events] == [True, False]  # a going down too changes nothing


@pytest.mark.asyncio
async def test_monitor_http_check_closes_its_session(http_server: TestServer) -> None:
    events: list[Event] = []
    check = HealthCheck(name="web", http=HttpCheck(url=str(http_server.make_url("/ok")),
                                                   body="good"))
    monitor = HealthMonitor([check], lambda *e: events.append(e))
    async with running(monitor):
        await eventually(lambda: len(events) == 1)
        assert events[0][0] is True
        session = monitor._session
        assert session is not None
    assert session.closed
    await monitor.close()  # idempotent


class FakeProbe:
    def __init__(self, results: list[bool] | None = None, delay: float = 0.0,
                 error: Exception | None = None) -> None:
        self.results = results or [True]
        self.delay = delay
        self.error = error
        self.calls = 0
        self.active = 0
        self.max_active = 0

    async def probe(self) -> ProbeResult:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await real_sleep(self.delay)
            ok = self.results[min(self.calls, len(self.results) - 1)]
            self.calls += 1
            if self.error is not None:
                raise self.error
            return ProbeResult(ok, "fake up" if ok else "fake down", self.delay)
        finally:
            self.active -= 1


def fake_check(name: str, interval: float = 0.02, rise: int = 2, fall: int = 2) -> HealthCheck:
    # Probed by a FakeProbe: the timeout only sets when the monitor gives up on a hung
    # probe (timeout + HUNG_PROBE_GRACE), far beyond any FakeProbe delay.
    return HealthCheck(name=name, interval=interval, timeout=interval / 2, rise=rise,
                       fall=fall, exec=ExecCheck(command=["/bin/true"]))


@pytest.mark.asyncio
async def test_monitor_unknown_check_holds_back_health_but_a_failure_does_not() -> None:
    fast_down, slow_up = FakeProbe([False]), FakeProbe([True], delay=0.3)
    probes = {"down": fast_down, "up": slow_up}
    events: list[Event] = []
    monitor = HealthMonitor([fake_check("down"), fake_check("up")],
                            lambda *e: events.append(e),
                            probe_factory=lambda check, _session: probes[check.name])
    async with running(monitor):
        await eventually(lambda: len(events) == 1)
        assert events[0][:2] == (False, "down")
        assert monitor.status()[1].up is None  # reported while "up" is still unknown
        await eventually(lambda: slow_up.calls >= 2)
    assert [e[0] for e in events] == [False]


@pytest.mark.asyncio
async def test_monitor_probe_never_overlaps_itself() -> None:
    slow = FakeProbe([True], delay=0.06)
    monitor = HealthMonitor([fake_check("slow", interval=0.01)], lambda *e: None,
                            probe_factory=lambda _check, _session: slow)
    async with running(monitor):
        await eventually(lambda: slow.calls >= 4)
    assert slow.max_active == 1


@pytest.mark.asyncio
async def test_monitor_schedule_counts_from_probe_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The monitor sleeps only for what is left of the interval after a probe, so a
    # probe taking 60 of 100 ms leaves at most 40 ms of sleep, never a full interval.
    probe = FakeProbe([True], delay=0.06)
    waits: list[float] = []

    async def spy(delay: float) -> None:
        waits.append(delay)
        await real_sleep(delay)

    monitor = HealthMonitor([fake_check("p", interval=0.1)], lambda *e: None,
                            probe_factory=lambda _check, _session: probe)
    monkeypatch.setattr(asyncio, "sleep", spy)
    async with running(monitor):
        while len(waits) < 3:
            await real_sleep(0.01)
    assert all(0 <= w <= 0.045 for w in waits), waits


@pytest.mark.asyncio
async def test_monitor_probe_that_raises_counts_as_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = FakeProbe(error=RuntimeError("boom"))
    events: list[Event] = []
    monitor = HealthMonitor([fake_check("broken")], lambda *e: events.append(e),
                            probe_factory=lambda _check, _session: broken)
    with caplog.at_level(logging.ERROR, logger="vipd.health"):
        async with running(monitor):
            await eventually(lambda: len(events) == 1 and broken.calls >= 3)
    healthy, name, result = events[0]
    assert (healthy, name) == (False, "broken")
    assert result.detail == "probe error: RuntimeError: boom"
    assert [r.message for r in caplog.records] == ["check broken: probe raised"]


@pytest.mark.asyncio
async def test_monitor_logs_each_transition_once(caplog: pytest.LogCaptureFixture) -> None:
    probe = FakeProbe([True, False, False, False, False])
    monitor = HealthMonitor([fake_check("svc")], lambda *e: None,
                            probe_factory=lambda _check, _session: probe)
    with caplog.at_level(logging.INFO, logger="vipd.health"):
        async with running(monitor):
            await eventually(lambda: probe.calls >= 5)
    assert [r.getMessage() for r in caplog.records] == [
        "check svc: unknown -> up (fake up)",
        "check svc: up -> down (fake down)",
    ]
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]


@pytest.mark.asyncio
async def test_monitor_without_checks_is_healthy() -> None:
    events: list[Event] = []
    monitor = HealthMonitor([], lambda *e: events.append(e))
    assert monitor.healthy is True
    assert monitor.status() == []
    async with running(monitor) as task:
        await eventually(lambda: len(events) == 1)
        await asyncio.sleep(0.05)
        assert not task.done()
    assert [(e[0], e[1]) for e in events] == [(True, "")]


@pytest.mark.asyncio
async def test_monitor_on_change_error_ends_run() -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("daemon bug")

    monitor = HealthMonitor([fake_check("p")], explode,
                            probe_factory=lambda _check, _session: FakeProbe([True]))
    with pytest.raises(ExceptionGroup) as info:
        await asyncio.wait_for(monitor.run(), timeout=5)
    assert info.group_contains(RuntimeError, match="daemon bug")


def test_monitor_takes_config_models_and_rejects_duplicate_names() -> None:
    cfg = HealthCheck(name="db", tcp=TcpCheck(host="127.0.0.1", port=5432))
    monitor = HealthMonitor([cfg], lambda *e: None)
    assert [st.name for st in monitor.status()] == ["db"]
    with pytest.raises(ValueError, match="duplicate health check names: db"):
        HealthMonitor([cfg, cfg], lambda *e: None)


def test_monitor_runs_the_link_check_beside_configured_ones() -> None:
    cfg = HealthCheck(name="db", tcp=TcpCheck(host="127.0.0.1", port=5432))
    monitor = HealthMonitor([cfg, LinkCheck(interface="eth0")], lambda *e: None)
    assert [(st.name, st.kind, st.up) for st in monitor.status()] == [
        ("db", "tcp", None), ("link.eth0", "link", None)]
    # A configured check may not take the built-in check's name.
    clash = HealthCheck(name="link.eth0", tcp=TcpCheck(host="127.0.0.1", port=5432))
    with pytest.raises(ValueError, match=r"duplicate health check names: link\.eth0"):
        HealthMonitor([clash, LinkCheck(interface="eth0")], lambda *e: None)
