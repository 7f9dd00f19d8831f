"""configs/prometheus and configs/grafana: the rules pass promtool's check and unit tests,
the dashboard loads, and every metric, state and reason they name is one vipd exports.

promtool comes from Debian's prometheus package. Without it the promtool tests skip,
except in CI (CI=true), which installs it and must not pass by skipping.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vipd.core.events import REASON_CODES
from vipd.core.protocol import Reject, State
from vipd.core.witness import Witness
from vipd.metrics import StatusCollector, build_metrics, build_witness_metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "configs" / "prometheus" / "vipd-alerts.yml"
RULE_TESTS = ROOT / "configs" / "prometheus" / "vipd-alerts.test.yml"
DASHBOARD = ROOT / "configs" / "grafana" / "vipd.json"
DOCS = ROOT / "docs" / "metrics.md"

NAME = re.compile(r"\bvipd_[a-z0-9_]*[a-z0-9]")
SELECTOR = re.compile(r"\b(vipd_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"""(\w+)\s*(=~|!~|!=|=)\s*["'`]([^"'`]*)["'`]""")
# Grafana's variables, replaced by something promtool parses.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "6h",
                "$cluster": "web", "${datasource}": "prometheus"}


# --- what vipd exports ---------------------------------------------------------------------

def _exported() -> tuple[set[str], set[str]]:
    """(series names as scraped, names as documented: series plus histogram base names)."""
    series: set[str] = set()
    documented: set[str] = set()
    witness_registry, _ = build_witness_metrics(Witness("w", 1), lambda: 0.0)
    families = [*build_metrics().registry.collect(), *witness_registry.collect()]
    for family in families:
        name = family.name
        if family.type == "counter":
            series |= {f"{name}_total", f"{name}_created"}
            documented.add(f"{name}_total")
        elif family.type == "histogram":
            series |= {f"{name}{s}" for s in ("_bucket", "_count", "_sum", "_created")}
            documented.add(name)
        elif family.type == "info":
            series.add(f"{name}_info")
            documented.add(f"{name}_info")
        else:
            series.add(name)
            documented.add(name)
    # The scrape-time gauges exist only with a running daemon: take their names from the
    # collector's source (GaugeMetricFamily("vipd_...") and the (name, value, help) table).
    gauges = set(re.findall(r'"(vipd_[a-z0-9_]+)"', inspect.getsource(StatusCollector)))
    assert {"vipd_state", "vipd_healthy", "vipd_peer_reachable"} <= gauges
    series |= gauges
    documented |= gauges
    return series, documented | series


SERIES, DOCUMENTED = _exported()


# --- what the configs use ------------------------------------------------------------------

def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    with DASHBOARD.open() as f:
        dashboard: dict[str, Any] = json.load(f)
    return dashboard


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def _rule_queries() -> list[str]:
    """Rule expressions and the PromQL inside annotation templates (`query` calls)."""
    queries = [rule["expr"] for rule in _rules()]
    for rule in _rules():
        for text in rule.get("annotations", {}).values():
            queries += re.findall(r"`([^`]*\b\w+\{[^`]*)`", text)
    return queries


def _substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


# --- promtool ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is not installed; CI must install it "
                        "(Debian/Ubuntu: apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    return path


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    output = f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}"
    print(output)
    assert proc.returncode == 0, output


def test_promtool_check_rules(promtool: str) -> None:
    _run(promtool, "check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_unit_tests(promtool: str) -> None:
    _run(promtool, "test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """promtool parses every dashboard query (as a recording rule)."""
    queries = [_substitute(q) for q in _dashboard_queries(_dashboard())
               if not q.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    _run(promtool, "check", "rules", str(path))


# --- the rules and their tests ---------------------------------------------------------------

def test_every_alert_is_complete() -> None:
    alerts = _alerts()
    assert len({a["alert"] for a in alerts}) >= 12
    for alert in alerts:
        name = alert["alert"]
        assert "for" in alert, f"{name}: no for:"
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        annotations = alert["annotations"]
        assert {"summary", "description"} <= set(annotations), name
        # each names where it happened
        assert "$labels.cluster" in annotations["summary"], name
        assert "$labels.cluster" in annotations["description"], name


def test_every_alert_has_a_firing_and_a_silent_test() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["evaluation_interval"] == "15s"
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        assert case["interval"] == "15s", case["name"]
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fires.add(check["alertname"])
                for exp in check["exp_alerts"]:
                    assert exp.get("exp_annotations"), (case["name"], check["alertname"])
            else:
                silent.add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), "alerts never seen firing"
    assert names - silent == set(), "alerts never seen silent"
    assert (fires | silent) - names == set(), "tests of alerts that do not exist"


def test_docs_list_every_alert_and_metric() -> None:
    docs = DOCS.read_text()
    for alert in {a["alert"] for a in _alerts()}:
        assert alert in docs, f"docs/metrics.md does not mention {alert}"
    documented = set(NAME.findall(docs))
    wanted = {n for n in DOCUMENTED if not n.endswith("_created")
              and not re.search(r"_(bucket|count|sum)$", n)}
    assert {n for n in wanted if n.startswith("vipd_")} - documented == set(), \
        "metrics missing from docs/metrics.md"
    # The standard process_* series are named in the text, not matched by NAME.
    missing = {n for n in wanted if not n.startswith("vipd_") and f"`{n}`" not in docs}
    assert missing == set(), "process metrics missing from docs/metrics.md"


# --- names, states and reasons exist ---------------------------------------------------------

def test_queries_use_only_exported_series() -> None:
    for source, queries in (("rules", _rule_queries()),
                            ("dashboard", _dashboard_queries(_dashboard()))):
        used = {name for q in queries for name in NAME.findall(q)}
        assert used, source
        assert used - SERIES == set(), f"{source} queries series vipd does not export"


def test_texts_name_only_exported_metrics() -> None:
    for path in (RULES, DASHBOARD, DOCS):
        unknown = set(NAME.findall(path.read_text())) - DOCUMENTED
        assert unknown == set(), f"{path.relative_to(ROOT)} names unknown metrics"


def test_label_values_exist() -> None:
    states = {s.name for s in State}
    allowed = {
        ("vipd_heartbeats_rejected_total", "reason"): {r.value for r in Reject},
        ("vipd_transitions_total", "reason"): set(REASON_CODES),
    }
    checked = 0
    for query in _rule_queries() + _dashboard_queries(_dashboard()):
        for metric, matchers in SELECTOR.findall(query):
            for label, _op, value in MATCHER.findall(matchers):
                if label in ("state", "from_state", "to_state"):
                    values = states
                elif (metric, label) in allowed:
                    values = allowed[metric, label]
                else:
                    continue
                checked += 1
                for v in value.split("|"):
                    assert v in values, f"{metric}{{{label}={value!r}}} in {query!r}"
    assert checked > 10


# --- the dashboard ---------------------------------------------------------------------------

def test_dashboard_loads_with_variables_and_datasources() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["cluster"]["type"] == "query"
    assert variables["cluster"]["datasource"]["uid"] == "${datasource}"
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    kinds = {p["type"] for p in panels}
    assert {"state-timeline", "timeseries", "stat"} <= kinds
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel.get("datasource", {}).get("uid") == "${datasource}", title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target.get("datasource", {}).get("uid") == "${datasource}", title
            assert 'cluster="$cluster"' in target["expr"], title
    state = [p for p in panels if p["type"] == "state-timeline" and p["title"] == "Node state"]
    assert state and "vipd_state" in state[0]["targets"][0]["expr"]
