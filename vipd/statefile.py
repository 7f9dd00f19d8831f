"""The state that must survive a restart: the term (a fencing token that never goes
back), the maintenance flag (an operator's drain outlives the process), and for flap
damping whether the daemon was running (a start that finds it set follows an unclean
exit) and its recent failures (wall-clock times: the loop clock starts over)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from vipd.core.damping import Cause, Flap

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
        """Update the given values, keep the others; write only what changed: this runs
        on the loop at every transition, on a takeover's way to acquiring the VIPs."""
        values = {**(self._saved or {}), **values}
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


def flaps_to_json(flaps: list[Flap], now: float, wall: float) -> list[dict[str, Any]]:
    """Failures at loop times as wall-clock records (``now``: loop time, ``wall``: time.time())."""
    return [{"at": round(wall - (now - f.at), 3), "cause": f.cause.value, "detail": f.detail}
            for f in flaps]


def flaps_from_json(saved: Any, now: float, wall: float) -> list[Flap]:
    """The records of `flaps_to_json` at loop times; malformed ones are skipped (a state
    file is ours, but may be from another version)."""
    flaps = []
    for record in saved if isinstance(saved, list) else []:
        try:
            at, cause = float(record["at"]), Cause(record["cause"])
            detail = str(record.get("detail", ""))
        except (KeyError, TypeError, ValueError):
            continue
        flaps.append(Flap(now - (wall - at), cause, detail))
    return sorted(flaps, key=lambda f: f.at)
