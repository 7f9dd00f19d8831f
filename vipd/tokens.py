"""API bearer tokens: the file holds "NAME ROLE SHA256-OF-TOKEN" lines, never a token.

A token is shown once, when `vipctl token new` makes it. The daemon hashes what a client
presents and compares it with every stored hash in constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from vipd.errors import ConfigError
from vipd.keys import read_private_file

_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")


class Role(enum.StrEnum):
    READ = "read"  # status only
    OPERATE = "operate"  # status and every mutating request


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    role: Role
    digest: str  # sha256 hex of the token


def hash_token(token: str) -> str:
    # A header with non-ASCII bytes arrives with surrogates: it simply matches no token.
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def new_token(name: str, role: str) -> tuple[str, str]:
    """A fresh token and the line to add to the tokens file."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"token name {name!r}: expected 1..64 of [A-Za-z0-9._@-]")
    Role(role)
    token = "vipd_" + secrets.token_urlsafe(32)
    return token, f"{name} {role} {hash_token(token)}"


def load_tokens(path: str | Path) -> list[Token]:
    file = str(path)
    text = read_private_file(path, "tokens file")
    tokens: list[Token] = []
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3:
            problems.append(("", f"line {lineno}: expected 'NAME ROLE SHA256', "
                                 f"got {len(fields)} fields"))
            continue
        name, role, digest = fields
        before = len(problems)
        if not _NAME_RE.fullmatch(name):
            problems.append(("", f"line {lineno}: bad token name (1..64 of [A-Za-z0-9._@-])"))
        elif name in names:
            problems.append(("", f"line {lineno}: token name {name!r} appears twice"))
        if role not in Role.__members__.values():
            problems.append(("", f"line {lineno}: role must be 'read' or 'operate'"))
        if not _HASH_RE.fullmatch(digest):
            problems.append(("", f"line {lineno}: expected the SHA-256 of the token as 64 "
                                 "lowercase hex digits (vipctl token new prints the line)"))
        if len(problems) == before:
            names.add(name)
            tokens.append(Token(name, Role(role), digest))
    if problems:
        raise ConfigError(file, problems)
    return tokens


def authenticate(tokens: list[Token], presented: str) -> Token | None:
    """The token whose hash matches, compared in constant time against every entry."""
    digest = hash_token(presented)
    found = None
    for token in tokens:
        if hmac.compare_digest(token.digest, digest):
            found = token
    return found
