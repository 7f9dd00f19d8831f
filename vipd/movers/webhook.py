"""The `webhook` mover: tell a receiver of yours who holds each VIP (GCP alias IPs or
routes, Azure NIC IP configurations, Hetzner floating IPs, an IPAM), over HTTPS.

Every request carries ``X-Vipd-Timestamp`` (Unix seconds), ``X-Vipd-Nonce`` (random) and
``X-Vipd-Signature: sha256=HEX``, the HMAC-SHA256 with the shared secret over
``TIMESTAMP\\nNONCE\\nMETHOD\\nPATH?QUERY\\nBODY``; the receiver refuses a timestamp
more than 5 minutes off and a signature it has seen (a replay) with 401.
Acquire and release are ``POST URL`` with the JSON body ``{cluster, vip, node, term,
action}``; the receiver applies each at most once per (vip, term, action) and refuses a
term below the one it holds (409): the older holder yields. ``verify_url``, if set, is
read with ``GET verify_url?cluster=C&vip=V`` and answers ``{"node": ..., "term": ...}``.
Timeouts and 5xx are retried (by the runner, with backoff and jitter); other 4xx are not.

`vipd.movers.webhook_receiver` is a reference receiver (the tests run it); docs/cloud.md
shows how to run a provider's CLI from it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from vipd.errors import ConfigError
from vipd.keys import read_private_file
from vipd.movers.remote import MoverError, Ownership

SIGNATURE = "X-Vipd-Signature"
TIMESTAMP = "X-Vipd-Timestamp"
NONCE = "X-Vipd-Nonce"


def sign(secret: bytes, timestamp: str, nonce: str, method: str, path_qs: str,
         body: bytes) -> str:
    message = b"\n".join([timestamp.encode(), nonce.encode(), method.encode(),
                          path_qs.encode(), body])
    return "sha256=" + hmac.new(secret, message, hashlib.sha256).hexdigest()


def load_secret(path: str | Path) -> bytes:
    """The shared secret: a file only vipd may read (else ConfigError, naming it);
    surrounding white space ignored."""
    secret = read_private_file(path, "webhook secret file").strip()
    if len(secret) < 16:
        raise ConfigError(str(path), [("", "the webhook secret is shorter than 16 "
                                           "characters; make one with: openssl rand -hex 32")])
    return secret.encode()


class WebhookMover:
    name = "webhook"

    def __init__(self, *, url: str, verify_url: str | None, secret: bytes, cluster: str,
                 node: str, vips: list[str]) -> None:
        self.url, self.verify_url, self._secret = url, verify_url, secret
        self.cluster, self.node, self.vips = cluster, node, vips
        self._session: aiohttp.ClientSession | None = None
        self._confirmed: int | None = None  # the term the receiver last accepted

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _request(self, operation: str, method: str, url: str,
                       body: bytes = b"") -> dict[str, object]:
        target = URL(url, encoded=True)  # sent as written: what is signed is what goes
        path_qs = target.raw_path_qs
        timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
        headers = {TIMESTAMP: timestamp, NONCE: nonce,
                   SIGNATURE: sign(self._secret, timestamp, nonce, method, path_qs, body)}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(method, target, data=body or None,
                                              headers=headers) as response:
                text = await response.text()
                if response.status >= 300:
                    raise MoverError(
                        f"webhook: {operation}: {method} {url} answered {response.status}: "
                        f"{text[:200]}", operation=operation, code=f"http_{response.status}",
                        retry=response.status >= 500, superseded=response.status == 409
                        and operation == "acquire")
        except aiohttp.ClientError as exc:
            raise MoverError(f"webhook: {operation}: {method} {url}: {exc}",
                             operation=operation, code="connection", retry=True) from exc
        try:
            doc = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise MoverError(f"webhook: {operation}: {url} answered something not JSON: "
                             f"{text[:100]!r}", operation=operation, code="bad_answer",
                             retry=False) from exc
        return doc if isinstance(doc, dict) else {}

    async def _post(self, operation: str, term: int) -> None:
        for vip in self.vips:
            body = json.dumps({"cluster": self.cluster, "vip": vip, "node": self.node,
                               "term": term, "action": operation}, sort_keys=True).encode()
            await self._request(operation, "POST", self.url, body)

    async def acquire(self, term: int) -> None:
        await self._post("acquire", term)
        self._confirmed = term

    async def release(self, term: int) -> None:
        await self._post("release", term)
        self._confirmed = None

    async def verify(self) -> Ownership:
        if self.verify_url is None:  # nothing to read back: what the receiver accepted
            return Ownership(self.node if self._confirmed is not None else None,
                             self._confirmed, "no verify_url: the last accepted request")
        seen = set()
        for vip in self.vips:
            query = urlencode({"cluster": self.cluster, "vip": vip})
            doc = await self._request("verify", "GET", f"{self.verify_url}?{query}")
            node, term = doc.get("node"), doc.get("term")
            seen.add((node if isinstance(node, str) else None,
                      term if isinstance(term, int) else None))
        if len(seen) == 1:
            node, term = seen.pop()
            return Ownership(node, term)
        return Ownership(None, None, f"the VIPs disagree: {sorted(seen, key=str)}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
