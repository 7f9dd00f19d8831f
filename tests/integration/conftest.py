"""Fixtures for integration tests on the real kernel, in network namespaces.

Fixtures
--------
``lab`` (function scope): a fresh `support.netns.Lab` per test: a switch namespace with a
bridge and three hosts ``lab.node1``, ``lab.node2``, ``lab.client`` (each a
`support.netns.Host` with ``eth0``, 198.51.100.n/24, 2001:db8:1::n/64, MAC 02:76:64:00:00:0n).
Sysctls are set explicitly (a new namespace copies the host's) (rp_filter, arp_ignore, arp_announce,
arp_accept = 0; IPv6 DAD, RA and RS off; bridge-nf-call-* = 0 in the switch). It is
destroyed after the test, pass or fail: processes inside are SIGKILLed, namespaces
deleted. ``netns_prefix`` (session scope) is the unique name prefix
(``vt<pid><hex>-``); at session end any namespace still carrying it is swept away.

``pair`` (function scope): a `vipd.demo.pairlab.PairLab` built in ``tmp_path / "pair"``: the
same kind of lab with a vipd config, key, health file and log per node (node1 priority
150, node2 priority 100), not yet started. Options of ``PairLab.create`` come from the
marker ``@pytest.mark.pair(preempt=True, preempt_delay=1.0, ipv6=..., extra=...,
arbiter="witness", fence="kernel", api=True)`` (default: no marker, no preemption, no
arbiter; with ``arbiter="witness"`` the lab has a fourth host ``witness`` running
`vipd witness`, started by ``start_pair``). Destroyed after the test, pass or fail (daemons,
responders and the probe SIGKILLed, namespaces deleted); a namespace of it still there
afterwards fails the test.

Running code in a namespace
---------------------------
* ``lab.node1.run_async(coro_fn, *args)``: ``asyncio.run`` in a thread that setns-ed
  into node1. Use it to drive the real `NetlinkMover` (netlink and packet sockets it
  opens, and its ``asyncio.to_thread`` workers, all live in node1). Exceptions and
  return values come back to the test. ``lab.node1.run(fn, *args)`` does the same
  for a plain function.
* ``lab.node1.exec(*argv)``, ``lab.node1.python(code, prefix=[...])``,
  ``lab.node1.spawn(*argv)``: subprocesses under ``ip netns exec``; ``spawn`` is for
  daemons and is killed at teardown.
* ``lab.node1.addresses()`` / ``address(local)`` / ``neighbour(ip)``: the kernel's
  view from ``ip -j``, an oracle independent of pyroute2.

Skip or fail: when namespaces cannot be created (not root, no ``ip`` command, no
permission) the tests using these fixtures are skipped, except under ``CI=true``, where
they fail with the reason. Mark such tests ``@pytest.mark.netns``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.netns import Lab, sweep, unavailable_reason
from vipd.demo.lab import new_prefix
from vipd.demo.pairlab import PairLab

_lab_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pair(preempt=False, preempt_delay=0.0, ipv6=True, extra='', "
        "arbiter='none', fence=None, api=False): options for PairLab.create in the `pair` "
        "fixture")


@pytest.fixture(scope="session")
def netns_prefix() -> Iterator[str]:
    prefix = new_prefix()
    reason = unavailable_reason(f"{prefix}probe")
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so the network-namespace tests must run "
                        f"here instead of being skipped", pytrace=False)
        pytest.skip(reason)
    yield prefix
    leftovers = sweep(prefix)
    if leftovers:
        pytest.fail(f"namespaces left behind and deleted at session end: {leftovers}",
                    pytrace=False)


@pytest.fixture
def lab(netns_prefix: str) -> Iterator[Lab]:
    built = Lab.create(f"{netns_prefix}{next(_lab_numbers)}-")
    try:
        yield built
    finally:
        built.destroy()


@pytest.fixture
def pair(netns_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
         ) -> Iterator[PairLab]:
    marker = request.node.get_closest_marker("pair")
    options = dict(marker.kwargs) if marker is not None else {}
    built = PairLab.create(tmp_path / "pair", **options)
    try:
        yield built
    finally:
        built.destroy()
        # PairLab names its namespaces with its own prefix, which the session sweep of
        # `netns_prefix` would not see: check (and clean) them here.
        leftovers = sweep(built.lab.prefix)
        if leftovers:
            pytest.fail(f"pair namespaces left behind and deleted: {leftovers}",
                        pytrace=False)
