"""The runtime side of flap damping (vipd/core/damping.py), shared by both drivers: the
failures and the running mark a start finds in the state file, and each notice of the
election logged, counted and persisted."""

from __future__ import annotations

import logging
import time
from typing import Any

from vipd.core.damping import Damper, DampingChanged
from vipd.metrics import Metrics
from vipd.statefile import StateFile, flaps_from_json, flaps_to_json

log = logging.getLogger(__name__)


def restored(saved: dict[str, Any]) -> tuple[Damper, bool]:
    """The damper with the failures of earlier runs (at loop times: the loop clock is
    time.monotonic()), and whether the last run ended without a clean stop."""
    flaps = flaps_from_json(saved.get("flaps"), time.monotonic(), time.time())
    return Damper(flaps), saved.get("running") is True


def report(notice: DampingChanged, damper: Damper, now: float, state_file: StateFile,
           metrics: Metrics) -> None:
    """One log line per failure and when damping lifts; a new failure is counted and
    written to the state file at once (a crash right after must not forget it)."""
    if notice.flap is not None:
        metrics.flaps.labels(notice.flap.cause.value).inc()
        state_file.save(flaps=flaps_to_json(damper.flaps, now, time.time()))
    (log.warning if notice.damped else log.info)("flap damping: %s", notice.reason)
