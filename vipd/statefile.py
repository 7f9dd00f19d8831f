"""The state that must survive a restart: the term (a fencing token that never goes
back) and the maintenance flag (an operator's drain outlives the process)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StateFile:
    """Term and maintenance flag survive restarts (term: fencing; maintenance: drain)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "state.json"
        self._warned = False
        self._saved: dict[str, Any] | None = None

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        self._saved = data
        return data

    def save(self, **values: Any) -> None:
        """Write only what changed: this runs on the loop at every transition, on a
        takeover's way to acquiring the VIPs."""
        if values == self._saved:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(values))
            os.replace(tmp, self.path)
            self._saved = values
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write state file %s: %s (term and maintenance will not "
                            "survive a restart)", self.path, exc)
                self._warned = True
