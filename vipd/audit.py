"""The audit trail: one JSON line per operator request, accepted or refused.

Appended with O_APPEND to a 0600 file so that concurrent writers cannot interleave
partial lines; each line is flushed before the API answers. Never contains a token.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **entry: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", **entry}
        line = json.dumps(record, sort_keys=False, default=str) + "\n"
        log.info("audit: %s by %s from %s: %s (%s)", entry.get("action"), entry.get("token"),
                 entry.get("source"), entry.get("result"), entry.get("message", ""))
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write audit log %s: %s; entry: %s", self.path, exc, line.strip())
