"""The control plane of a real vipd pair: `vipctl` against the daemons' control API, on
the real kernel (network namespaces, see conftest.py and test_failover.py).

Each node's API listens on 127.0.0.1:9440 inside its own namespace, so `vipctl` runs
under ``ip netns exec`` there, exactly as an operator would run it on the node. A tokens
file holds an operate token (alice) and a read token (bob); each node writes its own
audit file (``audit-node1.jsonl``, ``audit-node2.jsonl`` in the pair's workdir), so the
lines of a request are counted on the node that answered it.

Checked: planned switchover (with the client-visible outage, which must be far below a
crash failover's), maintenance on/off and its survival across a daemon restart, promote,
refusals (409 from a STANDBY, 403 for a read token, 401 for an unknown one, 409 for a
stale --expected-term), the vipctl exit codes for each, and one audit line per request.
A switchover is make-before-break: it may cost clients HANDOVER_OUTAGE at most, far below
the lab's dead interval (320 ms) that a crash costs; a stall of the taking node, which
it logs, adds its length and a dead interval (as in test_failover.py). The waits for
things to happen at all are much longer and separate. Measured numbers are printed (run
with ``-s``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.pairlab_checks import expect, logs
from vipd.config import load_config
from vipd.demo.pairlab import VIP4, VIP6, PairLab, outage
from vipd.tokens import new_token
from vipd.vipctl import EXIT_AUTH, EXIT_OK, EXIT_REFUSED

pytestmark = [
    pytest.mark.netns,
    # Same known vipd.demo.pairlab leak as in test_failover.py: PairLab.start never closes
    # its handle on the node's log file. Only that exact warning is ignored.
    pytest.mark.filterwarnings(
        r"ignore:unclosed file <_io.TextIOWrapper name='[^']*/node[12]\.log' mode='a'"
        ":ResourceWarning"),
]

# s: what a planned switchover may cost clients (the peer holds the VIPs before we
# release them), as the probe sees it: it counts a reply it reads over 50 ms late as
# lost, so its own starvation shows here too. Measured at load 2-11 on 2 cores: 0-101 ms;
# waiting out the dead interval instead would cost about 320 ms.
HANDOVER_OUTAGE = 0.15
MOVE = 5.0  # s: how long to wait for a move to show in the kernel at all
STALLED = re.compile(r"this node stalled for (\d+) ms")
API = "http://127.0.0.1:9440"


@dataclass
class Ctl:
    """A started pair (node1 ACTIVE, node2 STANDBY) with tokens and per-node audit files."""

    pair: PairLab
    alice: str  # operate
    bob: str  # read

    def audit_path(self, node: str) -> Path:
        return self.pair.workdir / f"audit-{node}.jsonl"

    def audit(self, node: str) -> list[dict[str, Any]]:
        path = self.audit_path(node)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def vipctl(self, node: str, *args: str, token: str | None = None,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`python -m vipd.vipctl ARGS` inside `node`'s namespace (its own loopback)."""
        env = {**os.environ, "VIPCTL_TOKEN": self.alice if token is None else token}
        env.pop("VIPCTL_API", None)
        return subprocess.run(
            ["ip", "netns", "exec", self.pair.lab[node].ns, sys.executable, "-m",
             "vipd.vipctl", *args],
            env=env, capture_output=True, text=True, timeout=timeout, check=False)

    def status(self, node: str) -> dict[str, Any]:
        """`vipctl status --json` on `node` (must succeed)."""
        done = self.vipctl(node, "status", "--json")
        assert done.returncode == EXIT_OK, describe(done, self.pair)
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def api_status(self, node: str) -> dict[str, Any] | None:
        """GET /v1/status straight from a thread inside `node`'s namespace: a fast poll
        for waiting (a vipctl process costs ~0.5 s). None while the API is not up."""
        def get() -> dict[str, Any] | None:
            req = urllib.request.Request(f"{API}/v1/status",
                                         headers={"Authorization": f"Bearer {self.bob}"})
            try:
                with urllib.request.urlopen(req, timeout=2.0) as resp:
                    data: dict[str, Any] = json.loads(resp.read())
                    return data
            except OSError:
                return None
        return self.pair.lab[node].run(get, timeout=10.0)


# --- helpers ---------------------------------------------------------------------------

def describe(done: subprocess.CompletedProcess[str], pair: PairLab) -> str:
    return (f"vipctl {' '.join(done.args[7:])} exited {done.returncode}\n"
            f"stdout: {done.stdout}\nstderr: {done.stderr}\n{logs(pair)}")


