"""vipd.config: every way a config or key file can be wrong is reported with its key path."""

from __future__ import annotations

import base64
import copy
import os
import time
from ipaddress import IPv4Interface, IPv6Interface, ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from vipd.config import (
    DEFAULT_DEAD_AFTER,
    DEFAULT_INTERVAL,
    Config,
    Endpoint,
    LinkCheck,
    load_config,
)
from vipd.configtypes import format_duration, parse_duration
from vipd.errors import ConfigError
from vipd.keys import generate_key_line, load_keys

DELETE = object()

VALID: dict[str, Any] = {
    "node": "vm-a",
    "cluster": "web",
    "interface": "eth0",
    "vips": ["198.51.100.10/32", "2001:db8::10/128"],
    "heartbeat": {"bind": "198.51.100.101:5405", "peers": ["198.51.100.102:5405"]},
    "auth": {"key_file": "/etc/vipd/web.key"},
    "health": [
        {"name": "web", "http": {"url": "http://127.0.0.1:8080/healthz"},
         "interval": "200ms", "timeout": "150ms"},
        {"name": "db", "tcp": {"host": "127.0.0.1", "port": 5432}},
    ],
}


def changed(changes: dict[str, Any]) -> dict[str, Any]:
    """VALID with dotted paths ("heartbeat.peers", "health.0.name") set or deleted."""
    data = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target: Any = data
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) else last
        if value is DELETE:
            del target[key]
        else:
            target[key] = value
    return data


def write_yaml(tmp_path: Path, data: Any, name: str = "web.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    return info.value.problems


def problems_with(tmp_path: Path, changes: dict[str, Any]) -> list[tuple[str, str]]:
    return problems_of(write_yaml(tmp_path, changed(changes)))


# --- a valid config -----------------------------------------------------------------

def test_valid_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, VALID))
    assert config.priority == 100 and config.preempt is True and config.preempt_delay == 0
    assert config.heartbeat.interval == DEFAULT_INTERVAL == 0.04
    assert config.heartbeat.dead_after == DEFAULT_DEAD_AFTER == 8
    assert config.heartbeat.dead_interval == pytest.approx(0.32)
    assert config.vip_lease == 3.0
    assert (config.announce.count, config.announce.interval, config.announce.refresh) == \
        (3, 0.1, 10.0)
    assert str(config.api.listen) == "127.0.0.1:9440" and config.api.tokens_file is None
    assert config.metrics.listen == Endpoint(ip_address("127.0.0.1"), 9441)
    assert config.hooks.on_active == [] and config.hooks.timeout == 10.0
    assert config.effective_state_dir == Path("/var/lib/vipd/web")
    assert config.effective_audit_file == Path("/var/lib/vipd/web/audit.jsonl")
    web, db = config.health
    assert (web.kind, web.interval, web.timeout, web.rise, web.fall) == \
        ("http", 0.2, 0.15, 2, 2)
    assert web.probe.status == 200 and web.probe.body is None  # type: ignore[union-attr]
    assert db.kind == "tcp" and db.probe.port == 5432  # type: ignore[union-attr]


def test_vips_parse_to_interfaces_and_bare_addresses_are_host_routes(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, changed({"vips": ["192.0.2.7", "2001:db8::7",
                                                               "198.51.100.9/24"]})))
    assert config.vips == [IPv4Interface("192.0.2.7/32"), IPv6Interface("2001:db8::7/128"),
                           IPv4Interface("198.51.100.9/24")]


def test_state_dir_moves_the_default_audit_file(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, changed({"state_dir": "/srv/vipd"})))
    assert config.effective_audit_file == Path("/srv/vipd/audit.jsonl")
    config = load_config(write_yaml(tmp_path, changed({"audit": {"file": "/log/a.jsonl"}})))
    assert config.effective_audit_file == Path("/log/a.jsonl")
    assert config.effective_state_dir == Path("/var/lib/vipd/web")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_yaml(conf_dir, changed({"auth.key_file": "web.key",
                                         "api": {"tokens_file": "sub/web.tokens"}}))
    config = load_config(path)
    assert config.auth.key_file == conf_dir / "web.key"
    assert config.api.tokens_file == conf_dir / "sub" / "web.tokens"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, VALID))
    with pytest.raises(ValidationError):
        config.priority = 200  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.heartbeat.interval = 1.0  # type: ignore[misc]


