"""vipd's /metrics as a real Prometheus sees it, on the real kernel (namespaces, see
conftest.py).

Each daemon serves /metrics on its own lab address (198.51.100.N:9441). A scrape fetched
from the client namespace must pass `promtool check metrics`. A real Prometheus server
runs INSIDE the client namespace (web UI and API on that namespace's 127.0.0.1:9090, so
nothing listens outside the lab), scrapes both daemons every second under job "vipd"
with the label cluster="lab", and loads configs/prometheus/vipd-alerts.yml (a missing
rules file fails the tests; it never makes them skip a check). Its HTTP API is queried
from a thread that entered the client namespace.

Checked: both targets up, node1 ACTIVE, the rules loaded; after node1 is SIGKILLed
Prometheus sees node2 ACTIVE; the split-brain alert never fired and its expression never
held for more than one scrape interval. A second test runs the same failover and checks
that no alert of the rules file fires at all. The Prometheus process and its storage
directory are removed at teardown, and the test verifies it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.pairlab_checks import logs
from vipd.demo.pairlab import PairLab

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "configs" / "prometheus" / "vipd-alerts.yml"
METRICS_PORT = 9441
PROM = "http://127.0.0.1:9090"  # inside the client namespace
NODE1, NODE2 = f"198.51.100.1:{METRICS_PORT}", f"198.51.100.2:{METRICS_PORT}"
TARGETS = {"node1": NODE1, "node2": NODE2}
SEEN = 20.0  # s: Prometheus must see a change within this (1 s scrapes)
# The expression of VipdSplitBrain, evaluated directly as well as through the alert.
SPLIT_BRAIN = 'sum by (cluster) (vipd_state{job="vipd", state="ACTIVE"}) > 1'


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "") -> Any:
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{detail()}")
        time.sleep(0.1)


def get(pair: PairLab, url: str, timeout: float = 2.0) -> bytes | None:
    """GET from inside the client namespace; None on a connection error."""
    def fetch() -> bytes | None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body: bytes = resp.read()
                return body
        except OSError:
            return None
    return pair.lab["client"].run(fetch, timeout=timeout + 10.0)


def sample(text: str, name: str, labels: str = "") -> float | None:
    """The value of `name{labels}` in an exposition (labels exactly as rendered)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None


