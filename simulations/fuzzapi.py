"""schemathesis against the real control API, from docs/openapi.yaml.

The server is a real pair: two vipd daemons (`vipd.daemon.Daemon`, with a mover that
keeps the VIPs in memory) heartbeating over 127.0.0.1 in a child process
(``python -m simulations.fuzzapi serve DIR``; the daemons' signal handlers need its main
thread), each serving its control API on a loopback port: node a with a tokens file
(a read and an operate token), node b without one. So the status documents checked
against the schema are the real ones, and the moves really happen.

Every operation is called with no token, an unknown one, the read and the operate token
(and on node b, which has no tokens file), with bodies that fit the schema and bodies
that do not (schemathesis' positive and negative modes), and each response goes through
schemathesis' checks. A failure is a 5xx (other than the documented 503 of /readyz), a
response that does not match the schema, an accepted invalid body, a crash of a
daemon (its process gone, or a traceback in its log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import ip_interface
from pathlib import Path
from typing import Any

import yaml

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
VIPS = ["192.0.2.10/32", "2001:db8::10/128"]
CREDENTIALS = ("none", "unknown", "read", "operate")
UNKNOWN_TOKEN = "vipd_unknown-token-0000000000000000"
# schemathesis checks that do not fit this API, and why:
EXCLUDED_CHECKS = {
    # A token that may read is refused a move with 403, by design (docs/api.md); and
    # a move valid by the schema may be refused by the election with 409.
    "positive_data_acceptance",
}


class MemoryMover:
    """A `vipd.movers.base.VipMover` whose "kernel" is a set: the API's server needs a
    running election, not addresses."""

    def __init__(self) -> None:
        self.vips = {ip_interface(v) for v in VIPS}
        self.addresses: set[Any] = set()

    async def acquire(self, lease: float) -> set[Any]:
        added = self.vips - self.addresses
        self.addresses |= self.vips
        return added

    async def release(self) -> None:
        self.addresses.clear()

    async def held(self) -> set[Any]:
        return set(self.addresses)

    async def announce(self) -> None:
        return None


def _free_ports(kind: socket.SocketKind, count: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, kind) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _configs(work: Path) -> dict[str, Any]:
    """Both nodes' configs, key and tokens files in ``work``; what the client needs."""
    from vipd.keys import generate_key_line
    from vipd.tokens import new_token

    key = work / "pair.key"
    key.write_text(generate_key_line(1) + "\n")
    read_token, read_line = new_token("reader", "read")
    operate_token, operate_line = new_token("operator", "operate")
    tokens = work / "api.tokens"
    tokens.write_text(f"{read_line}\n{operate_line}\n")
    for path in (key, tokens):
        os.chmod(path, 0o600)
    hb_a, hb_b = _free_ports(socket.SOCK_DGRAM, 2)
    api_a, api_b = _free_ports(socket.SOCK_STREAM, 2)
    for name, prio, port, peer, api in (("a", 150, hb_a, hb_b, api_a),
                                        ("b", 100, hb_b, hb_a, api_b)):
        settings: dict[str, Any] = {
            "node": name, "cluster": "fuzz", "interface": "fake0", "vips": VIPS,
            "priority": prio,
            "heartbeat": {"bind": f"127.0.0.1:{port}", "peers": [f"127.0.0.1:{peer}"]},
            "auth": {"key_file": str(key)}, "vip_lease": "1s",
            "state_dir": str(work / f"state-{name}"), "track_interface": False,
            "api": {"listen": f"127.0.0.1:{api}"}, "metrics": {"listen": None},
        }
        if name == "a":
            settings["api"]["tokens_file"] = str(tokens)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(settings))
    return {"a": f"http://127.0.0.1:{api_a}", "b": f"http://127.0.0.1:{api_b}",
            "read": read_token, "operate": operate_token}


async def _serve(work: Path) -> None:
    from vipd.config import load_config
    from vipd.daemon import Daemon

    daemons = [Daemon(load_config(work / f"{n}.yaml"), config_path=work / f"{n}.yaml",
                      mover=MemoryMover()) for n in ("a", "b")]
    tasks = [asyncio.create_task(d.run(), name=f"daemon {d.config.node}") for d in daemons]
    while not all(d.election.ready(asyncio.get_running_loop().time()) for d in daemons):
        await asyncio.sleep(0.02)
    (work / "ready").touch()
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:  # a daemon ended on its own: the parent sees this process gone
        task.result()


