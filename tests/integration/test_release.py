"""`vipd release -c FILE` (systemd ExecStopPost) removes exactly this config's VIPs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vipd.keys import generate_key_line

pytestmark = pytest.mark.netns


def _config(tmp: Path, vips: str) -> Path:
    key = tmp / "k.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_key_line(1) + "\n")
    cfg = tmp / "web.yaml"
    cfg.write_text(
        "node: node1\ncluster: web\ninterface: eth0\n"
        f"vips: {vips}\n"
        'heartbeat: {bind: "198.51.100.1:5405", peers: ["198.51.100.2:5405"]}\n'
        f"auth: {{key_file: {key}}}\n")
    return cfg


def _locals(host: Any) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in host.addresses()}


def test_release_removes_exactly_the_configured_vips(lab: Any, tmp_path: Path) -> None:
    node = lab.node1
    ours = ["198.51.100.100/32", "2001:db8:1::100/128"]
    others = ["198.51.100.101/32", "198.51.100.100/24"]  # another pair's VIP; same IP, other prefix
    for address in ours + others:
        node.ip("addr", "add", address, "dev", "eth0")
    before = _locals(node)
    assert set(ours + others) <= before
    cfg = _config(tmp_path, '[198.51.100.100/32, "2001:db8:1::100/128"]')
    out = subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-m", "vipd.cli",
                          "release", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    after = _locals(node)
    assert not set(ours) & after, f"VIPs still there: {set(ours) & after}"
    assert after == before - set(ours), "release touched addresses that are not this config's"
    again = subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-m", "vipd.cli",
                            "release", "-c", str(cfg)], capture_output=True, text=True,
                           timeout=30)
    assert again.returncode == 0, "releasing absent VIPs must succeed (idempotent)"


def test_release_with_a_bad_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node: [\n")
    out = subprocess.run([sys.executable, "-m", "vipd.cli", "release", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert str(cfg) in out.stderr and "Traceback" not in out.stderr