def test_ipv6_heartbeat_and_exec_check(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, changed({
        "heartbeat": {"bind": "[2001:db8::1]:5405", "peers": ["[2001:db8::2]:5405"],
                      "interval": "100ms", "dead_after": 3},
        "health": [{"name": "custom", "exec": {"command": ["/usr/bin/true", "-x"]}}],
        "metrics": {"listen": None},
    })))
    assert config.heartbeat.bind == Endpoint(ip_address("2001:db8::1"), 5405)
    assert str(config.heartbeat.peers[0]) == "[2001:db8::2]:5405"
    assert config.heartbeat.dead_interval == pytest.approx(0.3)
    assert config.health[0].kind == "exec"
    assert config.health[0].probe.command == ["/usr/bin/true", "-x"]  # type: ignore[union-attr]
    assert config.metrics.listen is None


def test_link_check_is_built_by_code_with_fixed_timings() -> None:
    check = LinkCheck(interface="eth0")
    assert (check.name, check.kind, check.interval, check.timeout, check.rise, check.fall) == \
        ("link.eth0", "link", 0.5, 0.4, 2, 1)
    with pytest.raises(ValidationError, match="expected a Linux interface name"):
        LinkCheck(interface="eth0:1")


def test_vip_lease_zero_means_permanent_and_is_allowed(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, changed({"vip_lease": 0}))).vip_lease == 0


# --- file-level errors ----------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    [(path, msg)] = problems_of(tmp_path / "nope.yaml")
    assert path == "" and "cannot read config file" in msg and "No such file" in msg


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("node: vm-a\ncluster: web\nvips: [198.51.100.10/32\npriority: 1\n")
    [(key, msg)] = problems_of(path)
    assert key == ""
    assert msg.startswith("invalid YAML at line 4, column 9:")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("node: vm-a\npriority: 100\ncluster: web\npriority: 150\n")
    [(key, msg)] = problems_of(path)
    assert key == "" and "line 4" in msg and "duplicate key 'priority'" in msg


@pytest.mark.parametrize(("text", "got"), [
    ("- node: vm-a\n- cluster: web\n", "got a list"),
    ("just a string\n", "got a str"),
    ("", "got an empty file"),
    ("# only a comment\n", "got an empty file"),
])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(text)
    [(key, msg)] = problems_of(path)
    assert key == "" and "expected a mapping" in msg and got in msg


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    problems = problems_with(tmp_path, {
        "priority": 0, "bogus": 1, "vips.1": "127.0.0.1", "heartbeat.dead_after": 1,
        "heartbeat.peers": ["198.51.100.101:5405"], "health.1.rise": 0, "node": DELETE,
    })
    assert {path for path, _ in problems} == {
        "priority", "bogus", "vips[1]", "heartbeat.dead_after", "heartbeat.peers[0]",
        "health[1].rise", "node"}


