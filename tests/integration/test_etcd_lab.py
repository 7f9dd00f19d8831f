"""A 3-member etcd cluster in the namespace lab (one member per host) and a client on a
fourth host: what a group node sees when etcd's leader is cut off at the switch rather
than killed (no RST: the client's connection to it just goes quiet)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.etcd import require_etcd
from support.netns import Lab
from vipd.demo.etcdserver import EtcdCluster

pytestmark = pytest.mark.netns

MEMBERS = ("etcd1", "etcd2", "etcd3")
CLIENT_PORT, PEER_PORT = 2379, 2380
_numbers = itertools.count(1)


@pytest.fixture
def etcd_lab(netns_prefix: str, tmp_path: Path) -> Iterator[tuple[Lab, EtcdCluster]]:
    require_etcd()
    lab = Lab.create(f"{netns_prefix}e{next(_numbers)}-", (*MEMBERS, "client"))
    try:
        cluster = EtcdCluster.start(
            tmp_path, [str(lab[m].ipv4.ip) for m in MEMBERS],
            ports=[(CLIENT_PORT, PEER_PORT)] * 3, spawns=[lab[m].spawn for m in MEMBERS],
            run_at_clients=lambda check: lab["client"].run(check))
        try:
            yield lab, cluster
        finally:
            cluster.stop()
    finally:
        lab.destroy()


# The client runs in a process of its own inside the client namespace: gRPC's threads
# stay in the namespace they were started in, so a gRPC client in this process would
# carry the lab's namespace into later tests.
RIDE_OUT = """
import asyncio, json, sys, time
from support.etcd import unanswered_for
from vipd.arbiter.etcd import EtcdStore

async def main(endpoints):
    probe = EtcdStore(endpoints, "/vipd", "lab", "probe", timeout=2.0)
    try:
        leader = await probe.leader()
    finally:
        await probe.close()
    first = dict(zip(("etcd1", "etcd2", "etcd3"), endpoints))[leader]
    # the leader first: gRPC connects to it, and must leave it when it goes quiet
    store = EtcdStore(sorted(endpoints, key=lambda e: e != first), "/vipd", "lab", "a",
                      timeout=0.25)
    try:
        lease, _ = await store.grant(1)
        won, holder = await store.claim(lease)
        assert won and holder is not None
        await store.keep_alive(lease)
        last_ok = time.monotonic()
        print(leader, flush=True)
        sys.stdin.readline()  # the test has cut the leader off
        gap, failed = await unanswered_for(store, lease, last_ok, time.monotonic(), 8.0)
    finally:
        await store.close()
    # the key, not the time: a patient store that asks the members still reachable
    check = EtcdStore(sorted(endpoints, key=lambda e: e == first), "/vipd", "lab", "a",
                      timeout=2.0)
    try:
        still, seen = await check.claim(lease)
    finally:
        await check.close()
    print(json.dumps({"gap": gap, "failed": failed, "kept": not still and seen == holder}))

asyncio.run(main([tuple(e) for e in json.loads(sys.argv[1])]))
"""


def test_a_client_rides_out_an_isolated_etcd_leader(
        etcd_lab: tuple[Lab, EtcdCluster]) -> None:
    """Keep a lease alive at a holder's pace (TTL 1 s: every 250 ms, calls time out after
    250 ms), cut etcd's leader off from everyone, and measure from the last answered
    keep-alive before the cut to the next answered one; the holder key must survive."""
    lab, cluster = etcd_lab
    env_path = os.pathsep.join(os.path.abspath(p or os.curdir) for p in sys.path)
    client = lab["client"].spawn(
        "env", f"PYTHONPATH={env_path}", sys.executable, "-c", RIDE_OUT,
        json.dumps(cluster.endpoints), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    assert client.stdout is not None and client.stdin is not None
    leader = client.stdout.readline().strip()
    assert leader in MEMBERS, (leader, client.stderr.read() if client.stderr else "")
    for other in (*MEMBERS, "client"):
        if other != leader:
            lab.block(leader, other)
    client.stdin.write("cut\n")
    client.stdin.flush()
    out, err = client.communicate(timeout=60)
    lab.heal()
    assert client.returncode == 0, err
    result = json.loads(out)
    assert result["kept"], "the holder key did not survive the leader's isolation"
    # The followers elect a new leader after an election timeout (500 ms) plus a random
    # part; measured 0.54-1.05 s, which can exceed the 0.994 s a holder counts a 1 s
    # lease (docs/election.md, "Groups on etcd"). Generous here, to catch a client that
    # stays stuck on the isolated member (it did, before EtcdStore moved on).
    assert result["gap"] < 4.0, f"keep-alives failed for {result['gap']:.2f} s ({result})"
