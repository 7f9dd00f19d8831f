"""Waits and assertions on a started `vipd.demo.pairlab.PairLab`: who holds a VIP (the
kernel's view), the daemons' logs in every failure message, and the usual start.

Shared by the integration tests that run a PairLab.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from simulations.arpwatch import ArpWatch, Observations
from vipd.demo.pairlab import VIP4, VIP6, PairLab

LEASE_GONE = 8.0  # s: vip_lease is 3 s; a dead or frozen node's copy is gone well within this


def logs(pair: PairLab) -> str:
    """Both daemons' logs, for assertion messages."""
    return "\n".join(f"--- {name} log ---\n" + "\n".join(pair.log_lines(name))
                     for name in pair.nodes)


def status_section(pair: PairLab, node: str, key: str) -> dict[str, Any]:
    """One section of a node's status document (``arbiter``, ``group``, ``keys``)."""
    section: dict[str, Any] = pair.status(node)[key]
    return section


def expect(pair: PairLab, predicate: Callable[[], Any], timeout: float, what: str) -> None:
    if not pair.wait_for(predicate, timeout):
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; holders "
                             f"v4={pair.holders(VIP4)} v6={pair.holders(VIP6)}\n{logs(pair)}")


def expect_only(pair: PairLab, node: str, timeout: float = LEASE_GONE,
                vip: str = VIP4) -> None:
    """The VIP ends up on exactly one node, `node` (rule 9 of the failover contract)."""
    expect(pair, lambda: pair.holders(vip) == [node], timeout,
           f"{vip} on exactly one node, {node}")


def stays(pair: PairLab, holders: list[str], seconds: float, vip: str = VIP4) -> None:
    """For `seconds`, every poll sees exactly `holders` holding `vip`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen = pair.holders(vip)
        assert seen == holders, f"{vip} held by {seen}, expected {holders}\n{logs(pair)}"
        time.sleep(0.05)


def transitions(lines: list[str]) -> list[str]:
    return [line for line in lines if " -> " in line and ", term " in line]


def start_pair(pair: PairLab, settle: float = 0.5) -> None:
    """node1 first, then node2 once node1 holds the VIP: a known starting point for the
    fault scenarios. Returns `settle` s after node2's health check passed, with node1
    the only holder and node2 STANDBY since its start. `settle` must exceed the dead
    interval (320 ms): by then node2 has heard node1 and left its hold-down. A lab with a
    witness starts it first."""
    if pair.witness_config is not None:
        pair.start_witness()
    pair.start("node1")
    expect_only(pair, "node1", timeout=10.0)
    pair.start("node2")
    expect(pair, lambda: any("check service: unknown -> up" in line
                             for line in pair.log_lines("node2")),
           10.0, "node2's health check to pass")
    time.sleep(settle)
    assert pair.holders() == ["node1"], logs(pair)
    node2 = pair.log_lines("node2")
    assert transitions(node2) == [line for line in node2 if "INIT -> STANDBY" in line], \
        logs(pair)


@contextlib.contextmanager
def oracle(pair: PairLab) -> Iterator[list[Observations]]:
    """The ARP oracle (simulations.arpwatch) over the block; its observations land in the
    yielded list when the block ends."""
    watch = ArpWatch.start(pair, VIP4)
    seen: list[Observations] = []
    try:
        yield seen
        seen.append(watch.stop())
    finally:
        watch.close()


def two_mac_rounds(obs: Observations, start: float, end: float) -> list[tuple[float, set[str]]]:
    """The ARP probe rounds within [start, end] answered by two or more MACs."""
    return [(t, seen) for t, _, seen in obs.rounds(start, end) if len(seen) >= 2]
