"""Health checks of the local service: http, tcp, exec and link probes and the monitor
that runs them.

A check is its config model: ``vipd.config.HealthCheck`` from the config file, or
``vipd.config.LinkCheck`` that the daemon adds for ``track_interface``. ``make_probe``
builds the runtime probe (``HttpProbe``, ...) from it.

Each check runs in its own task, probing every ``interval`` seconds (measured from the
start of the previous probe, so slow probes do not make the schedule drift, and a probe
never overlaps itself). Results go through a ``vipd.core.health.Hysteresis`` per check;
the node's health is the AND of all checks (``combine``), and only a change of that
combined value reaches the daemon, through the synchronous ``on_change`` callback.

A probe never raises for a failing service: it returns a ``ProbeResult`` whose ``detail``
says why ("HTTP 503", "connect refused", "exit 3: ...", "timeout after 0.15s"). A probe
that raises anyway (a bug) counts as down with the exception in the detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp

from vipd import __version__
from vipd.config import Check, ExecCheck, HttpCheck, LinkCheck, ProbeKind, TcpCheck
from vipd.core.health import Hysteresis, combine

__all__ = ["CheckStatus", "ExecProbe", "HealthMonitor", "HttpProbe", "LinkProbe", "Probe",
           "ProbeResult", "TcpProbe", "make_probe"]

log = logging.getLogger(__name__)

HTTP_BODY_LIMIT = 64 * 1024  # bytes of a response searched for ``body``
STDERR_KEEP = 512  # bytes of an exec check's stderr kept for the detail
DETAIL_LIMIT = 160  # characters; details end up in logs, the API and metrics labels never
# A probe that ignores its own timeout (a bug) is abandoned this long after it.
HUNG_PROBE_GRACE = 2.0


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    detail: str
    duration: float  # seconds


class Probe(Protocol):
    async def probe(self) -> ProbeResult: ...


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 3] + "..."


def _timeout_detail(timeout: float) -> str:
    return f"timeout after {timeout:g}s"


def _connect_detail(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return "connect refused"
    return _short(f"connect failed: {exc.strerror or exc}")


class HttpProbe:
    """GET ``url``; up iff the status matches and, if ``body`` is set, the first 64 KiB
    of the response contain it. Redirects are not followed: the status is the
    service's own answer."""

    def __init__(self, session: aiohttp.ClientSession, url: str, *, timeout: float,
                 status: int = 200, body: str | None = None) -> None:
        self.session = session
        self.url = url
        self.timeout = timeout
        self.status = status
        self.body = body

    async def probe(self) -> ProbeResult:
        start = time.monotonic()
        try:
            async with (
                asyncio.timeout(self.timeout),
                self.session.get(self.url, allow_redirects=False) as resp,
            ):
                status = resp.status
                data = b""
                if self.body is not None and status == self.status:
                    data = await _read_capped(resp.content, HTTP_BODY_LIMIT)
        except TimeoutError:
            # Before aiohttp's own errors: its timeout errors subclass TimeoutError too.
            return ProbeResult(False, _timeout_detail(self.timeout), time.monotonic() - start)
        except aiohttp.ClientConnectorError as exc:
            return ProbeResult(False, _connect_detail(exc), time.monotonic() - start)
        except aiohttp.ClientError as exc:
            detail = _short(f"{type(exc).__name__}: {exc}")
            return ProbeResult(False, detail, time.monotonic() - start)
        except OSError as exc:
            return ProbeResult(False, _connect_detail(exc), time.monotonic() - start)
        duration = time.monotonic() - start
        if status != self.status:
            return ProbeResult(False, f"HTTP {status}", duration)
        if self.body is not None and self.body.encode() not in data:
            return ProbeResult(False, _short(f"HTTP {status}, body lacks {self.body!r}"), duration)
        return ProbeResult(True, f"HTTP {status}", duration)


class TcpProbe:
    """Up iff a TCP connection to ``host:port`` is accepted within the timeout."""

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    async def probe(self) -> ProbeResult:
        start = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                _reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return ProbeResult(False, _timeout_detail(self.timeout), time.monotonic() - start)
        except OSError as exc:
            return ProbeResult(False, _connect_detail(exc), time.monotonic() - start)
        duration = time.monotonic() - start
        writer.close()
        # The connection was accepted, which is all this check asks; a peer that resets
        # it right away (common for services that dislike empty connections) is still up.
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return ProbeResult(True, "connected", duration)


class LinkProbe:
    """Up iff the interface's operational state is up (or "unknown", which virtual links
    without carrier reporting use). Reads sysfs: no process, no socket."""

    def __init__(self, ifname: str) -> None:
        self.path = f"/sys/class/net/{ifname}/operstate"

    async def probe(self) -> ProbeResult:
        start = time.monotonic()
        try:
            with open(self.path) as f:
                state = f.read().strip()
        except OSError as exc:
            return ProbeResult(False, f"interface gone ({exc.strerror})", 0.0)
        return ProbeResult(state in ("up", "unknown"), f"link {state}", time.monotonic() - start)


