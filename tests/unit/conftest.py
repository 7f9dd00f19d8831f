"""Shared fixtures of the unit tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from support.daemons import Pair


@pytest_asyncio.fixture
async def pair(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Pair]:
    """Two daemons over loopback (support.daemons.Pair): a (priority 150) and b (100), not
    started; closed after the test. test_systemd overrides it with notify sockets."""
    caplog.set_level(logging.INFO)
    p = Pair(tmp_path)
    try:
        yield p
    finally:
        await p.close()
