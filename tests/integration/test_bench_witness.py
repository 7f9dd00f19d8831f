"""simulations/bench_witness.py, run short and small: its report is complete and sane."""

from __future__ import annotations

from pathlib import Path

from simulations.bench_witness import run_bench, table


def test_a_short_witness_benchmark_reports_sane_numbers(tmp_path: Path) -> None:
    report = run_bench(pairs=3, seconds=2.0, lease_ms=300, root=tmp_path)
    assert report["pairs"] == 3 and 1.9 <= report["seconds"] <= 2.5
    # 3 holders every 40 ms, 3 standbys every 400 ms: about 82 requests a second
    assert 70 <= report["requests_per_s"] <= 90, report
    assert report["answered_share"] >= 0.99, report
    assert report["verdicts"]["granted"] > 0 and report["verdicts"]["held"] > 0, report
    assert set(report["verdicts"]) <= {"granted", "held"}, report
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] < 100, report
    assert report["witness_cpu_percent"] > 0 and report["generator_cpu_percent"] > 0, report
    assert 10 < report["witness_rss_mb"] <= report["witness_peak_rss_mb"] < 500, report
    assert report["witness_refused"] == 0 and report["replies_refused_by_nodes"] == 0
    assert report["witness_exit_code"] == 0 and not report["witness_traceback"]
    assert "| answered |" in table(report)