class ExecProbe:
    """Run ``command`` (an argv list, never a shell); up iff it exits 0 in time.

    The command runs in its own session, so on timeout (or cancellation) the whole
    process group is killed and reaped. The group is also killed once the command has
    exited: a check is one-shot, and anything it left running in its group must not
    pile up probe after probe.

    stderr goes to a pipe of our own rather than ``stderr=PIPE``: on Python 3.11
    ``Process.wait()`` does not return until the subprocess pipes close, so a background
    child holding stderr would turn a finished check into a timeout.
    """

    def __init__(self, command: Sequence[str], *, timeout: float,
                 preexec: Callable[[], None] | None = None) -> None:
        if not command:
            raise ValueError("exec check needs a non-empty command")
        self.command = tuple(command)
        self.timeout = timeout
        self.preexec = preexec

    async def probe(self) -> ProbeResult:
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        capture = _StderrCapture(loop, STDERR_KEEP)
        read_fd, write_fd = os.pipe()  # both close-on-exec: other checks never inherit them
        read_file = os.fdopen(read_fd, "rb", 0)
        try:
            pipe, _ = await loop.connect_read_pipe(lambda: capture, read_file)
        except BaseException:
            read_file.close()
            os.close(write_fd)
            raise
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=write_fd,
                    start_new_session=True,
                    preexec_fn=self.preexec,  # drops vipd's capabilities (privileges.py)
                )
            finally:
                os.close(write_fd)
        except OSError as exc:
            pipe.close()
            detail = _short(f"cannot run {self.command[0]}: {exc.strerror or exc}")
            return ProbeResult(False, detail, time.monotonic() - start)
        except BaseException:
            pipe.close()
            raise
        try:
            async with asyncio.timeout(self.timeout):
                code = await proc.wait()
        except TimeoutError:
            return ProbeResult(False, _timeout_detail(self.timeout), time.monotonic() - start)
        finally:
            duration = time.monotonic() - start
            try:
                _kill_group(proc.pid)
                if proc.returncode is None:
                    await proc.wait()
                # With the group dead the pipe hits EOF at once; only a child that
                # escaped into a session of its own could hold it: we do not wait for it.
                await asyncio.wait({capture.closed}, timeout=0.2)
            finally:
                pipe.close()
        if code == 0:
            return ProbeResult(True, "exit 0", duration)
        if code < 0:
            try:
                why = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                why = f"killed by signal {-code}"
        else:
            why = f"exit {code}"
        text = bytes(capture.kept).decode(errors="replace")
        line = next((ln for ln in text.splitlines() if ln.strip()), "")
        return ProbeResult(False, _short(f"{why}: {line}" if line else why), duration)


class _StderrCapture(asyncio.Protocol):
    """Keeps the first ``keep`` bytes of a pipe and discards the rest, so a chatty
    check can neither block on a full pipe nor make us buffer its output."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keep: int) -> None:
        self.keep = keep
        self.kept = bytearray()
        self.closed: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        if len(self.kept) < self.keep:
            self.kept += data[: self.keep - len(self.kept)]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _kill_group(pgid: int) -> None:
    # ESRCH means the group is already gone: nothing left to kill.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Read until EOF or ``limit`` bytes, whichever comes first."""
    data = bytearray()
    while len(data) < limit:
        chunk = await stream.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def make_probe(check: Check, session: aiohttp.ClientSession | None,
               preexec: Callable[[], None] | None = None) -> Probe:
    if isinstance(check, LinkCheck):
        return LinkProbe(check.interface)
    match check.probe:
        case HttpCheck(url=url, status=status, body=body):
            if session is None:
                raise ValueError(f"health check {check.name!r}: http probe needs a session")
            return HttpProbe(session, url, timeout=check.timeout, status=status, body=body)
        case TcpCheck(host=host, port=port):
            return TcpProbe(host, port, timeout=check.timeout)
        case ExecCheck(command=command):
            return ExecProbe(command, timeout=check.timeout, preexec=preexec)


@dataclass(frozen=True, slots=True)
class CheckStatus:
    name: str
    kind: ProbeKind | Literal["link"]
    up: bool | None
    detail: str | None  # of the last probe; None before the first
    duration: float | None  # of the last probe, seconds
    changed_at: float | None  # time.monotonic() of the last change of ``up``


# Only known values are reported, so the callback receives a bool (a callback typed to
# accept ``bool | None`` fits as well).
OnChange = Callable[[bool, str, ProbeResult], None]


