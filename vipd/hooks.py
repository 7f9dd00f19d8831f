"""Operator hooks: the programs a transition runs (config `hooks`), as background tasks.

A hook never delays the election: it runs in its own task, as the exec user (no
capabilities), with the transition's facts in its environment and a timeout. At exit the
runtime lets running hooks finish within the stop budget, then kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from vipd.config import Config
from vipd.core.events import RunHook
from vipd.metrics import Metrics

log = logging.getLogger(__name__)


class HookRunner:
    def __init__(self, config: Config, metrics: Metrics,
                 preexec: Callable[[], None] | None) -> None:
        self.config = config  # replaced on reload
        self._metrics = metrics
        self.preexec = preexec  # set at start, once vipd's own privileges are settled
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, hook: RunHook) -> None:
        task = asyncio.create_task(self._run(hook), name=f"hook {hook.hook}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self, budget: float) -> None:
        """Let running hooks end within ``budget`` seconds, then kill the rest."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=max(budget, 0.05))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, hook: RunHook) -> None:
        argv = self.config.hooks.argv(hook.hook)
        if not argv:
            return
        cfg = self.config
        env = {**os.environ, "VIPD_STATE": hook.state.name, "VIPD_TERM": str(hook.term),
               "VIPD_NODE": cfg.node, "VIPD_CLUSTER": cfg.cluster,
               "VIPD_VIPS": " ".join(map(str, cfg.vips))}
        count = self._metrics.hooks
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True, preexec_fn=self.preexec)
        except OSError as exc:
            log.error("hook %s %s could not start: %s", hook.hook, argv[0], exc)
            count.labels(hook.hook, "not_started").inc()
            return
        try:
            code = await asyncio.wait_for(proc.wait(), cfg.hooks.timeout)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            log.error("hook %s %s killed: vipd is exiting", hook.hook, argv[0])
            count.labels(hook.hook, "killed").inc()
            raise
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            log.error("hook %s %s killed after %.1fs", hook.hook, argv[0], cfg.hooks.timeout)
            count.labels(hook.hook, "timeout").inc()
            return
        count.labels(hook.hook, "ok" if code == 0 else "failed").inc()
        level = logging.INFO if code == 0 else logging.ERROR
        log.log(level, "hook %s %s exited %d", hook.hook, argv[0], code)