def stall_allowance(pair: PairLab, node: str, mark: int) -> float:
    """The extra time, in s, that `node` may take to become ACTIVE because it stalled
    (starved on a loaded machine) since log line `mark`: each logged stall, plus the dead
    interval it then listens to the peer before judging it (election.STALL_INTERVALS)."""
    dead = load_config(pair.nodes[node].config).heartbeat.dead_interval
    extra = 0.0
    for line in pair.log_lines(node)[mark:]:
        if "-> ACTIVE" in line:
            break
        if match := STALLED.search(line):
            extra += int(match.group(1)) / 1000 + dead
    return extra


def expect_only(pair: PairLab, node: str, timeout: float = MOVE) -> None:
    """Both VIPs end up on exactly one node, `node`."""
    for vip in (VIP4, VIP6):
        def only(vip: str = vip) -> bool:
            return pair.holders(vip) == [node]
        expect(pair, only, timeout, f"{vip} on exactly one node, {node}")


def stays(pair: PairLab, node: str, seconds: float) -> None:
    """For `seconds`, every poll sees both VIPs on `node` and only there."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen = (pair.holders(VIP4), pair.holders(VIP6))
        assert seen == ([node], [node]), f"VIPs held by {seen}, expected {node}\n{logs(pair)}"
        time.sleep(0.05)


def settled(ctl: Ctl, active: str, standby: str) -> Callable[[], bool]:
    """`active` is ACTIVE and hears a healthy, reachable STANDBY `standby` that hears it
    (the daemon's precondition for a switchover without --force)."""
    def check() -> bool:
        s = ctl.api_status(active)
        t = ctl.api_status(standby)
        if s is None or t is None:
            return False
        peer = s.get("peer") or {}
        return (s["state"] == "ACTIVE" and s["handover"] is None and t["state"] == "STANDBY"
                and bool(t["healthy"]) and peer.get("state") == "STANDBY"
                and bool(peer.get("healthy")) and bool(peer.get("reachable"))
                and bool(peer.get("hears_us")))
    return check


def new_lines(before: list[dict[str, Any]], after: list[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    assert after[:len(before)] == before, "audit lines were rewritten, not appended"
    return after[len(before):]


def check_line(line: dict[str, Any], *, token: str | None, action: str, result: str,
               status: int) -> None:
    got = {k: line.get(k) for k in ("token", "action", "result", "status", "source")}
    assert got == {"token": token, "action": action, "result": result, "status": status,
                   "source": "127.0.0.1"}, line


# --- fixture ---------------------------------------------------------------------------

@pytest.fixture
def ctl(pair: PairLab) -> Ctl:
    """The conftest `pair`, with a tokens file (0600) and one audit file per node, started
    node1 first: node1 ACTIVE with both VIPs, node2 a settled STANDBY."""
    alice, alice_line = new_token("alice", "operate")
    bob, bob_line = new_token("bob", "read")
    tokens = pair.workdir / "tokens"
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{alice_line}\n{bob_line}\n")
    ctl = Ctl(pair, alice, bob)
    for name, node in pair.nodes.items():
        text = node.config.read_text()
        assert text.endswith("\n") and "api:" not in text and "audit:" not in text, text
        node.config.write_text(text + f"api: {{tokens_file: {tokens}}}\n"
                                      f"audit: {{file: {ctl.audit_path(name)}}}\n")
    pair.start("node1")
    expect_only(pair, "node1", timeout=10.0)
    pair.start("node2")
    expect(pair, settled(ctl, "node1", "node2"), 10.0, "node1 ACTIVE with node2 STANDBY")
    assert ctl.audit("node1") == [] and ctl.audit("node2") == []
    return ctl


# --- 1: switchover ---------------------------------------------------------------------

def test_switchover_moves_vips_with_tiny_outage_and_is_audited(ctl: Ctl) -> None:
    pair = ctl.pair
    pair.start_probe()
    time.sleep(0.5)  # the client resolves the VIP and gets answers from node1
    before = ctl.audit("node1")
    mark = len(pair.log_lines("node2"))
    at = time.time()
    t0 = time.monotonic()
    done = ctl.vipctl("node1", "switchover", "--wait")
    took = time.monotonic() - t0
    assert done.returncode == EXIT_OK, describe(done, pair)
    assert "done: VIPs on node2" in done.stdout, describe(done, pair)
    expect_only(pair, "node2")
    time.sleep(0.3)
    samples = pair.stop_probe()
    gap, last = outage(samples, at)
    after = [who for sent, who in samples if sent >= at]
    stalls = stall_allowance(pair, "node2", mark)
    bound = HANDOVER_OUTAGE + stalls
    extra = f", {1000 * stalls:.0f} of them for stalls" if stalls else ""
    print(f"\nswitchover: vipctl --wait returned after {1000 * took:.0f} ms "
          f"(process start included), client outage {1000 * gap:.1f} ms "
          f"(bound {1000 * bound:.0f} ms{extra}); "
          f"{len(after)} requests since the command: {after.count('node1')} answered by "
          f"node1, {after.count('node2')} by node2, {after.count(None)} unanswered")
    assert any(who == "node1" for sent, who in samples if sent < at), "probe never warm"
    assert last == "node2"
    assert gap <= bound, f"switchover cost clients {gap} s\n{logs(pair)}"
    stays(pair, "node2", 0.5)

    lines = new_lines(before, ctl.audit("node1"))
    assert len(lines) == 1, lines
    check_line(lines[0], token="alice", action="switchover", result="accepted", status=200)
    assert lines[0]["role"] == "operate", lines[0]
    assert ctl.audit("node2") == []  # the request went to node1 only
    text = ctl.audit_path("node1").read_text()
    assert ctl.alice not in text and ctl.bob not in text  # never a token in the audit
    assert ctl.audit_path("node1").stat().st_mode & 0o077 == 0


# --- 2: maintenance --------------------------------------------------------------------

def test_maintenance_drains_survives_restart_and_returns_to_standby(ctl: Ctl) -> None:
    pair = ctl.pair
    done = ctl.vipctl("node1", "maintenance", "on")
    assert done.returncode == EXIT_OK, describe(done, pair)
    expect_only(pair, "node2")
    expect(pair, lambda: (ctl.api_status("node1") or {}).get("state") == "MAINTENANCE",
           5.0, "node1 in MAINTENANCE")
    s = ctl.status("node1")
    assert s["state"] == "MAINTENANCE" and s["maintenance"] is True, s
    assert ctl.status("node2")["state"] == "ACTIVE"
    assert len(ctl.audit("node1")) == 1

    # A crash and restart of node1's daemon: the state file keeps it drained.
    state = json.loads((pair.workdir / "state-node1" / "state.json").read_text())
    assert state.get("maintenance") is True, state
    mark = len(pair.log_lines("node1"))
    pair.kill("node1", with_service=False)
    pair.start("node1")
    expect(pair, lambda: ctl.api_status("node1") is not None, 10.0, "node1's API again")
    s = ctl.status("node1")
    assert s["state"] == "MAINTENANCE" and s["maintenance"] is True, s
    stays(pair, "node2", 1.0)
    assert ctl.status("node1")["state"] == "MAINTENANCE"
    restarted = pair.log_lines("node1")[mark:]
    assert any("INIT -> MAINTENANCE" in line for line in restarted), logs(pair)
    assert not any("-> ACTIVE" in line or "-> STANDBY" in line for line in restarted), \
        logs(pair)

    # Maintenance off: back to STANDBY; preempt is off, so the VIPs stay on node2.
    done = ctl.vipctl("node1", "maintenance", "off")
    assert done.returncode == EXIT_OK, describe(done, pair)
    expect(pair, lambda: (ctl.api_status("node1") or {}).get("state") == "STANDBY",
           5.0, "node1 back in STANDBY")
    stays(pair, "node2", 1.0)
    s = ctl.status("node1")
    assert s["state"] == "STANDBY" and s["maintenance"] is False, s
    state = json.loads((pair.workdir / "state-node1" / "state.json").read_text())
    assert state.get("maintenance") is False, state

    lines = ctl.audit("node1")
    assert len(lines) == 2, lines  # one per request; the status reads write none
    check_line(lines[0], token="alice", action="maintenance", result="accepted", status=200)
    check_line(lines[1], token="alice", action="maintenance", result="accepted", status=200)
    assert lines[0]["params"]["enabled"] is True and lines[1]["params"]["enabled"] is False
    assert ctl.audit("node2") == []


# --- 3: promote, and a switchover on a standby -----------------------------------------

def test_promote_on_standby_then_switchover_on_standby_is_refused(ctl: Ctl) -> None:
    pair = ctl.pair
    done = ctl.vipctl("node2", "promote", "--wait")
    assert done.returncode == EXIT_OK, describe(done, pair)
    assert "done: VIPs on node2" in done.stdout, describe(done, pair)
    expect_only(pair, "node2")
    lines = ctl.audit("node2")
    assert len(lines) == 1, lines
    check_line(lines[0], token="alice", action="promote", result="accepted", status=200)
    expect(pair, settled(ctl, "node2", "node1"), 5.0, "node2 ACTIVE with node1 STANDBY")

    before = ctl.audit("node1")
    done = ctl.vipctl("node1", "switchover")
    assert done.returncode == EXIT_REFUSED, describe(done, pair)
    assert "409" in done.stderr and "STANDBY" in done.stderr, describe(done, pair)
    stays(pair, "node2", 1.0)
    lines = new_lines(before, ctl.audit("node1"))
    assert len(lines) == 1, lines
    check_line(lines[0], token="alice", action="switchover", result="refused", status=409)
    assert len(ctl.audit("node2")) == 1


# --- 4: a read token cannot move anything ----------------------------------------------

def test_read_token_is_forbidden_to_switch_over(ctl: Ctl) -> None:
    pair = ctl.pair
    done = ctl.vipctl("node1", "switchover", token=ctl.bob)
    assert done.returncode == EXIT_AUTH, describe(done, pair)
    assert "403" in done.stderr, describe(done, pair)
    stays(pair, "node1", 1.0)
    lines = ctl.audit("node1")
    assert len(lines) == 1, lines
    check_line(lines[0], token="bob", action="switchover", result="refused", status=403)
    assert lines[0]["role"] == "read", lines[0]

    # bob may read; an unknown token may not even do that, and a move with it is audited.
    assert ctl.vipctl("node1", "status", "--json", token=ctl.bob).returncode == EXIT_OK
    done = ctl.vipctl("node1", "switchover", token="vipd_not-a-real-token")
    assert done.returncode == EXIT_AUTH and "401" in done.stderr, describe(done, pair)
    stays(pair, "node1", 0.5)
    lines = ctl.audit("node1")
    assert len(lines) == 2, lines
    check_line(lines[1], token=None, action="switchover", result="refused", status=401)
    assert "vipd_not-a-real-token" not in ctl.audit_path("node1").read_text()
    assert ctl.audit("node2") == []


# --- 5: --expected-term ----------------------------------------------------------------

def test_stale_expected_term_is_refused(ctl: Ctl) -> None:
    pair = ctl.pair
    old = ctl.status("node1")["pair_term"]
    done = ctl.vipctl("node1", "switchover", "--wait")
    assert done.returncode == EXIT_OK, describe(done, pair)
    expect_only(pair, "node2")
    expect(pair, settled(ctl, "node2", "node1"), 5.0, "node2 ACTIVE with node1 STANDBY")
    current = ctl.status("node2")["pair_term"]
    assert current > old, (old, current)

    done = ctl.vipctl("node2", "switchover", "--expected-term", str(old))
    assert done.returncode == EXIT_REFUSED, describe(done, pair)
    assert "409" in done.stderr and "term" in done.stderr, describe(done, pair)
    assert str(old) in done.stderr and str(current) in done.stderr, describe(done, pair)
    stays(pair, "node2", 1.0)
    lines = ctl.audit("node2")
    assert len(lines) == 1, lines
    check_line(lines[0], token="alice", action="switchover", result="refused", status=409)
    assert lines[0]["params"]["expected_term"] == old, lines[0]

    # The current term is accepted: the refusal above was about the term alone.
    done = ctl.vipctl("node2", "switchover", "--expected-term", str(current), "--wait")
    assert done.returncode == EXIT_OK, describe(done, pair)
    expect_only(pair, "node1")
    lines = ctl.audit("node2")
    assert len(lines) == 2, lines
    check_line(lines[1], token="alice", action="switchover", result="accepted", status=200)


# --- 6: the status table ---------------------------------------------------------------

def test_status_table_shows_both_nodes_and_states(ctl: Ctl) -> None:
    pair = ctl.pair
    done = ctl.vipctl("node1", "status")
    assert done.returncode == EXIT_OK, describe(done, pair)
    out = done.stdout
    assert "node1 (this node)" in out and "node2 (peer)" in out, out
    state = [line.split() for line in out.splitlines() if line.split()[:1] == ["state"]]
    assert state == [["state", "ACTIVE", "STANDBY"]], out
    assert "cluster lab" in out, out
    here = [line for line in out.splitlines() if "VIPs on eth0 here:" in line]
    assert len(here) == 1 and VIP4 in here[0] and VIP6 in here[0], out

    done = ctl.vipctl("node2", "status", token=ctl.bob)
    assert done.returncode == EXIT_OK, describe(done, pair)
    out = done.stdout
    assert "node2 (this node)" in out and "node1 (peer)" in out, out
    state = [line.split() for line in out.splitlines() if line.split()[:1] == ["state"]]
    assert state == [["state", "STANDBY", "ACTIVE"]], out
    assert "VIPs on eth0 here: none" in out, out
    assert ctl.audit("node1") == [] and ctl.audit("node2") == []  # reads are not audited