class _CheckState:
    __slots__ = ("changed_at", "check", "error_logged", "hysteresis", "last", "probe")

    def __init__(self, check: Check) -> None:
        self.check = check
        self.hysteresis = Hysteresis(rise=check.rise, fall=check.fall)
        self.probe: Probe | None = None
        self.last: ProbeResult | None = None
        self.changed_at: float | None = None
        self.error_logged = False


def _word(up: bool | None) -> str:
    return "unknown" if up is None else "up" if up else "down"


class HealthMonitor:
    """Runs the checks and reports changes of the node's combined health.

    ``on_change(healthy, check_name, result)`` is called synchronously, from the
    monitor's tasks, each time the combined health changes, with the check and probe
    result that caused it. While some checks have no result yet and none is down, the
    combined health is None and nothing is reported. With no checks the node is healthy
    from the start: ``healthy`` is True at once and ``run()`` reports
    ``on_change(True, "", ...)`` once. An exception from ``on_change`` ends ``run()``.
    """

    def __init__(
        self,
        checks: Iterable[Check],
        on_change: OnChange,
        *,
        probe_factory: Callable[[Check, aiohttp.ClientSession | None], Probe] | None = None,
        on_probe: Callable[[str, ProbeResult], None] | None = None,
        exec_preexec: Callable[[], None] | None = None,
    ) -> None:
        checks = list(checks)
        names = [c.name for c in checks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate health check names: {', '.join(dupes)}")
        self._checks = [_CheckState(c) for c in checks]
        self._on_change = on_change
        self._probe_factory = probe_factory or functools.partial(make_probe,
                                                                 preexec=exec_preexec)
        self._on_probe = on_probe  # every result (metrics); on_change only sees changes
        self._session: aiohttp.ClientSession | None = None
        self._reported: bool | None = None
        self._running = False

    @property
    def healthy(self) -> bool | None:
        return combine(c.hysteresis.up for c in self._checks)

    def status(self) -> list[CheckStatus]:
        return [
            CheckStatus(name=c.check.name, kind=c.check.kind, up=c.hysteresis.up,
                        detail=None if c.last is None else c.last.detail,
                        duration=None if c.last is None else c.last.duration,
                        changed_at=c.changed_at)
            for c in self._checks
        ]

    async def run(self) -> None:
        """Probe until cancelled; closes the HTTP session on the way out."""
        if self._running:
            raise RuntimeError("HealthMonitor.run() is already running")
        self._running = True
        try:
            if any(c.check.kind == "http" for c in self._checks):
                self._session = aiohttp.ClientSession(
                    cookie_jar=aiohttp.DummyCookieJar(),
                    headers={"User-Agent": f"vipd/{__version__} health-check"},
                )
            for state in self._checks:
                state.probe = self._probe_factory(state.check, self._session)
            if not self._checks:
                self._report(True, "", ProbeResult(True, "no checks", 0.0))
                await asyncio.Event().wait()  # nothing to probe; run until cancelled
            else:
                async with asyncio.TaskGroup() as tg:
                    for state in self._checks:
                        tg.create_task(self._run_check(state), name=f"health:{state.check.name}")
        finally:
            self._running = False
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _run_check(self, state: _CheckState) -> None:
        while True:
            started = time.monotonic()
            result = await self._probe_once(state)
            self._record(state, result)
            await asyncio.sleep(max(0.0, started + state.check.interval - time.monotonic()))

    async def _probe_once(self, state: _CheckState) -> ProbeResult:
        assert state.probe is not None
        start = time.monotonic()
        limit = state.check.timeout + HUNG_PROBE_GRACE
        try:
            async with asyncio.timeout(limit):
                result = await state.probe.probe()
        except TimeoutError:
            result = ProbeResult(False, f"probe hung past {limit:g}s", time.monotonic() - start)
        except Exception as exc:
            # A bug in a probe, not a verdict on the service: down, and logged with its
            # traceback once per run of consecutive errors so it cannot flood the log.
            if not state.error_logged:
                log.error("check %s: probe raised", state.check.name, exc_info=True)
                state.error_logged = True
            detail = _short(f"probe error: {type(exc).__name__}: {exc}")
            return ProbeResult(False, detail, time.monotonic() - start)
        state.error_logged = False
        return result

    def _record(self, state: _CheckState, result: ProbeResult) -> None:
        state.last = result
        if self._on_probe is not None:
            self._on_probe(state.check.name, result)
        old = state.hysteresis.up
        if not state.hysteresis.observe(result.ok):
            return
        state.changed_at = time.monotonic()
        new = state.hysteresis.up
        log.log(logging.INFO if new else logging.WARNING, "check %s: %s -> %s (%s)",
                state.check.name, _word(old), _word(new), result.detail)
        healthy = self.healthy
        if healthy is not None and healthy != self._reported:
            self._report(healthy, state.check.name, result)

    def _report(self, healthy: bool, name: str, result: ProbeResult) -> None:
        self._reported = healthy
        self._on_change(healthy, name, result)
