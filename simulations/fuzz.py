"""Fuzzing as a benchmark: `python -m simulations.fuzz --seconds N [--json]`.

Runs every datagram target of simulations/fuzztargets.py under atheris (libFuzzer,
coverage-guided, seeded from the captured corpus in tests/fuzz/corpus) and the control
API under schemathesis (simulations/fuzzapi.py), each for its share of N seconds, and
reports per target: inputs tried, crashes, coverage (libFuzzer's ``cov`` edges and
``ft`` features, corpus size), and for the API requests, operations, status codes seen
and unexpected 5xx. Exit status 1 when anything crashed.

Each atheris target runs in its own process (``--atheris NAME -- LIBFUZZER_ARGS``):
libFuzzer owns that process and exits it, and the vipd modules must be imported inside
`atheris.instrument_imports`, so this module imports no vipd code at the top. New inputs
go to a temporary corpus folder, crashes to a findings folder (``--findings``), never
into the committed seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ATHERIS_TARGETS = ("heartbeat", "heartbeat-raw", "witness", "witness-raw", "witness-client",
                   "witness-client-raw")
API_SHARE = 0.25  # of --seconds, for schemathesis; the rest split among the atheris targets
_COVERAGE = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_DONE = re.compile(r"Done (\d+) (?:runs )?in")


@dataclass
class AtherisResult:
    target: str
    inputs: int
    crashes: int
    cov: int
    ft: int
    corpus: int
    seconds: float
    exit_code: int
    crash_files: list[str] = field(default_factory=list)
    output_tail: str = ""  # the end of libFuzzer's output, when something went wrong


def run_atheris(target: str, *, seconds: float | None = None, runs: int | None = None,
                findings: Path | None = None, timeout: float | None = None) -> AtherisResult:
    """One target in a child process, for ``seconds`` or ``runs`` inputs (at least one
    bound is needed); crash inputs are written to ``findings``."""
    if seconds is None and runs is None:
        raise ValueError("run_atheris needs seconds or runs")
    from simulations.fuzztargets import seed_folders  # the parent needs no instrumentation

    with tempfile.TemporaryDirectory(prefix=f"vipd-fuzz-{target}-") as tmp:
        work = Path(tmp)
        crashes = findings or work / "findings"
        crashes.mkdir(parents=True, exist_ok=True)
        (work / "corpus").mkdir()
        libfuzzer = ["-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048",
                     "-max_len=1024", f"-artifact_prefix={crashes}/{target}-"]
        if seconds is not None:
            libfuzzer.append(f"-max_total_time={max(round(seconds), 1)}")
        if runs is not None:
            libfuzzer.append(f"-atheris_runs={runs}")
        argv = [sys.executable, "-m", "simulations.fuzz", "--atheris", target, "--",
                *libfuzzer, str(work / "corpus"), *map(str, seed_folders(target))]
        before = set(crashes.iterdir())
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout or (seconds or 60) * 3 + 60,
                              cwd=Path(__file__).resolve().parent.parent)
        elapsed = time.monotonic() - started
        found = sorted(str(p) for p in set(crashes.iterdir()) - before)
    output = proc.stdout + proc.stderr
    coverage = _COVERAGE.findall(output)
    cov, ft, corp = map(int, coverage[-1]) if coverage else (0, 0, 0)
    executed = _EXECUTED.findall(output) or _DONE.findall(output)
    inputs = int(executed[-1]) if executed else 0
    ok = proc.returncode == 0 and not found
    return AtherisResult(target, inputs, 0 if ok else max(len(found), 1), cov, ft, corp,
                         round(elapsed, 1), proc.returncode, found,
                         "" if ok else output[-4000:])


def _atheris_child(target: str, libfuzzer_args: list[str]) -> None:
    """Instrument vipd, then hand this process to libFuzzer (which exits it)."""
    import atheris

    with atheris.instrument_imports(include=["vipd"]):
        from simulations import fuzztargets
    one_input = fuzztargets.target(target)
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def run_all(seconds: float, findings: Path | None) -> dict[str, Any]:
    from simulations.fuzzapi import run_api  # imports vipd: only in the parent

    share = seconds * (1 - API_SHARE) / len(ATHERIS_TARGETS)
    results = [run_atheris(t, seconds=share, findings=findings) for t in ATHERIS_TARGETS]
    api = run_api(seconds=seconds * API_SHARE)
    return {"seconds": seconds, "atheris": [asdict(r) for r in results], "api": asdict(api),
            "decoder_inputs": sum(r.inputs for r in results),
            "crashes": sum(r.crashes for r in results) + api.failures}


def table(report: dict[str, Any]) -> str:
    lines = ["| target | inputs | crashes | cov (edges) | ft (features) | corpus | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in report["atheris"]:
        lines.append(f"| {r['target']} | {r['inputs']} | {r['crashes']} | {r['cov']} | "
                     f"{r['ft']} | {r['corpus']} | {r['seconds']} |")
    api = report["api"]
    codes = ", ".join(f"{code}: {n}" for code, n in sorted(api["status_codes"].items()))
    lines += ["", "| API (schemathesis) | requests | operations | failures | unexpected 5xx "
                  "| status codes | seconds |", "|---|---|---|---|---|---|---|",
              f"| {api['label']} | {api['requests']} | {api['operations']} | "
              f"{api['failures']} | {api['server_errors']} | {codes} | {api['seconds']} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fuzz the datagram parsers and the API")
    parser.add_argument("--seconds", type=float, default=60.0, help="total time budget")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--findings", type=Path, default=None,
                        help="keep crash inputs here (default: dropped with a temp folder)")
    parser.add_argument("--atheris", metavar="TARGET", choices=ATHERIS_TARGETS,
                        help=argparse.SUPPRESS)  # the child process of run_atheris
    args, rest = parser.parse_known_args(argv)
    if args.atheris:
        _atheris_child(args.atheris, [a for a in rest if a != "--"])
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    report = run_all(args.seconds, args.findings)
    print(json.dumps(report, indent=1) if args.json else table(report))
    for r in report["atheris"]:
        if r["crashes"]:
            print(f"\n{r['target']}: crash (exit {r['exit_code']}) {r['crash_files']}\n"
                  f"{r['output_tail']}", file=sys.stderr)
    for failure in report["api"]["failure_details"]:
        print(f"\napi: {failure}", file=sys.stderr)
    return 1 if report["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
