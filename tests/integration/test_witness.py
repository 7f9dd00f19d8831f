"""The real `vipd witness --config FILE` process on 127.0.0.1: vote requests over UDP
from node-side Sessions, /metrics and /healthz over HTTP (aiohttp), SIGHUP reload, SIGTERM
stop. No namespaces needed: all traffic is on loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from simulations.bench_witness import REPO, Voter, WitnessProcess
from vipd.core.protocol import Flag, Heartbeat, KeyRing, Kind, Verdict

LEASE_MS = 2000
WEB = {"web": ["vm-a", "vm-b"]}


@pytest.fixture
def witness(tmp_path: Path) -> Iterator[WitnessProcess]:
    process = WitnessProcess(tmp_path, WEB)
    with process:
        yield process


class Node:
    """A node-side Session with its own UDP socket."""

    def __init__(self, witness: WitnessProcess, cluster: str, node: str) -> None:
        self.voter = Voter(cluster, node, witness.keys[cluster])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.connect(witness.address)

    def ask(self, lease_ms: int = LEASE_MS, resign: bool = False,
            wall_offset: float = 0.0, probe: bool = False) -> Heartbeat:
        sent = time.monotonic()
        self.sock.send(self.voter.request(sent, lease_ms, resign, wall_offset, probe))
        self.sock.settimeout(2.0)
        data = self.sock.recv(2048)
        received = self.voter.open(data, time.monotonic())
        assert received.heartbeat.kind is Kind.VOTE_REPLY
        assert received.echo_sent_at == sent  # the reply answers this very request
        return received.heartbeat

    def unanswered(self, data: bytes) -> bool:
        """Send raw bytes; True if no reply comes within 0.3 s."""
        self.sock.send(data)
        self.sock.settimeout(0.3)
        try:
            self.sock.recv(2048)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


def verdict(reply: Heartbeat) -> Verdict:
    assert reply.vote is not None
    return reply.vote.verdict


async def _get(url: str) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
        body = await response.json() if response.content_type == "application/json" \
            else None
        return response.status, text, body


def scrape(witness: WitnessProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text, _ = asyncio.run(_get(f"{witness.url}/metrics"))
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def healthz(witness: WitnessProcess) -> dict[str, Any]:
    status, _, body = asyncio.run(_get(f"{witness.url}/healthz"))
    assert status == 200 and isinstance(body, dict)
    return body


def wait_for(condition: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout:g}s"
        time.sleep(0.02)


def test_the_witness_votes_counts_reloads_and_stops(witness: WitnessProcess) -> None:
    a, b = Node(witness, "web", "vm-a"), Node(witness, "web", "vm-b")
    try:
        # Started less than a minute ago: a 60 s lease cannot be granted yet.
        restarting = a.ask(lease_ms=60_000)
        assert verdict(restarting) is Verdict.RESTARTING and restarting.vote is not None
        assert 50_000 < restarting.vote.wait_ms <= 60_000
        wait_for(lambda: healthz(witness)["uptime_seconds"] > LEASE_MS / 1000 + 0.05,
                 what="the start-up block of one lease")
        # This request echoes the RESTARTING reply, older than the lease: a node that has
        # not heard the witness for a lease is answered STALE, and granted once its next
        # request echoes that fresh reply (docs/protocol.md).
        assert verdict(a.ask()) is Verdict.STALE
        granted = a.ask()
        assert verdict(granted) is Verdict.GRANTED and Flag.VOTE in granted.flags
        held = b.ask()
        assert verdict(held) is Verdict.HELD and held.vote is not None
        assert 0 < held.vote.wait_ms <= LEASE_MS
        assert verdict(b.ask(probe=True)) is Verdict.HELD  # a standby's probe

        # Refused without a reply, counted by reason.
        assert b.unanswered(
            Voter("mail", "vm-a", witness.keys["web"]).request(time.monotonic(), LEASE_MS))
        forged = Voter("web", "vm-b", KeyRing({1: bytes(32)}))
        assert b.unanswered(forged.request(time.monotonic(), LEASE_MS))
        assert b.unanswered(b"not a vote request")

        samples = scrape(witness)
        assert samples[("vipd_witness_requests_total",
                        (("cluster", "web"), ("verdict", "granted")))] == 1
        assert samples[("vipd_witness_requests_total",
                        (("cluster", "web"), ("verdict", "held")))] == 2
        assert samples[("vipd_witness_requests_total",
                        (("cluster", "web"), ("verdict", "restarting")))] == 1
        rejected = {dict(labels)["reason"]: value for (name, labels), value in samples.items()
                    if name == "vipd_witness_rejected_total"}
        assert {r: v for r, v in rejected.items() if v} == {
            "unknown_cluster": 1, "bad_mac": 1, "malformed": 1}
        assert samples[("vipd_witness_vote_holder", (("cluster", "web"), ("node", "vm-a")))] \
            == 1
        assert samples[("vipd_witness_vote_holder", (("cluster", "web"), ("node", "vm-b")))] \
            == 0
        assert 0 <= samples[("vipd_witness_last_request_age_seconds",
                             (("cluster", "web"), ("node", "vm-b")))] < 5
        assert samples[("vipd_witness_clusters", ())] == 1
        assert samples[("vipd_witness_up", ())] == 1
        assert healthz(witness)["holders"] == {"web": "vm-a"}

        # SIGHUP: a new cluster; web keeps its ballot.
        witness.write_config({**WEB, "db": ["db-1", "db-2"]})
        reloaded_at = time.monotonic()
        witness.signal(signal.SIGHUP)
        wait_for(lambda: healthz(witness)["clusters"] == 2, what="the reload")
        assert verdict(b.ask()) is Verdict.HELD
        db = Node(witness, "db", "db-1")
        fresh = db.ask(lease_ms=60_000)  # counts from the reload, not from the start
        assert verdict(fresh) is Verdict.RESTARTING and fresh.vote is not None
        assert fresh.vote.wait_ms > 60_000 - (time.monotonic() - reloaded_at) * 1000 - 50
        db.close()
        assert healthz(witness)["holders"] == {"db": None, "web": "vm-a"}
        assert scrape(witness)[("vipd_witness_config_reloads_total",
                                (("result", "ok"),))] == 1

        # A give-back frees the vote at once; a probe finds it free and leaves it so.
        assert verdict(a.ask(resign=True)) is Verdict.RELEASED
        assert verdict(b.ask(probe=True)) is Verdict.RELEASED
        assert healthz(witness)["holders"]["web"] is None
        assert verdict(b.ask()) is Verdict.GRANTED
    finally:
        a.close()
        b.close()
    assert witness.stop(timeout=3) == 0
    log = witness.stderr()
    assert "Traceback" not in log
    assert "witness started: 1 cluster (web)" in log
    assert "cluster web: vote granted to vm-a" in log
    assert "cluster web: vm-a gave its vote back" in log
    assert "cluster web: vote granted to vm-b (was vm-a, released" in log
    assert "config reloaded: 2 clusters (added: db; removed: none)" in log
    assert log.rstrip().endswith("stopped")


def test_a_node_whose_clock_is_5s_off_gets_the_vote_after_one_round(
        witness: WitnessProcess) -> None:
    a = Node(witness, "web", "vm-a")
    try:
        wait_for(lambda: healthz(witness)["uptime_seconds"] > LEASE_MS / 1000 + 0.05,
                 what="the start-up block of one lease")
        assert verdict(a.ask(wall_offset=5.0)) is Verdict.STALE
        assert verdict(a.ask(wall_offset=5.0)) is Verdict.GRANTED
    finally:
        a.close()


def test_a_bad_config_is_refused_with_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "witness.yaml"
    config.write_text("name: witness\nlisten: 127.0.0.1:99999\nclusters: {}\nbogus: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "vipd.cli", "witness", "--config", str(config)],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert f"{config}: listen: port must be 1..65535, got '127.0.0.1:99999'" in lines
    assert any(line.startswith(f"{config}: clusters: expected at least one cluster")
               for line in lines)
    assert f"{config}: bogus: unknown key; expected one of: name, listen, max_clock_skew, " \
           f"metrics, clusters" in lines
    assert "Traceback" not in out.stderr
