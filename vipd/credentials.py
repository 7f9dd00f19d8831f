"""Secrets as systemd credentials: `key_file: credential:web.key` and the like.

systemd hands a unit its credentials in `$CREDENTIALS_DIRECTORY` (a private, read-only
tmpfs the service user alone can read), decrypted from files made with
`systemd-creds encrypt` (bound to the host key and a TPM2 where present) by
`LoadCredentialEncrypted=NAME`, or copied by `LoadCredential=NAME` (docs/install.md). A
secret is then never plaintext on disk. Every secret setting accepts either a path or
`credential:NAME`; the readers (vipd.keys.read_private_file, the TLS contexts) ask
`locate()` for the file to open.

Outside the unit (`vipd check-config`, `install-check`) there is no such directory: a
credential is then looked up where systemd itself searches for `NAME` (the credstores),
so an operator can see whether it exists and whether it is encrypted at rest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PREFIX = "credential:"
ENV = "CREDENTIALS_DIRECTORY"
# Where LoadCredential=NAME / LoadCredentialEncrypted=NAME look for a relative name
# (systemd.exec(5)), in its order; the encrypted ones first.
ENCRYPTED_STORES = (Path("/etc/credstore.encrypted"), Path("/run/credstore.encrypted"),
                    Path("/usr/lib/credstore.encrypted"))
PLAIN_STORES = (Path("/etc/credstore"), Path("/run/credstore"), Path("/usr/lib/credstore"))
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,255}$")


class CredentialError(FileNotFoundError):
    """A credential named in the config cannot be read here; says where it was looked for
    (an OSError, so every reader's "cannot read" path reports it)."""


def name_of(path: str | Path) -> str | None:
    """The credential's name if ``path`` is `credential:NAME`, else None."""
    text = str(path)
    return text[len(PREFIX):] if text.startswith(PREFIX) else None


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"credential name {name!r}: expected 1-255 of A-Z a-z 0-9 _ . @ - "
                         "(the NAME of LoadCredentialEncrypted=NAME), no /")
    return name


def locate(path: str | Path) -> Path:
    """The file to read for a secret setting: the path itself, or for `credential:NAME`
    the file systemd put in $CREDENTIALS_DIRECTORY. Raises CredentialError."""
    name = name_of(path)
    if name is None:
        return Path(path)
    directory = os.environ.get(ENV)
    if directory:
        found = Path(directory) / name
        if not found.exists():
            raise CredentialError(
                f"credential {name} is not in ${ENV} ({directory}): the unit needs "
                f"LoadCredentialEncrypted={name} (or LoadCredential={name}); see "
                "docs/install.md")
        return found
    where = stored(name)
    if where is not None and not where.encrypted:
        return where.path
    raise CredentialError(outside_unit(name, where))


@dataclass(frozen=True, slots=True)
class Stored:
    """Where a credential lies at rest (outside the unit)."""

    path: Path
    encrypted: bool


def stored(name: str) -> Stored | None:
    """The file systemd would load for NAME, searching the credstores (None: none)."""
    for store, encrypted in ([(s, True) for s in ENCRYPTED_STORES]
                             + [(s, False) for s in PLAIN_STORES]):
        if (store / name).is_file():
            return Stored(store / name, encrypted)
    return None


def outside_unit(name: str, where: Stored | None) -> str:
    """Why a credential cannot be read outside the unit: missing, or encrypted."""
    if where is None:
        stores = ", ".join(str(s) for s in ENCRYPTED_STORES[:1] + PLAIN_STORES[:1])
        return (f"credential {name}: ${ENV} is not set (systemd sets it inside the unit) "
                f"and no {name} is in {stores}: make it with `systemd-creds encrypt "
                f"--name={name} SECRET_FILE /etc/credstore.encrypted/{name}` "
                "(docs/install.md)")
    return (f"credential {name}: encrypted at rest in {where.path}; only systemd decrypts "
            "it, for the unit (LoadCredentialEncrypted=)")


def encrypted_at_rest(path: str | Path) -> bool:
    """Outside the unit: whether an encrypted copy of this credential is where systemd
    looks (check-config accepts it without reading it)."""
    name = name_of(path)
    where = stored(name) if name is not None else None
    return where is not None and where.encrypted
