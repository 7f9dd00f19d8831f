"""Shared by the etcd tests: etcd must be installed (fail under CI, skip elsewhere), and
how long a holder's keep-alives go unanswered through an etcd fault."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from vipd.arbiter.etcd import EtcdError, EtcdStore
from vipd.demo.etcdserver import etcd_binary


def require_etcd() -> None:
    if etcd_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("etcd not found: scripts/test-deps installs etcd-server")
        pytest.skip("etcd not found (apt-get install etcd-server)")


async def unanswered_for(store: EtcdStore, lease: int, last_ok: float, since: float,
                         limit: float) -> tuple[float, int]:
    """Keep ``lease`` alive at a holder's pace (every 250 ms) from ``since`` (the fault)
    until one keep-alive sent after it is answered, at most ``limit`` s. Returns (from
    the last answered keep-alive before the fault, ``last_ok``, to that answer, the
    keep-alives that failed)."""
    failed = 0
    while time.monotonic() - since < limit:
        sent = time.monotonic()
        try:
            if await store.keep_alive(lease) > 0 and sent > since:
                break
            last_ok = sent
        except EtcdError:
            failed += 1
        await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - sent)))
    return time.monotonic() - last_ok, failed
