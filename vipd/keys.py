"""Heartbeat key files ("ID SECRET" lines) and the private-file rules they share with
the API tokens file. Secrets never appear in an error message."""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import stat
import time
from pathlib import Path

from vipd import credentials
from vipd.core.protocol import MAX_KEY_ID, MIN_KEY_BYTES
from vipd.errors import ConfigError

_HEX_RE = re.compile(r"[0-9a-fA-F]+")


def read_private_file(path: str | Path, what: str) -> str:
    """The text of a secrets file (keys, tokens), refused if group/others can access it;
    ``path`` may be `credential:NAME` (a systemd credential, vipd/credentials.py)."""
    file = str(path)
    try:
        path = credentials.locate(path)
    except credentials.CredentialError as exc:
        raise ConfigError(file, [("", str(exc))]) from None
    try:
        # O_NONBLOCK so that a FIFO in place of the file cannot hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(file, [("", f"{what} is not a regular file")])
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ConfigError(file, [("", f"mode {mode:04o} gives access to "
                                              f"group/others; run chmod 600 {file}")])
            data = fh.read()
    except OSError as exc:
        raise ConfigError(file, [("", f"cannot read {what}: {exc.strerror or exc}")]) \
            from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(file, [("", f"{what} is not UTF-8 text")]) from None


def load_keys(path: str | Path) -> dict[int, bytes]:
    """Heartbeat keys from a file of "ID SECRET" lines; secrets never appear in errors."""
    file = str(path)
    text = read_private_file(path, "key file")
    keys, problems = _parse_keys(text)
    if not keys and not problems:
        problems.append(("", "no keys found; expected lines 'ID SECRET' "
                             "(make one with: vipd keygen)"))
    if problems:
        raise ConfigError(file, problems)
    return keys


def _parse_keys(text: str) -> tuple[dict[int, bytes], list[tuple[str, str]]]:
    keys: dict[int, bytes] = {}
    first_line: dict[int, int] = {}
    problems: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()  # '#' never occurs in hex or base64
        if not fields:
            continue
        # Never echo a field: a line with the fields swapped would print the secret.
        if len(fields) != 2:
            problems.append(("", f"line {lineno}: expected 'ID SECRET', "
                                 f"got {len(fields)} fields"))
            continue
        id_text, secret_text = fields
        key_id = int(id_text) if id_text.isascii() and id_text.isdigit() else 0
        if not 1 <= key_id <= MAX_KEY_ID:
            problems.append(("", f"line {lineno}: key id must be an integer in "
                                 f"1..{MAX_KEY_ID}"))
            continue
        if key_id in first_line:
            problems.append(("", f"line {lineno}: duplicate key id {key_id} "
                                 f"(also on line {first_line[key_id]})"))
            continue
        first_line[key_id] = lineno
        secret = _decode_secret(secret_text)
        if secret is None:
            problems.append(("", f"line {lineno}: secret of key {key_id} is neither hex "
                                 f"nor base64"))
        elif len(secret) < MIN_KEY_BYTES:
            problems.append(("", f"line {lineno}: secret of key {key_id} is {len(secret)} "
                                 f"bytes; at least {MIN_KEY_BYTES} are needed "
                                 f"(make one with: vipd keygen)"))
        else:
            keys[key_id] = secret
    return keys, problems


def _decode_secret(text: str) -> bytes | None:
    # Hex wins when a secret could be both; keygen's base64 always ends in "=".
    if _HEX_RE.fullmatch(text) and len(text) % 2 == 0:
        return bytes.fromhex(text)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def generate_key_line(key_id: int | None = None) -> str:
    """A fresh "ID SECRET" line; the default id is the current Unix time so that a newer
    key gets a higher id (the protocol signs with the highest id both nodes know)."""
    if key_id is None:
        key_id = int(time.time())
    if not 1 <= key_id <= MAX_KEY_ID:
        raise ValueError(f"key id must be in 1..{MAX_KEY_ID}, got {key_id}")
    secret = base64.b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode("ascii")
    return f"{key_id} {secret}"
