"""vipd.demo.pairlab's client probe, the instrument the failover and control tests measure
outages with (see conftest.py for the `lab` fixture).

The probe's contract (vipd/demo/pairlab.py `_probe`): a request counts as answered if its
reply comes within 50 ms. Against a responder that answers every request after 20 ms,
every request is answered, so the recorded outage must be 0.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from support.netns import Lab
from vipd.demo.pairlab import ECHO_PORT, outage

pytestmark = pytest.mark.netns

DELAY = 0.020  # s: well inside the probe's 50 ms answer window

# A UDP echo on node1's own address that answers each request DELAY s after it came in.
RESPONDER = f"""
import heapq, select, socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.1", {ECHO_PORT}))
due = []
while True:
    now = time.monotonic()
    while due and due[0][0] <= now:
        _, _, data, addr = heapq.heappop(due)
        s.sendto(data[:8] + b"node1", addr)
    wait = max(0.0, due[0][0] - now) if due else None
    if select.select([s], [], [], wait)[0]:
        data, addr = s.recvfrom(64)
        heapq.heappush(due, (time.monotonic() + {DELAY}, id(data), data, addr))
"""


def test_probe_records_replies_that_arrive_after_sigterm_within_the_window(
        lab: Lab, tmp_path: Path) -> None:
    """After SIGTERM the probe keeps reading for 60 ms, so the requests of the last
    DELAY before it are recorded with their replies (within 50 ms), not as unanswered;
    otherwise `outage` would report an infinite outage (a trailing unanswered request),
    as a switchover measurement with a fast (~1 ms) responder once did."""
    lab.node1.spawn(sys.executable, "-c", RESPONDER)
    time.sleep(0.5)
    out = tmp_path / "probe.jsonl"
    probe = lab.client.spawn(sys.executable, "-m", "vipd.demo.pairlab", "probe",
                             "198.51.100.1", "0.005", str(out))
    ready = Path(f"{out}.ready")  # the probe's first request is out (its import is slow
    deadline = time.monotonic() + 15  # on a loaded machine)
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)
    probe.send_signal(signal.SIGTERM)
    assert probe.wait(5) == 0
    samples = [(r[0], r[1]) for r in map(json.loads, out.read_text().splitlines())]
    assert len(samples) > 100, len(samples)
    warm = [who for _, who in samples[:20]]
    assert all(who == "node1" for who in warm[5:]), warm  # the responder does answer
    unanswered = [i for i, (_, who) in enumerate(samples) if who is None]
    assert unanswered == [], (f"{len(unanswered)} of {len(samples)} requests recorded "
                              f"unanswered, at positions {unanswered}")
    assert outage(samples, samples[0][0]) == (0.0, "node1")
