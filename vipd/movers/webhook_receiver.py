"""A reference receiver for the `webhook` mover: checks signatures, refuses replays and
stale terms, applies each (vip, term, action) at most once, and answers verification.

    python -m vipd.movers.webhook_receiver --listen 127.0.0.1:8443 --secret-file F \\
        [--apply /usr/local/bin/move-vip]

``--apply`` runs a program with ``VIP NODE TERM ACTION`` for every change it accepts (the
place for ``gcloud`` or ``az``: docs/cloud.md); without it the receiver only keeps the
state, which is what the tests drive. Put it behind TLS (a reverse proxy, or
`--cert/--key`). State is in memory: a restarted receiver accepts the next term it sees.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from vipd.movers.webhook import NONCE, SIGNATURE, TIMESTAMP, load_secret, sign

MAX_SKEW = 300.0  # s: a request stamped further from our clock is refused
Apply = Callable[[str, str, int, str], Awaitable[None]]


@dataclass
class Holding:
    node: str | None
    term: int


@dataclass
class Receiver:
    secret: bytes
    apply: Apply | None = None
    state: dict[tuple[str, str], Holding] = field(default_factory=dict)  # (cluster, vip)
    applied: list[tuple[str, str, str, int, str]] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # signature -> time seen
    refused: list[str] = field(default_factory=list)  # why, per refused request

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/vip", self.post)
        app.router.add_get("/vip", self.get)
        return app

    def _check(self, request: web.Request, body: bytes) -> str | None:
        """Why the request is refused, or None."""
        stamp, given = request.headers.get(TIMESTAMP, ""), request.headers.get(SIGNATURE, "")
        try:
            age = abs(time.time() - int(stamp))
        except ValueError:
            return "no timestamp"
        if age > MAX_SKEW:
            return f"timestamp {stamp} is {age:.0f} s off"
        wanted = sign(self.secret, stamp, request.headers.get(NONCE, ""), request.method,
                      request.raw_path, body)  # the target as sent, undecoded
        if not hmac.compare_digest(given, wanted):
            return "bad signature"
        now = time.time()
        self.seen = {s: t for s, t in self.seen.items() if now - t <= 2 * MAX_SKEW}
        if given in self.seen:
            return "replayed request"
        self.seen[given] = now
        return None

    def _refuse(self, status: int, why: str) -> web.Response:
        self.refused.append(why)
        return web.json_response({"error": why}, status=status)

    async def post(self, request: web.Request) -> web.Response:
        body = await request.read()
        if (why := self._check(request, body)) is not None:
            return self._refuse(401, why)
        try:
            doc = json.loads(body)
            cluster, vip, node = str(doc["cluster"]), str(doc["vip"]), str(doc["node"])
            term, action = int(doc["term"]), str(doc["action"])
        except (ValueError, KeyError, TypeError):
            return self._refuse(400, "expected {cluster, vip, node, term, action}")
        if action not in ("acquire", "release"):
            return self._refuse(400, f"unknown action {action!r}")
        held = self.state.get((cluster, vip))
        if held is not None and term < held.term:
            return self._refuse(409, f"stale term {term}: {held.node} holds {vip} with term "
                                     f"{held.term}")
        if action == "acquire":
            if held is not None and held.node == node and held.term == term:
                return web.json_response({"node": node, "term": term, "changed": False})
            new = Holding(node, term)
        else:
            if held is None or held.node != node or held.term != term:
                return web.json_response({"node": held and held.node, "term": held and
                                          held.term, "changed": False})
            new = Holding(None, term)
        if self.apply is not None:
            await self.apply(vip, node, term, action)
        self.state[(cluster, vip)] = new
        self.applied.append((cluster, vip, node, term, action))
        return web.json_response({"node": new.node, "term": term, "changed": True})

    async def get(self, request: web.Request) -> web.Response:
        if (why := self._check(request, b"")) is not None:
            return self._refuse(401, why)
        held = self.state.get((request.query.get("cluster", ""), request.query.get("vip", "")))
        return web.json_response({"node": held.node if held else None,
                                  "term": held.term if held else None})


def _program(path: str) -> Apply:
    async def run(vip: str, node: str, term: int, action: str) -> None:
        proc = await asyncio.create_subprocess_exec(path, vip, node, str(term), action)
        if await proc.wait() != 0:
            raise web.HTTPBadGateway(text=f"{path} failed with exit {proc.returncode}")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m vipd.movers.webhook_receiver")
    ap.add_argument("--listen", default="127.0.0.1:8443")
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--apply", help="program run as PROGRAM VIP NODE TERM ACTION")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    ctx = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
    receiver = Receiver(load_secret(args.secret_file),
                        _program(args.apply) if args.apply else None)
    web.run_app(receiver.app(), host=host.strip("[]"), port=int(port), ssl_context=ctx)


if __name__ == "__main__":
    main()
