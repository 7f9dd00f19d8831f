"""Log lines: one per event, node name first; JSON lines parse and carry the fields."""

from __future__ import annotations

import json
import logging

import pytest

from vipd import logs


@pytest.fixture(autouse=True)
def _restore_root_logger():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_start_with_time_level_and_node(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("vm-a", "text")
    logging.getLogger("vipd.daemon").info("%s -> %s (%s), term %d", "STANDBY", "ACTIVE",
                                          "peer vm-b silent for 320 ms", 7)
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0
    stamp, level, node, message = line.split(None, 3)
    assert stamp[:2] == "20" and "T" in stamp and level == "INFO" and node == "vm-a"
    assert message == "STANDBY -> ACTIVE (peer vm-b silent for 320 ms), term 7"


def test_json_lines_parse(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("vm-b", "json")
    log = logging.getLogger("vipd.vipworker")
    log.warning("VIPs removed from %s", "eth0")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("task crashed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["node"] == "vm-b" and first["level"] == "warning"
    assert first["message"] == "VIPs removed from eth0" and first["logger"] == "vipd.vipworker"
    assert isinstance(first["time"], float)
    assert "RuntimeError: boom" in second["exception"]
