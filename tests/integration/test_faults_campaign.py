"""simulations/faults.py run short: one trial of two cheap faults gives sane figures, and
the campaign leaves no namespace, process or work directory behind, also when
interrupted with Ctrl-C in the middle of a fault."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vipd.demo.lab import list_namespaces

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (the campaign's work dir is in
    every daemon's, responder's and oracle's arguments or config path)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        if text in argv:
            found.append(f"{pid}: {argv}")
    return found


def _campaign(*args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "simulations.faults", *args], cwd=ROOT,
                            stdout=stdout, stderr=subprocess.PIPE, text=True)


def test_one_trial_of_two_faults_reports_sane_figures_and_cleans_up(
        netns_prefix: str) -> None:
    proc = _campaign("--trials", "1", "--faults", "vip-deleted,duplicate", "--seed", "3",
                     "--json")
    out, err = proc.communicate(timeout=100)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["arbiter"] == "none" and report["git_start"]["commit"], report
    assert len(report["prefixes"]) == 2 and report["namespaces_left"] == []
    assert not [ns for ns in list_namespaces() if ns.startswith(tuple(report["prefixes"]))]
    assert not Path(report["workdir"]).exists()
    assert _processes_mentioning(report["workdir"]) == []

    deleted = report["faults"]["vip-deleted"]["trials"][0]
    assert deleted["error"] == "", err
    # netlink saw node1 lose the VIP (whatever the daemon does, the deletion is an event)
    # and node1 alone hold it at the end
    assert any(ms >= 0 and held == [] for ms, held in deleted["holders"]), deleted
    assert deleted["final_holders"] == ["node1"] and deleted["single_holder_ms"] is not None
    assert deleted["tracebacks"] == []

    dup = report["faults"]["duplicate"]["trials"][0]
    assert dup["error"] == "", err
    # the forwarder carried both directions and sent copies, and the daemons saw them
    assert dup["forwarder"]["read"]["node1"] > 50 and dup["forwarder"]["read"]["node2"] > 50
    assert dup["forwarder"]["copies"] > 10 and dup["forwarder"]["send_errors"] == 0
    assert dup["rejected"]["node2"].get("duplicate", 0) > 0, dup
    assert dup["answered_by"] == ["node1"] and 5000 < dup["fault_ms"] < 30000, dup
    summary = report["faults"]["duplicate"]["summary"]
    assert summary["n"] == 1 and summary["failed"] == 0


def test_ctrl_c_in_the_middle_of_a_fault_removes_everything(netns_prefix: str) -> None:
    proc = _campaign("--trials", "1", "--faults", "partition-10s", "--seed", "4",
                     stdout=subprocess.DEVNULL)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    prefix = workdir = ""
    deadline = time.monotonic() + 60
    try:
        # the lab is up once the log names it; the fault runs once node1's daemon is
        # active and the oracle started (the partition holds for 10 s from then on)
        while time.monotonic() < deadline and not (prefix and workdir):
            for line in list(lines):
                if "work dir " in line:
                    workdir = line.rsplit("work dir ", 1)[1].strip()
                if ": lab " in line:
                    prefix = line.rsplit(": lab ", 1)[1].strip()
            time.sleep(0.05)
        assert prefix and workdir, "".join(lines)
        node1_log = Path(workdir) / "partition-10s" / "node1.log"
        while time.monotonic() < deadline and not any(
                p.name.startswith("arpwatch-") for p in node1_log.parent.glob("*")):
            time.sleep(0.05)
        assert any(ns.startswith(prefix) for ns in list_namespaces()), "".join(lines)
        time.sleep(1.5)  # inside the partition
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    if proc.stderr is not None:
        proc.stderr.close()
    assert "interrupted" in "".join(lines)
    assert not [ns for ns in list_namespaces() if ns.startswith(prefix)]
    assert not Path(workdir).exists()
    assert _processes_mentioning(workdir) == []