class Prometheus:
    """A Prometheus server in the client namespace; `stop()` kills it and removes its
    storage (the lab would kill it too, at destroy: it was started with `spawn`)."""

    def __init__(self, pair: PairLab) -> None:
        self.pair = pair
        self.dir = Path(tempfile.mkdtemp(prefix="vipd-prom-"))
        self.config = self.dir / "prometheus.yml"
        self.storage = self.dir / "data"
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[str] | None = None
        assert RULES.is_file(), f"{RULES} is missing: the alerts under test live there"
        config: dict[str, Any] = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "scrape_configs": [{
                "job_name": "vipd",
                "static_configs": [{"targets": [NODE1, NODE2], "labels": {"cluster": "lab"}}],
            }],
            "rule_files": [str(RULES)],
        }
        self.config.write_text(yaml.safe_dump(config))

    def start(self) -> None:
        check = subprocess.run(["promtool", "check", "config", str(self.config)],
                               capture_output=True, text=True, timeout=30, check=False)
        assert check.returncode == 0, f"promtool check config:\n{check.stdout}{check.stderr}"
        with self.log.open("w") as log:
            self.proc = self.pair.lab["client"].spawn(
                "prometheus", f"--config.file={self.config}",
                f"--storage.tsdb.path={self.storage}", f"--web.listen-address={PROM[7:]}",
                "--log.level=warn", stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                ns = self.pair.lab["client"].ns
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True, timeout=10, check=False).stdout.split()
                assert str(self.proc.pid) not in pids, f"prometheus still runs in {ns}"
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, 0)
                    raise AssertionError(f"prometheus pid {self.proc.pid} still exists")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        assert not self.dir.exists(), f"{self.dir} not removed"

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        url = f"{PROM}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body = get(self.pair, url, timeout=5.0)
        if body is None:
            return None
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; [] while Prometheus is not answering yet."""
        data = self.api("query", query=expr)
        if data is None:
            return []
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, None for an empty result."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(pair: PairLab) -> Iterator[Prometheus]:
    prom = Prometheus(pair)
    try:
        yield prom
    finally:
        prom.stop()


@dataclass
class Failover:
    """What `crash_failover` observed."""

    seen_after: float  # s from the SIGKILL of node1 to Prometheus seeing node2 ACTIVE
    detail: Callable[[], str]  # Prometheus output and both logs, for messages


def crash_failover(pair: PairLab, prometheus: Prometheus) -> Failover:
    """node1 ACTIVE and node2 STANDBY, both scraped (and linted) and up in Prometheus;
    then node1 is SIGKILLed and Prometheus sees node2 ACTIVE and node1 down, and keeps
    evaluating for 3 s more."""
    for name, node in pair.nodes.items():
        text = node.config.read_text()
        assert text.endswith("\n") and "metrics:" not in text, text
        node.config.write_text(text + f'metrics: {{listen: "{TARGETS[name]}"}}\n')
    pair.start("node1")
    assert pair.wait_single_holder(10.0) == "node1", logs(pair)
    pair.start("node2")
    prometheus.start()  # warms up while node2 settles

    def scrape(name: str) -> str | None:
        body = get(pair, f"http://{TARGETS[name]}/metrics")
        return None if body is None else body.decode()

    def settled() -> dict[str, str] | None:
        texts = {name: scrape(name) for name in pair.nodes}
        got = {n: t for n, t in texts.items() if t is not None}
        if len(got) != len(texts):
            return None
        ok = (sample(got["node1"], "vipd_state", 'state="ACTIVE"') == 1.0
              and sample(got["node2"], "vipd_state", 'state="STANDBY"') == 1.0
              and all(sample(t, "vipd_peer_reachable") == 1.0 for t in got.values()))
        return got if ok else None

    texts: dict[str, str] = wait_for(settled, 10.0, "node1 ACTIVE, node2 STANDBY on /metrics",
                                     lambda: logs(pair))
    for name, text in texts.items():
        lint = subprocess.run(["promtool", "check", "metrics"], input=text,
                              capture_output=True, text=True, timeout=30, check=False)
        assert lint.returncode == 0, (f"promtool check metrics on {name}: exit "
                                      f"{lint.returncode}\n{lint.stdout}{lint.stderr}")
        assert sample(text, "vipd_vip_held", 'vip="198.51.100.100/32"') == (
            1.0 if name == "node1" else 0.0), text

    def detail() -> str:
        return f"prometheus output:\n{prometheus.output()}\n{logs(pair)}"

    up = 'up{job="vipd", cluster="lab", instance="%s"}'
    wait_for(lambda: all(prometheus.value(up % t) == 1.0 for t in (NODE1, NODE2)), SEEN,
             "both targets up in Prometheus", detail)
    groups = prometheus.api("rules")["groups"]
    assert any(r.get("name") == "VipdSplitBrain" for g in groups for r in g["rules"]), (
        f"{RULES} not loaded: {groups}")
    active = 'vipd_state{job="vipd", cluster="lab", state="ACTIVE", instance="%s"}'
    assert prometheus.value(active % NODE1) == 1.0
    assert prometheus.value(active % NODE2) == 0.0

    killed_at = time.monotonic()
    pair.kill("node1")
    wait_for(lambda: prometheus.value(active % NODE2) == 1.0, SEEN,
             "Prometheus sees node2 ACTIVE", detail)
    seen_after = time.monotonic() - killed_at
    wait_for(lambda: prometheus.value(up % NODE1) == 0.0, SEEN,
             "Prometheus sees node1 down", detail)
    assert "node2" in pair.holders(), logs(pair)  # node1's copy lasts until its lease
    time.sleep(3.0)  # a few more evaluations after the move
    return Failover(seen_after, detail)


def test_prometheus_sees_a_crash_failover_without_split_brain(
        pair: PairLab, prometheus: Prometheus) -> None:
    run = crash_failover(pair, prometheus)
    # How many nodes Prometheus counted as ACTIVE, every second of the last minute: the
    # pair expression can see both for one scrape interval at most (scrape skew; the
    # rules' `for:` exists for this).
    counts = prometheus.query('max_over_time((sum by (cluster) (vipd_state{job="vipd", '
                              'state="ACTIVE"}))[1m:1s])')
    double = prometheus.query(f"count_over_time(({SPLIT_BRAIN})[1m:1s])")
    double_s = float(double[0]["value"][1]) if double else 0.0
    print(f"\nPrometheus saw node2 ACTIVE {run.seen_after:.1f} s after the kill; max "
          f"ACTIVE count over 1m: {[c['value'][1] for c in counts]}; seconds with 2 "
          f"ACTIVE: {double_s:g}")
    fired = prometheus.query('max_over_time(ALERTS{alertname="VipdSplitBrain", '
                             'alertstate="firing"}[1m])')
    assert fired == [], f"VipdSplitBrain fired: {fired}\n{run.detail()}"
    pending = prometheus.query('count_over_time(ALERTS{alertname="VipdSplitBrain", '
                               'alertstate="pending"}[1m])')
    evaluations = float(pending[0]["value"][1]) if pending else 0.0
    assert evaluations <= 2, (f"VipdSplitBrain pending for {evaluations:g} "
                              f"evaluations\n{run.detail()}")
    # The expression itself: at most one scrape interval (1 s) of double ACTIVE, from
    # scrape skew.
    assert double_s <= 2, f"{SPLIT_BRAIN} held for {double_s:g} s\n{run.detail()}"


def test_no_alert_fires_for_a_healthy_pair_and_a_crash_failover(
        pair: PairLab, prometheus: Prometheus) -> None:
    """Within well under a minute nothing has a reason to fire: the `for:` of VipdDown,
    VipdPeerHeartbeatsLost and VipdNoStandby has not passed, no reload, hook or VIP
    operation failed, and one takeover is not flapping."""
    run = crash_failover(pair, prometheus)
    firing = prometheus.query('max_over_time(ALERTS{alertstate="firing"}[1m])')
    assert firing == [], "alerts fired:\n" + "\n".join(
        json.dumps(f["metric"], sort_keys=True) for f in firing) + "\n" + run.detail()