def test_config_error_message_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, changed({"priority": 0}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: priority: must be greater than or equal to 1")


# --- field errors -------------------------------------------------------------------

FIELD_ERRORS = [
    ("unknown top-level key", {"prio": 1}, "prio", "unknown key; did you mean 'priority'?"),
    ("unknown key far from any", {"zzz": 1}, "zzz", "unknown key; expected one of: node,"),
    ("unknown nested key", {"heartbeat.intervall": "1s"}, "heartbeat.intervall",
     "did you mean 'interval'?"),
    ("unknown key in a check", {"health.0.http.code": 200}, "health[0].http.code",
     "unknown key; expected one of: url, status, body"),
    ("missing node", {"node": DELETE}, "node", "missing required key"),
    ("missing bind", {"heartbeat.bind": DELETE}, "heartbeat.bind", "missing required key"),
    ("missing auth", {"auth": DELETE}, "auth", "missing required key"),
    ("section not a mapping", {"heartbeat": "198.51.100.101"}, "heartbeat",
     "expected a mapping of keys, got '198.51.100.101'"),
    ("bad duration", {"heartbeat.interval": "xyz"}, "heartbeat.interval",
     "expected a duration like 150ms, 2s or a number of seconds, got 'xyz'"),
    ("duration unit", {"vip_lease": "3h"}, "vip_lease", "got '3h'"),
    ("duration bool", {"preempt_delay": True}, "preempt_delay", "got True"),
    ("negative duration", {"preempt_delay": -1}, "preempt_delay",
     "expected a duration of 0 seconds or more, got -1"),
    ("negative duration string", {"announce": {"refresh": "-5s"}}, "announce.refresh",
     "got '-5s'"),
    ("node with space", {"node": "vm a"}, "node", "A-Z a-z 0-9 . _ -, got 'vm a'"),
    ("node too long", {"node": "n" * 65}, "node", "expected 1..64 characters"),
    ("cluster non-ascii", {"cluster": "wéb"}, "cluster", "expected 1..64 characters"),
    ("node not a string", {"node": 7}, "node", "must be a valid string, got 7"),
    ("interface too long", {"interface": "a" * 16}, "interface", "Linux interface name"),
    ("interface slash", {"interface": "eth/0"}, "interface", "got 'eth/0'"),
    ("bad CIDR", {"vips.0": "198.51.100.10/33"}, "vips[0]",
     "expected an IP address or address/prefix, like 198.51.100.10/32, got '198.51.100.10/33'"),
    ("VIP not an address", {"vips.1": "web.example"}, "vips[1]", "got 'web.example'"),
    ("VIP not a string", {"vips.0": 3232235786}, "vips[0]", "as a string, got 3232235786"),
    ("duplicate VIP", {"vips": ["198.51.100.10/32", "198.51.100.11", "198.51.100.10/24"]},
     "vips[2]", "198.51.100.10 is listed twice (also vips[0])"),
    ("loopback VIP", {"vips.1": "127.0.0.1"}, "vips[1]", "127.0.0.1 is a loopback address"),
    ("IPv6 loopback VIP", {"vips.0": "::1"}, "vips[0]", "::1 is a loopback address"),
    ("multicast VIP", {"vips.0": "224.0.0.18"}, "vips[0]", "a multicast address"),
    ("unspecified VIP", {"vips.0": "0.0.0.0"}, "vips[0]", "the unspecified address"),
    ("link-local VIP", {"vips.0": "fe80::10/64"}, "vips[0]", "fe80::10 is a link-local"),
    ("IPv4 link-local VIP", {"vips.0": "169.254.1.1"}, "vips[0]", "link-local"),
    ("no VIPs", {"vips": []}, "vips", "expected at least one VIP"),
    ("priority 0", {"priority": 0}, "priority", "greater than or equal to 1, got 0"),
    ("priority 255", {"priority": 255}, "priority", "less than or equal to 254, got 255"),
    ("priority string", {"priority": "150"}, "priority", "valid integer, got '150'"),
    ("preempt string", {"preempt": "yes please"}, "preempt", "valid boolean"),
    ("empty peers", {"heartbeat.peers": []}, "heartbeat.peers", "at least one peer"),
    ("peer is bind", {"heartbeat.peers": ["198.51.100.101:5405"]}, "heartbeat.peers[0]",
     "198.51.100.101:5405 is this node's own bind address"),
    ("family mismatch", {"heartbeat.peers": ["198.51.100.102:5405", "[2001:db8::2]:5405"]},
     "heartbeat.peers[1]", "[2001:db8::2]:5405 is IPv6 but bind 198.51.100.101:5405 is IPv4"),
    ("duplicate peer", {"heartbeat.peers": ["198.51.100.102:5405", "198.51.100.102:5405"]},
     "heartbeat.peers[1]", "listed twice (also peers[0])"),
    ("unspecified peer", {"heartbeat.peers": ["0.0.0.0:5405"]}, "heartbeat.peers[0]",
     "not a unicast address"),
    ("endpoint without port", {"heartbeat.bind": "198.51.100.101"}, "heartbeat.bind",
     "expected host:port with an IP address"),
    ("endpoint hostname", {"heartbeat.bind": "vm-a.example:5405"}, "heartbeat.bind",
     "got 'vm-a.example:5405'"),
    ("IPv6 endpoint without brackets", {"heartbeat.bind": "2001:db8::1:5405"},
     "heartbeat.bind", "needs brackets"),
    ("IPv4 endpoint in brackets", {"heartbeat.bind": "[198.51.100.101]:5405"},
     "heartbeat.bind", "brackets are only for IPv6"),
    ("port 0", {"api": {"listen": "127.0.0.1:0"}}, "api.listen", "port must be 1..65535"),
    ("port too big", {"metrics": {"listen": "127.0.0.1:65536"}}, "metrics.listen",
     "port must be 1..65535"),
    ("endpoint not a string", {"heartbeat.peers": [5405]}, "heartbeat.peers[0]",
     "as a string"),
    ("interval 0", {"heartbeat.interval": 0}, "heartbeat.interval", "greater than 0"),
    ("interval 0ms", {"heartbeat.interval": "0ms"}, "heartbeat.interval", "greater than 0"),
    ("dead_after 1", {"heartbeat.dead_after": 1}, "heartbeat.dead_after",
     "greater than or equal to 2, got 1"),
    ("empty key_file", {"auth.key_file": ""}, "auth.key_file", "got an empty string"),
    ("rise 0", {"health.0.rise": 0}, "health[0].rise", "greater than or equal to 1, got 0"),
    ("fall 0", {"health.1.fall": 0}, "health[1].fall", "greater than or equal to 1"),
    ("timeout == interval", {"health.0.timeout": "200ms"}, "health[0].timeout",
     "timeout 200ms must be shorter than interval 200ms"),
    ("timeout > interval", {"health.1.timeout": "1s"}, "health[1].timeout",
     "timeout 1s must be shorter than interval 200ms"),
    ("timeout 0", {"health.0.timeout": 0}, "health[0].timeout", "greater than 0"),
    ("two probe kinds", {"health.1.exec": {"command": ["/bin/true"]}}, "health[1]",
     "expected exactly one of http, tcp, exec; got tcp and exec"),
    ("no probe", {"health.0.http": DELETE}, "health[0]",
     "expected exactly one of http, tcp, exec; got none"),
    ("duplicate check name", {"health.1.name": "web"}, "health[1].name",
     "check name 'web' is used twice (also health[0])"),
    ("http url scheme", {"health.0.http.url": "ftp://127.0.0.1/"}, "health[0].http.url",
     "expected an http:// or https:// URL, got 'ftp://127.0.0.1/'"),
    ("http url port", {"health.0.http.url": "http://127.0.0.1:99999/"},
     "health[0].http.url", "expected an http:// or https:// URL"),
    ("http status", {"health.0.http.status": 99}, "health[0].http.status",
     "greater than or equal to 100"),
    ("tcp port", {"health.1.tcp.port": 0}, "health[1].tcp.port", "greater than or equal to 1"),
    ("exec relative", {"health.1": {"name": "x", "exec": {"command": ["check.sh"]}}},
     "health[1].exec.command[0]", "expected an absolute path to the program, got 'check.sh'"),
    ("exec empty", {"health.1": {"name": "x", "exec": {"command": []}}},
     "health[1].exec.command", "non-empty argv list"),
    ("http and tcp", {"health.1.http": {"url": "http://127.0.0.1/"}}, "health[1]",
     "expected exactly one of http, tcp, exec; got http and tcp"),
    ("exec shell string", {"health.1": {"name": "x", "exec": {"command": "/bin/true"}}},
     "health[1].exec.command", "must be a valid list, got '/bin/true'"),
    ("tcp no port", {"health.1.tcp.port": DELETE}, "health[1].tcp.port",
     "missing required key"),
    ("tcp port too big", {"health.1.tcp.port": 70000}, "health[1].tcp.port",
     "less than or equal to 65535, got 70000"),
    ("check interval 0", {"health.1.interval": 0}, "health[1].interval",
     "greater than 0, got 0"),
    ("link check from YAML", {"health.1": {"name": "x", "link": {"interface": "eth0"}}},
     "health[1].link", "unknown key"),
    ("lease below dead interval", {"vip_lease": "300ms"}, "vip_lease",
     "vip_lease 300ms must be longer than the heartbeat dead interval 320ms "
     "(interval 40ms x dead_after 8)"),
    ("lease equal to dead interval",
     {"vip_lease": "1s", "heartbeat.interval": "250ms", "heartbeat.dead_after": 4},
     "vip_lease", "vip_lease 1s must be longer than the heartbeat dead interval 1s"),
    ("hook relative", {"hooks": {"on_active": ["notify.sh", "up"]}}, "hooks.on_active[0]",
     "expected an absolute path to the program, got 'notify.sh'"),
    ("hook shell string", {"hooks": {"on_fault": "/bin/echo fault"}}, "hooks.on_fault",
     "valid list"),
    ("announce count", {"announce": {"count": 101}}, "announce.count",
     "less than or equal to 100"),
]


@pytest.mark.parametrize(("changes", "key", "message"),
                         [case[1:] for case in FIELD_ERRORS],
                         ids=[case[0] for case in FIELD_ERRORS])
def test_field_error(tmp_path: Path, changes: dict[str, Any], key: str, message: str) -> None:
    problems = problems_with(tmp_path, changes)
    assert [(k, m) for k, m in problems if k == key and message in m], problems
    assert len(problems) == 1, problems


# --- durations and endpoints ----------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("150ms", 0.15), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("0", 0.0), ("0s", 0.0),
    (" 40ms ", 0.04), ("7", 7.0), (3, 3.0), (0.25, 0.25),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@given(st.integers(min_value=0, max_value=10**6))
def test_milliseconds_are_exact(n: int) -> None:
    assert parse_duration(f"{n}ms") == n / 1000


@pytest.mark.parametrize(("seconds", "text"), [
    (0.04, "40ms"), (0.32, "320ms"), (0.0005, "0.5ms"), (2.0, "2s"), (1.5, "1.5s"), (0, "0s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_endpoint_str_round_trips(host: Any, port: int) -> None:
    endpoint = Endpoint(host, port)
    assert Endpoint.parse(str(endpoint)) == endpoint


# --- key files ----------------------------------------------------------------------

SECRET_HEX = "00112233445566778899aabbccddeeff" * 2
SECRET_B64 = base64.b64encode(bytes(range(40))).decode()


def write_keys(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "web.key"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def key_problems(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_keys(path)
    assert info.value.file == str(path)
    return info.value.problems


def test_keys_hex_and_base64_with_comments(tmp_path: Path) -> None:
    path = write_keys(tmp_path, f"# rotated 2024\n\n1 {SECRET_HEX}\n"
                                f"4294967295 {SECRET_B64}  # newest\n")
    assert load_keys(path) == {1: bytes.fromhex(SECRET_HEX), 4294967295: bytes(range(40))}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_keys(tmp_path, f"1 {SECRET_HEX}\n", mode)
    [(key, msg)] = key_problems(path)
    assert key == ""
    assert msg == (f"mode {mode:04o} gives access to group/others; run chmod 600 {path}")


@pytest.mark.parametrize(("text", "message"), [
    (f"1 {SECRET_HEX[:32]}\n", "line 1: secret of key 1 is 16 bytes; at least 32"),
    (f"\n\n3 {base64.b64encode(b'x' * 31).decode()}\n", "line 3: secret of key 3 is 31 bytes"),
    ("1 not*base64!!\n", "line 1: secret of key 1 is neither hex nor base64"),
    (f"1 {SECRET_B64[:-1]}\n", "line 1: secret of key 1 is neither hex nor base64"),
    (f"1 {SECRET_HEX}0\n", "line 1: secret of key 1 is neither hex nor base64"),
    (f"7 {SECRET_HEX}\n# x\n7 {SECRET_B64}\n", "line 3: duplicate key id 7 (also on line 1)"),
    (f"0 {SECRET_HEX}\n", "line 1: key id must be an integer in 1..4294967295"),
    (f"4294967296 {SECRET_HEX}\n", "line 1: key id must be an integer"),
    (f"{SECRET_HEX} 1\n", "line 1: key id must be an integer"),
    (f"{SECRET_B64}\n", "line 1: expected 'ID SECRET', got 1 fields"),
    (f"1 {SECRET_HEX} extra\n", "line 1: expected 'ID SECRET', got 3 fields"),
    ("", "no keys found"),
    ("# nothing yet\n\n", "no keys found"),
])
def test_bad_key_file(tmp_path: Path, text: str, message: str) -> None:
    problems = key_problems(write_keys(tmp_path, text))
    assert [m for _, m in problems if m.startswith(message)], problems
    for _, msg in problems:  # a secret, or any 8 characters of one, never leaks
        for secret in (SECRET_HEX, SECRET_B64, "not*base64"):
            assert secret[:8] not in msg


def test_every_bad_key_line_is_reported(tmp_path: Path) -> None:
    path = write_keys(tmp_path, f"1 {SECRET_HEX}\n2 short\nx {SECRET_HEX}\n3 {SECRET_B64}\n")
    messages = [m for _, m in key_problems(path)]
    assert [m.split(":")[0] for m in messages] == ["line 2", "line 3"]


def test_missing_key_file(tmp_path: Path) -> None:
    [(key, msg)] = key_problems(tmp_path / "absent.key")
    assert key == "" and msg == "cannot read key file: No such file or directory"


def test_key_file_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.key").mkdir(mode=0o700)
    [(_, msg)] = key_problems(tmp_path / "dir.key")
    assert msg == "cannot read key file: Is a directory"


def test_key_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.key", 0o600)
    [(_, msg)] = key_problems(tmp_path / "fifo.key")
    assert msg == "key file is not a regular file"


def test_generated_key_line_loads(tmp_path: Path) -> None:
    before = int(time.time())
    line = generate_key_line()
    key_id, secret = line.split(" ")
    assert before <= int(key_id) <= int(time.time())
    assert len(base64.b64decode(secret, validate=True)) == 32
    other = generate_key_line(7)
    keys = load_keys(write_keys(tmp_path, f"{line}\n{other}\n"))
    assert set(keys) == {int(key_id), 7} and keys[7] != keys[int(key_id)]
    assert all(len(v) == 32 for v in keys.values())


@pytest.mark.parametrize("bad_id", [0, -1, 2**32])
def test_generate_key_line_rejects_bad_ids(bad_id: int) -> None:
    with pytest.raises(ValueError, match=r"key id must be in 1\.\.4294967295"):
        generate_key_line(bad_id)


def test_config_model_can_be_built_directly() -> None:
    # The daemon and the simulator build configs in code; the same checks apply there.
    with pytest.raises(ValidationError, match="own bind address"):
        Config.model_validate(changed({"heartbeat.peers": ["198.51.100.101:5405"]}))
    config = Config.model_validate(changed({"auth.key_file": "rel.key"}))
    assert config.auth.key_file == Path("rel.key")  # no config file: left as given


# --- arbiter etcd: a group ------------------------------------------------------------

GROUP = {"heartbeat": DELETE, "auth": DELETE,
         "arbiter": {"etcd": {"endpoints": ["198.51.100.5:2379", "198.51.100.6:2379"]}}}


def test_a_group_on_etcd_needs_no_heartbeat_or_key(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, changed(GROUP)))
    assert config.etcd is not None and config.heartbeat is None and config.auth is None
    assert config.etcd.prefix == "/vipd" and config.etcd.ttl == 1.0
    assert [str(e) for e in config.etcd.endpoints] == ["198.51.100.5:2379", "198.51.100.6:2379"]
    assert config.fence == "kernel"  # an arbiter brings the gate
    assert config.dead_interval == 1.0 and config.interval == 0.25  # keep-alives: TTL/4


GROUP_ERRORS = [
    ("heartbeat with etcd", {**GROUP, "heartbeat": VALID["heartbeat"]}, "heartbeat",
     "not used with arbiter etcd"),
    ("no heartbeat without etcd", {"heartbeat": DELETE}, "heartbeat", "missing required key"),
    ("both arbiters", {**GROUP, "arbiter": {"witness": ["198.51.100.3:5406"],
                                            "etcd": {"endpoints": ["198.51.100.5:2379"]}}},
     "arbiter", "exactly one of witness"),
    ("no endpoints", {**GROUP, "arbiter": {"etcd": {"endpoints": []}}},
     "arbiter.etcd.endpoints", "at least one etcd endpoint"),
    ("endpoint twice", {**GROUP, "arbiter": {"etcd": {"endpoints": [
        "198.51.100.5:2379", "198.51.100.5:2379"]}}}, "arbiter.etcd.endpoints[1]",
     "listed twice"),
    ("fractional ttl", {**GROUP, "arbiter": {"etcd": {"endpoints": ["198.51.100.5:2379"],
                                                      "ttl": "1500ms"}}},
     "arbiter.etcd.ttl", "whole seconds"),
    ("relative prefix", {**GROUP, "arbiter": {"etcd": {"endpoints": ["198.51.100.5:2379"],
                                                       "prefix": "vipd"}}},
     "arbiter.etcd.prefix", "like /vipd"),
    ("cert without key", {**GROUP, "arbiter": {"etcd": {
        "endpoints": ["198.51.100.5:2379"], "tls": {"ca": "/ca.pem", "cert": "/c.pem"}}}},
     "arbiter.etcd.tls.key", "both cert and key"),
    ("lease with etcd", {**GROUP, "arbiter": {"etcd": {"endpoints": ["198.51.100.5:2379"]},
                                              "lease": "1s"}},
     "arbiter.lease", "etcd.ttl"),
    ("vip_lease under the ttl", {**GROUP, "arbiter": {"etcd": {
        "endpoints": ["198.51.100.5:2379"], "ttl": "3s"}}, "vip_lease": "2s"},
     "vip_lease", "longer than the etcd ttl 3s"),
]


@pytest.mark.parametrize(("changes", "key", "message"), [c[1:] for c in GROUP_ERRORS],
                         ids=[c[0] for c in GROUP_ERRORS])
def test_group_config_errors_name_the_key(tmp_path: Path, changes: dict[str, Any], key: str,
                                          message: str) -> None:
    problems = problems_with(tmp_path, changes)
    assert any(k == key and message in m for k, m in problems), problems


# --- movers ------------------------------------------------------------------------------

AWS = {"region": "eu-west-1", "eni": "eni-0123456789abcdef0",
       "elastic_ips": [{"allocation_id": "eipalloc-0123456789abcdef0",
                        "private_ip": "198.51.100.10"}]}
MOVER_ERRORS = [
    ("netlink not first", {"movers": [{"aws": AWS}]}, "movers[0]", "expected netlink first"),
    ("aws without eni", {"movers": ["netlink", {"aws": {"region": "eu-west-1"}}]},
     "movers[1].aws.eni", "missing required key"),
    ("aws with a bad eni", {"movers": ["netlink", {"aws": {**AWS, "eni": "i-0123"}}]},
     "movers[1].aws.eni", "should match pattern"),
    ("aws with nothing to move", {"movers": ["netlink", {"aws": {
        "region": "eu-west-1", "eni": "eni-0123456789abcdef0", "secondary_ips": False}}]},
     "movers[1].aws", "nothing to move"),
    ("an unknown mover", {"movers": ["netlink", "gcp"]}, "movers[1]", "unknown mover 'gcp'"),
    ("a mover twice", {"movers": ["netlink", {"aws": AWS}, {"aws": AWS}]}, "movers[2]",
     "aws is listed twice"),
    ("webhook over http", {"movers": ["netlink", {"webhook": {
        "url": "http://ipam.example/vip", "secret_file": "/s"}}]}, "movers[1].webhook.url",
     "is not https"),
]


@pytest.mark.parametrize(("changes", "key", "message"), [c[1:] for c in MOVER_ERRORS],
                         ids=[c[0] for c in MOVER_ERRORS])
def test_mover_config_errors_name_the_key(tmp_path: Path, changes: dict[str, Any], key: str,
                                          message: str) -> None:
    problems = problems_with(tmp_path, changes)
    assert any(k == key and message in m for k, m in problems), problems


def test_movers_default_to_netlink_and_take_remote_ones_after_it(tmp_path: Path) -> None:
    assert [m.kind for m in load_config(write_yaml(tmp_path, VALID)).movers] == ["netlink"]
    config = load_config(write_yaml(tmp_path, changed({"movers": [
        "netlink", {"aws": AWS}, {"webhook": {"url": "http://127.0.0.1:8443/vip",
                                              "secret_file": "/s", "insecure": True}}]})))
    assert [m.kind for m in config.remote_movers] == ["aws", "webhook"]
    assert config.remote_movers[0].aws is not None
    assert str(config.remote_movers[0].aws.elastic_ips[0].private_ip) == "198.51.100.10"