@dataclass
class ApiResult:
    label: str = "pair on 127.0.0.1 (a: tokens, b: none)"
    requests: int = 0
    operations: int = 0
    failures: int = 0
    server_errors: int = 0  # unexpected 5xx
    seconds: float = 0.0
    status_codes: dict[str, int] = field(default_factory=dict)
    failure_details: list[str] = field(default_factory=list)


class Server:
    """The child process serving the pair; `stop()` kills it and returns its log."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.info = _configs(work)
        self.log = work / "server.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "simulations.fuzzapi", "serve", str(work)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 30
        while not (work / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def crashed(self) -> str | None:
        if self.proc.poll() is not None:
            return f"the daemons' process exited with {self.proc.returncode}"
        text = self.log.read_text(errors="replace")
        if "Traceback" in text:
            return f"traceback in the daemons' log:\n{text[text.index('Traceback'):][:3000]}"
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def run_api(*, seconds: float | None = None, examples: int = 25, derandomize: bool = False,
            schema_path: Path = SCHEMA) -> ApiResult:
    """Fuzz every operation with every credential, ``examples`` cases each, in rounds
    until ``seconds`` have passed (one round when None; ``derandomize``: the first round
    is the same every time, as the test suite wants)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis import GenerationMode

    result = ApiResult()
    from schemathesis.core.result import Ok

    schema = schemathesis.openapi.from_path(str(schema_path))
    operations = []
    for found in schema.get_all_operations():
        if not isinstance(found, Ok):
            raise RuntimeError(f"{schema_path}: {found.err()}")
        operations.append(found.ok())
    result.operations = len(operations)
    # invalid data where there is something to make invalid (a body, a header)
    modes = {op.label: [GenerationMode.POSITIVE] + (
        [GenerationMode.NEGATIVE] if list(op.body) or list(op.headers) else [])
        for op in operations}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vipd-fuzzapi-") as tmp:
        server = Server(Path(tmp))
        info = server.info
        targets = [(info["a"], c) for c in CREDENTIALS] + [(info["b"], "operate")]
        session = requests.Session()
        try:
            for round_no in range(1_000_000):
                for op in operations:
                    for base_url, credential in targets:
                        headers = {} if credential == "none" else {
                            "Authorization": "Bearer " + info.get(credential, UNKNOWN_TOKEN)}
                        for mode in modes[op.label]:
                            _fuzz(op.as_strategy(mode), base_url, headers, session, result,
                                  settings(max_examples=examples, deadline=None,
                                           database=None,
                                           derandomize=derandomize and round_no == 0,
                                           suppress_health_check=list(HealthCheck)))
                crash = server.crashed()
                if crash is not None:
                    result.failures += 1
                    result.failure_details.append(crash)
                    break
                if seconds is None or time.monotonic() - started >= seconds:
                    break
        finally:
            session.close()
            server.stop()
    result.status_codes = dict(sorted(result.status_codes.items()))
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _fuzz(strategy: Any, base_url: str, headers: dict[str, str], session: Any,
          result: ApiResult, hypothesis_settings: Any) -> None:
    """Call ``base_url`` with the cases of ``strategy`` and check each response."""
    from hypothesis import given

    @hypothesis_settings
    @given(case=strategy)
    def call(case: Any) -> None:
        # explicit headers: schemathesis then also probes the call without and with a
        # wrong token (its ignored_auth check)
        response = case.call(base_url=base_url, session=session, headers=headers)
        result.requests += 1
        code = response.status_code
        result.status_codes[str(code)] = result.status_codes.get(str(code), 0) + 1
        if code >= 500 and (case.path, code) != ("/readyz", 503):
            result.server_errors += 1
        _validate(case, response, result, headers)

    call()


def _validate(case: Any, response: Any, result: ApiResult, headers: dict[str, str]) -> None:
    """schemathesis' checks on one response; failures are counted, the first few kept."""
    from schemathesis import checks
    from schemathesis.core.failures import FailureGroup

    excluded = [getattr(checks, name) for name in EXCLUDED_CHECKS]
    try:
        case.validate_response(response, excluded_checks=excluded, headers=headers)
    except FailureGroup as exc:
        result.failures += 1
        if len(result.failure_details) < 5:
            result.failure_details.append(str(exc)[:3000])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="schemathesis against the control API")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the pair (the child process of run_api)")
    serve.add_argument("work", type=Path)
    fuzz = sub.add_parser("run", help="fuzz the API for a while")
    fuzz.add_argument("--seconds", type=float, default=None)
    fuzz.add_argument("--examples", type=int, default=25)
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve(args.work))
        return 0
    report = run_api(seconds=args.seconds, examples=args.examples)
    print(json.dumps(report.__dict__, indent=1))
    return 1 if report.failures or report.server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
