"""The shipped units: valid for systemd, hardened, least privilege. vipd@ (exposure <=
2.5, CAP_NET_ADMIN and CAP_NET_RAW only) and vipd-witness@ (exposure <= 1.5, no
capabilities at all)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "vipd@.service"
SYSUSERS = UNIT.with_name("vipd.sysusers.conf")
WITNESS_UNIT = UNIT.with_name("vipd-witness@.service")


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing: .ci/run must install systemd")
        pytest.skip("systemd-analyze not installed")
    return tool


def _settings(unit: Path = UNIT) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _render(template: Path, tmp_path: Path, instance: str) -> Path:
    """The unit as an instance, ExecStart pointing at the vipd actually installed here
    (verify checks that the executables exist)."""
    vipd = shutil.which("vipd")
    assert vipd, "the vipd console script must be installed (pip install -e .)"
    unit = tmp_path / template.name.replace("@", f"@{instance}")
    unit.write_text(template.read_text().replace("/opt/vipd/bin/vipd", vipd))
    return unit


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    return _render(UNIT, tmp_path, "web")


@pytest.fixture
def rendered_witness(tmp_path: Path) -> Path:
    return _render(WITNESS_UNIT, tmp_path, "site1")


def test_systemd_analyze_verify_is_clean(rendered: Path) -> None:
    out = subprocess.run([_analyze(), "verify", str(rendered)], capture_output=True,
                         text=True, timeout=60, cwd=rendered.parent)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def _exposure(rendered: Path) -> float:
    out = subprocess.run([_analyze(), "security", "--offline=true", str(rendered)],
                         capture_output=True, text=True, timeout=60, cwd=rendered.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\S+)", out.stdout)
    assert match, out.stdout + out.stderr
    print(f"\nsystemd-analyze security --offline=true {rendered.name}: exposure {match[1]} "
          f"{match[2]}")
    return float(match[1])


def test_security_exposure_is_ok(rendered: Path) -> None:
    assert _exposure(rendered) <= 2.5


def test_witness_unit_verify_is_clean(rendered_witness: Path) -> None:
    out = subprocess.run([_analyze(), "verify", str(rendered_witness)], capture_output=True,
                         text=True, timeout=60, cwd=rendered_witness.parent)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_witness_unit_exposure_is_lower_still(rendered_witness: Path) -> None:
    # no capabilities, no netlink or packet sockets, a private user namespace
    assert _exposure(rendered_witness) <= 1.5


def test_least_privilege_and_lifecycle_settings() -> None:
    s = _settings()
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert set(s["AmbientCapabilities"][0].split()) == caps
    assert set(s["CapabilityBoundingSet"][0].split()) == caps
    assert set(s["RestrictAddressFamilies"][0].split()) == {
        "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET", "AF_UNIX"}
    assert s["User"] == ["vipd"] and s["NoNewPrivileges"] == ["yes"]
    assert s["Type"] == ["notify"] and s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    assert s["ExecStopPost"] == ["/opt/vipd/bin/vipd release -c /etc/vipd/%i.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["UMask"] == ["0077"] and s["ProtectSystem"] == ["strict"]
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute"):
        assert s[key] == ["yes"], key
    assert "@system-service" in s["SystemCallFilter"]
    assert s["SystemCallArchitectures"] == ["native"]


def test_witness_unit_has_no_capabilities_at_all() -> None:
    s = _settings(WITNESS_UNIT)
    assert s["CapabilityBoundingSet"] == [""] and s["AmbientCapabilities"] == [""]
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert s["User"] == ["vipd"] and s["NoNewPrivileges"] == ["yes"]
    assert s["PrivateUsers"] == ["yes"] and s["SecureBits"] == ["noroot-locked"]
    assert s["ExecStart"] == ["/opt/vipd/bin/vipd witness --config "
                              "/etc/vipd/witness/%i.yaml --log-format text"]
    assert s["Type"] == ["notify"] and s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "ExecStopPost" not in s  # it holds no address to release
    assert s["UMask"] == ["0077"] and s["ProtectSystem"] == ["strict"]
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute",
                "ProtectClock", "ProtectHostname", "RestrictSUIDSGID"):
        assert s[key] == ["yes"], key
    assert s["SystemCallArchitectures"] == ["native"]


def _syscall_groups(analyze: str) -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: every @group and what it lists (names or groups)."""
    out = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


NEEDED_CALLS = {
    # capset above all: shedding inheritable capabilities at start (vipd/privileges.py)
    UNIT: {"capget", "capset", "prctl", "socket", "bind", "setsockopt", "sendto",
           "recvfrom", "epoll_wait", "clock_gettime"},
    WITNESS_UNIT: {"socket", "bind", "setsockopt", "sendto", "recvfrom", "epoll_wait",
                   "clock_gettime", "getrandom", "accept4", "listen"},
}


@pytest.mark.parametrize("unit", list(NEEDED_CALLS), ids=lambda unit: unit.name)
def test_the_syscall_filter_allows_what_vipd_calls_under_the_unit(unit: Path) -> None:
    """Evaluate the unit's SystemCallFilter= lines the way systemd does (the first one
    sets the default, later ones add or remove) and check the calls vipd makes as the
    unprivileged service user: a filter that kills or refuses one of them stops the
    daemon at start."""
    groups = _syscall_groups(_analyze())

    def expand(names: list[str]) -> set[str]:
        found: set[str] = set()
        for name in names:
            found |= expand(groups[name]) if name.startswith("@") else {name}
        return found

    lines = _settings(unit)["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first filter line must be an allow list"
    allowed = expand(lines[0].split())
    for line in lines[1:]:
        if line.startswith("~"):
            allowed -= expand(line[1:].split())
        else:
            allowed |= expand(line.split())
    needed = NEEDED_CALLS[unit]
    assert needed <= allowed, sorted(needed - allowed)


def test_sysusers_snippet_creates_the_service_user() -> None:
    rows = [line.split() for line in SYSUSERS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert rows and rows[0][:2] == ["u", "vipd"]
