"""vipd.cli: check-config and keygen, run in-process through main()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vipd.cli import COMMANDS, main
from vipd.configtypes import parse_duration
from vipd.keys import generate_key_line, load_keys

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXAMPLE_KEY_FILE = "/etc/vipd/web.key"
EXAMPLE_TOKENS_FILE = "/etc/vipd/web.tokens"


def install_example(tmp_path: Path, name: str, keys: int = 2) -> Path:
    """The example config with its key and tokens files pointed at fresh temp files."""
    key_file = tmp_path / "web.key"
    key_file.write_text("".join(f"{generate_key_line(i + 1)}\n" for i in range(keys)))
    os.chmod(key_file, 0o600)
    (tmp_path / "web.tokens").write_text("")
    os.chmod(tmp_path / "web.tokens", 0o600)  # as the daemon requires
    text = (CONFIGS / name).read_text()
    assert EXAMPLE_KEY_FILE in text and EXAMPLE_TOKENS_FILE in text
    path = tmp_path / name
    path.write_text(text.replace(EXAMPLE_KEY_FILE, str(key_file))
                    .replace(EXAMPLE_TOKENS_FILE, str(tmp_path / "web.tokens")))
    return path


@pytest.mark.parametrize(("name", "node", "peer"), [
    ("node-a.yaml", "vm-a", "198.51.100.102:5405"),
    ("node-b.yaml", "vm-b", "198.51.100.101:5405"),
])
def test_check_config_accepts_the_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           name: str, node: str, peer: str) -> None:
    path = install_example(tmp_path, name)
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out == (f"{path}: ok: node {node} in cluster web, 2 VIPs on eth0, peer {peer}, "
                   f"heartbeat 40ms x 8 (dead after 320ms), 2 checks, 2 keys, no arbiter, "
                   f"fence none\n")


def test_check_config_accepts_the_group_example(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    text = (CONFIGS / "group-lb1.yaml").read_text()
    for name in ("etcd-ca.pem", "etcd-lb1.pem", "etcd-lb1.key", "web.tokens"):
        (tmp_path / name).write_text("x")
        os.chmod(tmp_path / name, 0o600)
        text = text.replace(f"/etc/vipd/{name}", str(tmp_path / name))
    path = tmp_path / "web.yaml"
    path.write_text(text)
    (tmp_path / "web.tokens").write_text("")
    code = main(["check-config", str(path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == (f"{path}: ok: node lb1 in cluster web, 2 VIPs on eth0, group on etcd "
                   f"192.0.2.21:2379,192.0.2.22:2379,192.0.2.23:2379 (prefix /vipd, ttl 1s, "
                   f"TLS), priority 150, 1 check, fence kernel\n")
    (tmp_path / "etcd-lb1.key").unlink()
    assert main(["check-config", str(path)]) == 2
    assert "arbiter.etcd: tls.key: cannot read" in capsys.readouterr().err


def test_examples_differ_only_in_node_priority_bind_and_peers() -> None:
    a, b = (yaml.safe_load((CONFIGS / name).read_text())
            for name in ("node-a.yaml", "node-b.yaml"))
    per_node = ("node", "priority")
    assert {k: v for k, v in a.items() if k not in (*per_node, "heartbeat")} == \
        {k: v for k, v in b.items() if k not in (*per_node, "heartbeat")}
    assert a["node"] != b["node"] and a["priority"] != b["priority"]
    hb_a, hb_b = a.pop("heartbeat"), b.pop("heartbeat")
    assert hb_a["peers"] == [hb_b["bind"]] and hb_b["peers"] == [hb_a["bind"]]
    assert {k: v for k, v in hb_a.items() if k not in ("bind", "peers")} == \
        {k: v for k, v in hb_b.items() if k not in ("bind", "peers")}


@pytest.mark.parametrize("name", ["node-a.yaml", "node-b.yaml"])
def test_examples_that_preempt_damp_flapping(name: str) -> None:
    """Without damping a flapping check moved the VIPs 34 times in 10 s (issues 10, 15):
    an example that preempts must show damping with a hold-down long enough to damp that
    (as loaded: the values it shows are the ones vipd uses), and say why."""
    text = (CONFIGS / name).read_text()
    config = yaml.safe_load(text)
    assert config["preempt"] is True
    assert config["damping"]["failures"] >= 1
    assert parse_duration(config["damping"]["hold_down"]) >= 30.0
    assert "flapping" in text


def test_relative_key_file_is_found_next_to_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = install_example(tmp_path, "node-a.yaml", keys=1)
    path.write_text(path.read_text().replace(str(tmp_path / "web.key"), "web.key"))
    monkeypatch.chdir(tmp_path.parent)
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.endswith(", 1 key, no arbiter, fence none\n")


def test_check_config_reports_every_error_as_file_key_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = install_example(tmp_path, "node-a.yaml")
    text = path.read_text().replace("priority: 150", "priority: 0") \
        .replace("dead_after: 8", "dead_after: 8\n  intervall: 1s")
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}: priority: must be greater than or equal to 1, got 0",
        f"{path}: heartbeat.intervall: unknown key; did you mean 'interval'?",
    ]


def test_check_config_refuses_a_readable_key_file(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = install_example(tmp_path, "node-a.yaml")
    os.chmod(tmp_path / "web.key", 0o644)
    assert main(["check-config", str(path)]) == 2
    key_file = tmp_path / "web.key"
    assert capsys.readouterr().err == (f"{key_file}: mode 0644 gives access to group/others; "
                                       f"run chmod 600 {key_file}\n")


def test_check_config_needs_the_tokens_file(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = install_example(tmp_path, "node-a.yaml")
    (tmp_path / "web.tokens").unlink()
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (f"{tmp_path / 'web.tokens'}: cannot read tokens file: "
                                       f"No such file or directory\n")


def test_check_config_checks_the_tokens_file_as_the_daemon_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = install_example(tmp_path, "node-a.yaml")
    tokens = tmp_path / "web.tokens"
    tokens.write_text("ops operate not-a-hash\n")
    assert main(["check-config", str(path)]) == 2
    assert "line 1: expected the SHA-256 of the token" in capsys.readouterr().err
    tokens.write_text("")
    os.chmod(tokens, 0o644)
    assert main(["check-config", str(path)]) == 2
    assert "mode 0644 gives access to group/others" in capsys.readouterr().err


def test_check_config_on_a_missing_file(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == (f"{tmp_path / 'none.yaml'}: cannot read config file: "
                                       f"No such file or directory\n")


def test_bad_config_never_shows_a_traceback(tmp_path: Path) -> None:
    # A real process, so that the __main__ guard and the exit code are exercised too.
    path = tmp_path / "bad.yaml"
    path.write_text("node: [unclosed\n")
    proc = subprocess.run([sys.executable, "-m", "vipd.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"{path}: invalid YAML at line 2, column 1:")
    assert "Traceback" not in proc.stderr


def test_keygen_output_loads_as_a_key_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == 0
    assert main(["keygen", "--id", "42"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2
    key_file = tmp_path / "web.key"
    key_file.write_text(out)
    os.chmod(key_file, 0o600)
    keys = load_keys(key_file)
    assert 42 in keys and len(keys) == 2
    assert all(len(secret) == 32 for secret in keys.values())


@pytest.mark.parametrize("bad", ["0", "4294967296", "abc"])
def test_keygen_rejects_bad_ids(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keygen", "--id", bad])
    assert info.value.code == 2
    assert "argument --id" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: vipd" in err and "COMMAND" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
