"""`vipd install-check` finds what would break a pair, on a real interface in the lab."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from vipd.demo.pairlab import PairLab

pytestmark = pytest.mark.netns


def check(pair: PairLab, *extra: str, user: str = "root") -> tuple[int, str]:
    node = pair.lab["node1"]
    out = subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-m", "vipd.cli",
                          "install-check", "-c", str(pair.nodes["node1"].config),
                          "--user", user, *extra], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, out.stdout


def lines(stdout: str, level: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(level)]


def test_a_sound_node_passes_with_only_warnings(pair: Any) -> None:
    code, out = check(pair)
    assert code == 0, out
    assert lines(out, "FAIL") == []
    assert any("routed via eth0" in line for line in lines(out, "OK")), out


def test_unsafe_key_file_and_wrong_owner_fail(pair: Any) -> None:
    key = pair.workdir / "pair.key"
    key.chmod(0o644)
    code, out = check(pair, user="nobody")
    assert code == 1
    fails = "\n".join(lines(out, "FAIL"))
    assert "mode 0644 gives access to group/others" in fails
    assert "owned by root, but vipd runs as nobody" in fails


def test_arp_ignore_that_hides_a_32_vip_fails_and_strict_rp_filter_warns(pair: Any) -> None:
    pair.lab.sysctl(pair.lab["node1"].ns, {"net.ipv4.conf.eth0.arp_ignore": 2,
                                            "net.ipv4.conf.eth0.rp_filter": 1})
    code, out = check(pair)
    assert code == 1
    assert any("arp_ignore=2" in line for line in lines(out, "FAIL")), out
    assert any("rp_filter=1" in line for line in lines(out, "WARN")), out


def test_missing_interface_unknown_bind_and_unroutable_peer_fail(pair: Any) -> None:
    cfg = pair.nodes["node1"].config
    text = cfg.read_text()
    text = text.replace("interface: eth0", "interface: nosuch0")
    text = text.replace('bind: "198.51.100.1:5405"', 'bind: "198.51.100.77:5405"')
    text = text.replace('peers: ["198.51.100.2:5405"]', 'peers: ["203.0.113.9:5405"]')
    cfg.write_text(text)
    code, out = check(pair)
    assert code == 1
    fails = "\n".join(lines(out, "FAIL"))
    assert "nosuch0 does not exist" in fails, out
    cfg.write_text(text.replace("interface: nosuch0", "interface: eth0"))
    code, out = check(pair)
    fails = "\n".join(lines(out, "FAIL"))
    assert "198.51.100.77 is not an address of this host" in fails, out
    assert "no route to 203.0.113.9" in fails, out
