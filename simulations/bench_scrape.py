"""What a Prometheus scrape costs the daemon, and whether it delays heartbeats.

    python -m simulations.bench_scrape [--seconds 10] [--rate 20]

A pair in the namespace lab (no health checks). node1's /metrics is fetched from inside
its own namespace (127.0.0.1:9441) first never (quiet), then `--rate` times a second. The
daemon observes itself: `vipd_metrics_scrape_duration_seconds` is its own time per scrape
(gauges and rendering), `vipd_timer_lateness_seconds` how late its election timer fired,
which is how late heartbeats went out. Both are read as histogram deltas per phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vipd.demo.pairlab import PairLab

URL = "http://127.0.0.1:9441/metrics"


def scrape() -> tuple[float, str]:
    started = time.perf_counter()
    with urllib.request.urlopen(URL, timeout=5) as response:
        body = response.read().decode()
    return time.perf_counter() - started, body


def histogram(body: str, name: str) -> dict[str, float]:
    """{'le=...': cumulative count, 'sum': ..., 'count': ...} of one unlabelled histogram."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out[s.labels["le"]] = s.value
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
            elif s.name.endswith("_count"):
                out["count"] = s.value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def quantile_bound(d: dict[str, float], q: float) -> str:
    """The smallest bucket bound holding at least q of the observations."""
    total = d.get("count", 0.0)
    if not total:
        return "-"
    bounds = sorted((float(k), v) for k, v in d.items() if k not in ("sum", "count"))
    for bound, cumulative in bounds:
        if cumulative >= q * total:
            return "+Inf" if bound == float("inf") else f"<= {bound * 1000:g} ms"
    return "+Inf"


def phase(node: Any, seconds: float, rate: float) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        _, before = scrape()
        latencies = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if rate > 0:
                latencies.append(scrape()[0])
                time.sleep(max(0.0, 1 / rate - latencies[-1]))
            else:
                time.sleep(0.1)
        _, after = scrape()
        scrapes = delta(histogram(after, "vipd_metrics_scrape_duration_seconds"),
                        histogram(before, "vipd_metrics_scrape_duration_seconds"))
        late = delta(histogram(after, "vipd_timer_lateness_seconds"),
                     histogram(before, "vipd_timer_lateness_seconds"))
        latencies.sort()
        return {
            "scrapes": len(latencies),
            "client_latency_ms_median": round(latencies[len(latencies) // 2] * 1000, 2)
            if latencies else None,
            # the last scrape of the phase is counted too: it is served like the others
            "daemon_ms_per_scrape": round(1000 * scrapes["sum"] / scrapes["count"], 3)
            if scrapes.get("count") else None,
            "daemon_ms_p99_bucket": quantile_bound(scrapes, 0.99),
            "timer_fires": int(late.get("count", 0)),
            "timer_lateness_mean_ms": round(1000 * late["sum"] / late["count"], 3)
            if late.get("count") else None,
            "timer_lateness_p99_bucket": quantile_bound(late, 0.99),
        }

    result: dict[str, Any] = node.run(run, timeout=seconds + 60)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.bench_scrape", description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=20.0, help="scrapes per second")
    args = ap.parse_args(argv)
    with PairLab.create(Path(tempfile.mkdtemp(prefix="vipd-scrape-")), checks=False) as pair:
        if pair.start_settled(responder=False) != "node1":
            print("the pair did not settle with node1 active", file=sys.stderr)
            return 1
        time.sleep(1.0)
        node = pair.lab["node1"]
        report = {"quiet": phase(node, args.seconds, 0.0),
                  "scraping": phase(node, args.seconds, args.rate),
                  "rate_per_s": args.rate, "seconds": args.seconds}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
