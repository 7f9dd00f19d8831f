"""What a reload (SIGHUP) may change: read the new files, and refuse what needs a restart.

The checks here decide; the supervisor applies an accepted reload (tokens to the API,
checks to a new health monitor, keys and election settings to the driver, which hands
the latter to the election as a Reconfigure event).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from vipd.config import Config, load_config
from vipd.control import tls_context
from vipd.core.protocol import KeyRing
from vipd.errors import VipdError
from vipd.keys import load_keys
from vipd.tokens import Token, load_tokens
from vipd.webconfig import WebSecurity, load_web_config

# Settings that cannot change by reload (exec_user is resolved against vipd's own
# privileges once, at start; the arbiter and the fence decide what the votes and the gate
# are, which both nodes must change together, by restarts).
FIXED_SETTINGS = ("cluster", "node", "interface", "vips", "heartbeat", "state_dir", "metrics",
                  "audit", "exec_user", "arbiter", "fence", "movers")


@dataclass(frozen=True)
class Reload:
    config: Config
    keys: KeyRing | None  # the heartbeat keys of a pair (a group has none)
    tokens: list[Token] | None
    health_changed: bool
    web: WebSecurity | None = None  # metrics.web_config_file read again (None: there is none)
    api_tls: ssl.SSLContext | None = None  # api.tls's files read again (None: no TLS)


class ReloadError(VipdError):
    """The new config cannot be used; ``result`` is the metric label (error, refused)."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


def read_reload(path: Path, running: Config) -> Reload:
    """The config at ``path`` as a reload of ``running``; raises ReloadError."""
    try:
        new = load_config(path)
        keys = KeyRing(load_keys(new.key_file)) if new.auth is not None else None
        tokens = load_tokens(new.api.tokens_file) if new.api.tokens_file is not None else None
        web_file = new.metrics.web_config_file
        web = load_web_config(web_file) if web_file is not None else None
        api_tls = tls_context(new.api)  # the same paths; a renewed certificate
    except (VipdError, ValueError) as exc:
        raise ReloadError("error", f"reload failed, keeping the running config: {exc}") \
            from exc
    changed = [k for k in FIXED_SETTINGS if getattr(new, k) != getattr(running, k)]
    if (new.api.listen, new.api.tls) != (running.api.listen, running.api.tls):
        changed.append("api.listen/api.tls")
    if changed:
        raise ReloadError("refused", f"reload refused: {', '.join(changed)} cannot change "
                                     f"while running; restart vipd")
    return Reload(new, keys, tokens, health_changed=(
        (new.health, new.track_interface) != (running.health, running.track_interface)),
        web=web, api_tls=api_tls)
