"""The value types of the YAML config: durations, names, addresses, endpoints, argv lists
and paths, each validated with a message that says what was expected. The models built
from them are in vipd/config.py."""

from __future__ import annotations

import math
import re
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_interface,
)
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    Strict,
    ValidationInfo,
)
from pydantic_core import core_schema

from vipd import credentials

# A relative path is relative to the directory of the config file (set by load_config).
BASE_DIR = "base_dir"


class Problems(ValueError):
    """Raised by cross-field checks to report problems at key paths below the model."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key_path(loc) or '.'}: {msg}" for loc, msg in problems))


def key_path(loc: tuple[str | int, ...]) -> str:
    """Render a pydantic location as the key path an operator sees: ``heartbeat.peers[0]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- scalar types -------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m)?")
_SCALE = {None: 1.0, "s": 1.0, "m": 60.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "150ms", "2s", "1.5s", "1m"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value.strip())):
        number, unit = match.groups()
        # Divide rather than multiply by 0.001 so that "150ms" is exactly 150 / 1000.
        seconds = float(number) / 1000 if unit == "ms" else float(number) * _SCALE[unit]
    else:
        raise ValueError(
            f"expected a duration like 150ms, 2s or a number of seconds, got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration of 0 seconds or more, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """The short form used in messages: 40ms, 320ms, 2s, 1.5s."""
    if 0 < seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    return f"{round(seconds, 3):g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[Duration, Field(gt=0)]
StrictBool = Annotated[bool, Strict()]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]


class Endpoint(NamedTuple):
    """An IP address and UDP/TCP port, written "192.0.2.1:5405" or "[2001:db8::1]:5405"."""

    host: IPv4Address | IPv6Address
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.host.version == 6 else \
            f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        expected = f"expected host:port with an IP address, like 192.0.2.1:5405, got {text!r}"
        host, sep, port = text.strip().rpartition(":")
        if not sep or not port.isascii() or not port.isdigit():
            raise ValueError(expected)
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, like [2001:db8::1]:5405, "
                             f"got {text!r}")
        try:
            addr = ip_address(host)
        except ValueError:
            raise ValueError(expected) from None
        if bracketed and addr.version == 4:
            raise ValueError(f"brackets are only for IPv6 addresses, got {text!r}")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port must be 1..65535, got {text!r}")
        return cls(addr, int(port))

    @classmethod
    def _from_config(cls, value: object) -> Endpoint:
        if isinstance(value, Endpoint):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected host:port as a string, like 192.0.2.1:5405, "
                             f"got {value!r}")
        return cls.parse(value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._from_config,
            serialization=core_schema.plain_serializer_function_ser_schema(str))


_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"expected 1..64 characters of A-Z a-z 0-9 . _ -, got {value!r}")
    return value


def _check_ifname(value: str) -> str:
    # The kernel's dev_valid_name(), plus ASCII so that 15 characters are 15 bytes.
    if (not 1 <= len(value) <= 15 or value in (".", "..") or not value.isascii()
            or any(c in "/:" or c.isspace() for c in value)):
        raise ValueError(f"expected a Linux interface name (1..15 characters, no '/', ':' "
                         f"or spaces), got {value!r}")
    return value


_BAD_VIP = (("is_unspecified", "the unspecified"), ("is_loopback", "a loopback"),
            ("is_multicast", "a multicast"), ("is_link_local", "a link-local"))


def _parse_vip(value: object) -> IPv4Interface | IPv6Interface:
    if isinstance(value, IPv4Interface | IPv6Interface):
        iface = value
    elif isinstance(value, str):
        try:
            iface = ip_interface(value.strip())
        except ValueError:
            raise ValueError(f"expected an IP address or address/prefix, like "
                             f"198.51.100.10/32, got {value!r}") from None
    else:
        raise ValueError(f"expected an IP address or address/prefix as a string, "
                         f"got {value!r}")
    for attr, what in _BAD_VIP:
        if getattr(iface.ip, attr):
            raise ValueError(f"{iface.ip} is {what} address; a VIP must be a unicast address")
    return iface


def _check_argv(argv: list[str]) -> list[str]:
    # Hooks and exec probes run without a shell and without PATH lookup.
    if argv and not argv[0].startswith("/"):
        raise Problems([((0,), f"expected an absolute path to the program, "
                                f"got {argv[0]!r}")])
    return argv


def check_command(argv: list[str]) -> list[str]:
    if not argv:
        raise ValueError('expected a non-empty argv list, like ["/usr/local/bin/check"]')
    return argv


def _nonempty_path(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("expected a file path, got an empty string")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get(BASE_DIR)
    return Path(base) / value if base is not None and not value.is_absolute() else value


Name = Annotated[str, AfterValidator(_check_name)]
InterfaceName = Annotated[str, AfterValidator(_check_ifname)]
Vip = Annotated[IPv4Interface | IPv6Interface, PlainValidator(_parse_vip)]
Argv = Annotated[list[str], AfterValidator(_check_argv)]
ConfigPath = Annotated[Path, BeforeValidator(_nonempty_path), AfterValidator(_resolve_path)]


def _resolve_secret(value: Path, info: ValidationInfo) -> Path:
    name = credentials.name_of(value)
    if name is None:
        return _resolve_path(value, info)
    credentials.check_name(name)
    return value  # read from $CREDENTIALS_DIRECTORY (vipd.credentials.locate)


# A secret file: a path, or `credential:NAME` (a systemd credential, vipd/credentials.py).
SecretPath = Annotated[Path, BeforeValidator(_nonempty_path), AfterValidator(_resolve_secret)]
