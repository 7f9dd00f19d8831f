"""Loaded by every Python process whose PYTHONPATH starts with this directory (the soak's
daemons with `python -m simulations.soak --tracemalloc`): traces the heap's allocations
and, every VIPD_TRACEMALLOC_EVERY seconds, writes to VIPD_TRACEMALLOC_DIR/PID.txt what
grew since the first dump, by the line that allocated it. Python's own heap only: a
growth of RSS that this does not show is outside Python objects (C libraries, malloc's
arenas)."""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from pathlib import Path

_OUT = os.environ.get("VIPD_TRACEMALLOC_DIR")


def _rss_kb() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])


def _dump_forever(out: Path, every: float) -> None:
    # the code of imported modules (most of the traces, and permanent): left out, so a
    # snapshot costs little memory of its own
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, __file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    base = None
    start = time.monotonic()
    first_rss = _rss_kb()
    while True:
        time.sleep(every)
        snap = tracemalloc.take_snapshot().filter_traces(ignore)
        if base is None:
            base, first_rss, start = snap, _rss_kb(), time.monotonic()
            continue
        rss, anon = _rss_kb()
        traced = sum(s.size for s in snap.statistics("filename"))
        was = sum(s.size for s in base.statistics("filename"))
        lines = [f"after {time.monotonic() - start:.0f} s since the first dump: RSS "
                 f"{first_rss[0]} -> {rss} KB, anonymous {first_rss[1]} -> {anon} KB, "
                 f"traced by tracemalloc {was // 1024} -> {traced // 1024} KB", ""]
        for stat in snap.compare_to(base, "lineno")[:25]:
            lines.append(str(stat))
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(out)


if _OUT:
    tracemalloc.start(1)
    threading.Thread(target=_dump_forever, daemon=True, name="tracemalloc dump",
                     args=(Path(_OUT) / f"{os.getpid()}.txt",
                           float(os.environ.get("VIPD_TRACEMALLOC_EVERY", "60")))).start()
