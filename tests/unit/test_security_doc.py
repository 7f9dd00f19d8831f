"""docs/security.md maps each control to the tests that prove it: every test and file it
names must exist, so the map cannot drift from the suite."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"


def test_every_test_the_threat_model_names_exists() -> None:
    text = DOC.read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", text))
    assert len(named) >= 20
    defined = {m for f in (ROOT / "tests").rglob("test_*.py")
               for m in re.findall(r"^(?:async )?def (test_[a-z0-9_]+)", f.read_text(), re.M)}
    assert sorted(named - defined) == []


def test_every_file_the_threat_model_names_exists() -> None:
    text = DOC.read_text()
    paths = set(re.findall(r"\b((?:tests|docs|vipd|simulations)/[\w/]+\.(?:py|md))", text))
    assert len(paths) >= 15
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []
    modules = set(re.findall(r"python -m (simulations\.\w+)", text))
    assert sorted(m for m in modules
                  if not (ROOT / (m.replace(".", "/") + ".py")).exists()) == []
