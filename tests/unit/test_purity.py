"""The core stays pure: no I/O libraries, no clock reads (time is an argument; the
runtime reads the clock).

One guard, `forbidden_imports`, checks every core module, and the snippet tests below
run that same function, so a hole in the guard is a failing test, not a silent pass.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "vipd" / "core"
CORE_PACKAGE = "vipd.core"
# Any import of these (or of a submodule: `import os.path`) is forbidden in the core.
# importlib: the core has no reason to import dynamically, and a dynamic import could
# bring in anything.
FORBIDDEN_MODULES = {"asyncio", "socket", "pyroute2", "aiohttp", "prometheus_client",
                     "time", "datetime", "os", "subprocess", "selectors", "threading",
                     "importlib"}
# The only parts of vipd the core may import; `vipd` itself only as the parent package
# (`from vipd import errors`), which Python imports for any of them anyway.
ALLOWED_VIPD = ("vipd.core", "vipd.errors")
DYNAMIC_IMPORTS = {"__import__", "import_module"}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _forbidden(name: str) -> bool:
    if _within(name, "vipd"):
        return name != "vipd" and not any(_within(name, ok) for ok in ALLOWED_VIPD)
    return name.split(".")[0] in FORBIDDEN_MODULES


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` names, relative ones resolved against `package`."""
    relative = "." * node.level + (node.module or "")
    try:
        return importlib.util.resolve_name(relative, package)
    except ImportError:  # beyond the top-level package: not an allowed module either
        return relative


def forbidden_imports(source: str, module: str) -> set[str]:
    """The modules `source` imports that the core must not, as absolute dotted names.

    `module` is the dotted name of the file (`vipd.core.election`; for the package's own
    ``__init__.py``, `vipd.core.__init__`): relative imports resolve against its package.
    `from X import y` counts as importing X and, if X is allowed, X.y (y may be a
    submodule: `from vipd import daemon`). `__import__("x")` and
    `importlib.import_module("x")` count as importing x; with a computed name they are
    reported as such.
    """
    package = module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if _forbidden(alias.name)}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            if base.startswith(".") or _forbidden(base):
                found.add(base)
            else:
                found |= {f"{base}.{alias.name}" for alias in node.names
                          if alias.name != "*" and _forbidden(f"{base}.{alias.name}")}
        elif isinstance(node, ast.Call):
            func = node.func
            called = (func.id if isinstance(func, ast.Name)
                      else func.attr if isinstance(func, ast.Attribute) else None)
            if called not in DYNAMIC_IMPORTS:
                continue
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                if _forbidden(arg.value) or arg.value.startswith("."):
                    found.add(arg.value)
            else:
                found.add(f"{called}(<computed name>)")
    return found


def _module_name(path: Path) -> str:
    return f"{CORE_PACKAGE}.{path.stem}"  # __init__.py: vipd.core.__init__, as documented


def _core_files() -> list[Path]:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 4, "expected the core modules under vipd/core"
    return files


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_module_imports_no_io_or_clock(path: Path) -> None:
    bad = forbidden_imports(path.read_text(), _module_name(path))
    assert not bad, f"{path.name} imports {sorted(bad)}; the core must stay pure"


# --- the guard itself ----------------------------------------------------------------

CAUGHT = [
    ("import time", {"time"}),
    ("from asyncio import sleep", {"asyncio"}),
    ("import os.path", {"os.path"}),
    ("import socket as s", {"socket"}),
    ("import vipd.daemon", {"vipd.daemon"}),
    ("import vipd.daemon as d", {"vipd.daemon"}),
    ("from vipd import daemon", {"vipd.daemon"}),
    ("from vipd import errors, metrics", {"vipd.metrics"}),
    ("from vipd.vip import NetlinkMover", {"vipd.vip"}),
    ("from .. import daemon", {"vipd.daemon"}),
    ("from ..daemon import Daemon", {"vipd.daemon"}),
    ("from ..transport import *", {"vipd.transport"}),
    ("from ... import anything", {"..."}),  # beyond vipd: unresolvable, never allowed
    ("import vipd.corex", {"vipd.corex"}),  # a prefix of a name is not the package
    ("def f():\n    import threading\n", {"threading"}),
    ("import importlib\nimportlib.import_module('socket')", {"importlib", "socket"}),
    ("__import__('asyncio')", {"asyncio"}),
    ("__import__(name)", {"__import__(<computed name>)"}),
]


@pytest.mark.parametrize(("snippet", "caught"), CAUGHT, ids=[s for s, _ in CAUGHT])
def test_the_guard_catches_a_forbidden_import(snippet: str, caught: set[str]) -> None:
    assert forbidden_imports(snippet, "vipd.core.election") == caught


@pytest.mark.parametrize("snippet", [
    "from __future__ import annotations",
    "import enum, struct, hmac",
    "from dataclasses import dataclass",
    "from . import protocol",
    "from .protocol import Advert",
    "from vipd.core import events",
    "from vipd.core.events import Action",
    "import vipd.core.protocol",
    "from vipd.errors import VipdError",
    "from vipd import errors, core",
    "from ..errors import VipdError",
    "from ..core import health",
], ids=str)
def test_the_guard_allows_the_core_and_errors(snippet: str) -> None:
    assert forbidden_imports(snippet, "vipd.core.election") == set()


def test_relative_imports_resolve_against_the_package_of_the_file() -> None:
    # In vipd/core/__init__.py `from . import x` is vipd.core.x, `from .. import x`
    # is vipd.x: the package's own file resolves against itself.
    init = "vipd.core.__init__"
    assert forbidden_imports("from . import protocol", init) == set()
    assert forbidden_imports("from .. import daemon", init) == {"vipd.daemon"}
    assert _module_name(CORE / "__init__.py") == init
    assert _module_name(CORE / "election.py") == "vipd.core.election"
