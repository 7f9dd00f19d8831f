"""The one error hierarchy of vipd; every message names the thing and what was expected."""

from __future__ import annotations


class VipdError(Exception):
    """Base of every error vipd raises on purpose."""


class ConfigError(VipdError):
    """A config, key or tokens file is missing, unreadable, unsafe or invalid.

    ``problems`` holds one ``(key_path, message)`` pair per problem so that the CLI can
    print every one of them as ``FILE: key.path: message``.
    """

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.file}: {path}: {msg}" if path else f"{self.file}: {msg}"
                for path, msg in self.problems]


class VipError(VipdError):
    """Adding, removing or announcing a VIP failed (interface missing, permission denied)."""
