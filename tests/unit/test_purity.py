"""The core stays pure: no I/O libraries, no clock reads (STYLE.md rule 1 and 2)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "vipd" / "core"
FORBIDDEN_MODULES = {"asyncio", "socket", "pyroute2", "aiohttp", "prometheus_client",
                     "time", "datetime", "os", "subprocess", "selectors", "threading"}


def _core_files() -> list[Path]:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 4, "expected the core modules under vipd/core"
    return files


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_module_imports_no_io_or_clock(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
            if node.module.startswith("vipd") and not node.module.startswith(
                    ("vipd.core", "vipd.errors")):
                imported.add(node.module)
    bad = imported & FORBIDDEN_MODULES | {m for m in imported if m.startswith("vipd.")
                                          and not m.startswith(("vipd.core", "vipd.errors"))}
    assert not bad, f"{path.name} imports {sorted(bad)}; the core must stay pure"


def test_the_guard_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom asyncio import sleep\n")
    tree = ast.parse(bad.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names & FORBIDDEN_MODULES == {"time", "asyncio"}
