"""check-config on arbitrary YAML trees near the real schema (issue 15, part 3): a valid
pair or group config with random keys replaced, deleted or added, and random values of
every YAML type. vipd must answer 0 (valid) or 2 (every problem named), never a
traceback: an operator's typo must never crash the tool meant to catch it."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vipd.cli import main
from vipd.keys import generate_key_line

PAIR: dict[str, Any] = {
    "node": "vm-a", "cluster": "web", "interface": "eth0",
    "vips": ["198.51.100.10/32", "2001:db8::10/128"], "priority": 150, "preempt": True,
    "preempt_delay": "60s",
    "heartbeat": {"bind": "198.51.100.101:5405", "peers": ["198.51.100.102:5405"],
                  "interval": "40ms", "dead_after": 8},
    "auth": {"key_file": "KEY"},
    "health": [{"name": "web", "http": {"url": "http://127.0.0.1:8080/healthz"},
                "interval": "200ms", "timeout": "150ms"},
               {"name": "db", "tcp": {"host": "127.0.0.1", "port": 5432}}],
    "announce": {"count": 3, "interval": "100ms", "refresh": "10s"},
    "vip_lease": "3s", "api": {"listen": "127.0.0.1:9440"},
    "metrics": {"listen": "127.0.0.1:9441"},
    "hooks": {"on_active": ["/bin/true"], "timeout": "10s"},
    "movers": ["netlink", {"webhook": {"url": "https://ipam.example/vip",
                                       "secret_file": "SECRET"}}],
}
GROUP: dict[str, Any] = {
    **{k: v for k, v in PAIR.items() if k not in ("heartbeat", "auth", "movers")},
    "arbiter": {"etcd": {"endpoints": ["198.51.100.5:2379"], "prefix": "/vipd", "ttl": "1s"}},
    "movers": ["netlink", {"aws": {"region": "eu-west-1", "eni": "eni-0123456789abcdef0",
                                   "elastic_ips": [{"allocation_id":
                                                    "eipalloc-0123456789abcdef0",
                                                    "private_ip": "198.51.100.10"}]}}],
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                    st.sampled_from(["0", "-1s", "1e9s", "netlink", "eni-x", "[::1]:1",
                                     "198.51.100.1:0", "https://", "kernel", "none"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=10)


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += paths(value, (*prefix, i))
    return found


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    tree = copy.deepcopy(draw(st.sampled_from([PAIR, GROUP])))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(paths(tree)))
        parent: Any = tree
        for part in where[:-1]:
            parent = parent[part]
        last = where[-1]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[last]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
        else:
            parent[last] = draw(values)
        if not paths(tree):
            break
    if draw(st.booleans()):
        return tree
    return draw(st.sampled_from([tree, [tree], "just text", 42, None]))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz")
    key, secret = base / "web.key", base / "webhook.secret"
    key.write_text(generate_key_line(1) + "\n")
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    for path in (key, secret):
        os.chmod(path, 0o600)
    return {"dir": base, "KEY": key, "SECRET": secret}


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=mutated())
def test_check_config_answers_0_or_2_never_a_traceback(
        files: dict[str, Path], tree: Any, capsys: pytest.CaptureFixture[str]) -> None:
    text = yaml.safe_dump(tree).replace("KEY", str(files["KEY"])).replace(
        "SECRET", str(files["SECRET"]))
    path = files["dir"] / "web.yaml"
    path.write_text(text)
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, text, err)
    if code == 2:
        assert err.startswith(f"{path}:") and "Traceback" not in err, err
    else:
        assert out.startswith(f"{path}: ok:"), out
