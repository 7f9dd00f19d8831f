"""Commands vipd runs (exec health checks, hooks) never get vipd's capabilities.

Under the systemd unit vipd is an unprivileged user holding CAP_NET_ADMIN and CAP_NET_RAW
as *ambient* capabilities, which survive execve: every child would inherit them. So each
child clears its ambient set before exec; with no file capabilities it then runs with
none. When vipd itself runs as root (outside the unit), children switch to `exec_user`
(default "nobody"), which also drops every capability; `exec_user: root` keeps uid 0 but
drops every capability, for checks that must read root-only files. Children also get
no_new_privs, so a setuid binary cannot bring privileges back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass

from vipd.errors import VipdError

log = logging.getLogger(__name__)

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_EINVAL = 22
DEFAULT_ROOT_EXEC_USER = "nobody"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _prctl(option: int, arg: int, what: str, *, einval_ok: bool = False) -> bool:
    if _libc.prctl(option, arg, 0, 0, 0) == 0:
        return True
    err = ctypes.get_errno()
    if einval_ok and err == _EINVAL:
        return False
    raise OSError(err, f"prctl({what})")


def _drop_every_capability() -> None:
    """Bounding set, then effective/permitted/inheritable: uid 0 without any power."""
    for cap in range(64):
        if not _prctl(PR_CAPBSET_DROP, cap, "PR_CAPBSET_DROP", einval_ok=True):
            break  # past the last capability this kernel knows
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset(0)")


class PrivilegeError(VipdError):
    """exec_user cannot be honoured (unknown user, or vipd may not switch users)."""


@dataclass(frozen=True, slots=True)
class ExecUser:
    """Who children run as: None = vipd's own (unprivileged) user."""

    name: str | None
    uid: int | None = None
    gid: int | None = None

    def preexec(self) -> Callable[[], None] | None:
        """Runs in the child between fork and exec: only syscalls. None for an
        unprivileged vipd: `shed_inheritable_capabilities` made that unnecessary, and
        without a preexec function Python spawns children the fast way (no full fork)."""
        uid, gid = self.uid, self.gid
        if uid is None:
            return None

        def drop() -> None:
            # A kernel without ambient capabilities (EINVAL) has none to clear.
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL",
                   einval_ok=True)
            if uid == 0:
                _drop_every_capability()
            elif uid is not None and gid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)  # from root to another user: every capability goes too
            _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")  # no setuid comeback

        return drop


def shed_inheritable_capabilities() -> None:
    """In the daemon itself, once: keep CAP_NET_ADMIN/CAP_NET_RAW effective for vipd,
    but clear the ambient and inheritable sets so no child can receive them, and set
    no_new_privs so no setuid binary run by a child brings privileges back."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "PR_CAP_AMBIENT_CLEAR_ALL",
           einval_ok=True)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    if data[0].inheritable or data[1].inheritable:
        data[0].inheritable = data[1].inheritable = 0
        if _libc.capset(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), "capset(inheritable=0)")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")


def resolve_exec_user(configured: str | None) -> ExecUser:
    """The user for exec checks and hooks, given vipd's own identity."""
    if os.geteuid() == 0:
        name = configured or DEFAULT_ROOT_EXEC_USER
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise PrivilegeError(f"exec_user {name!r}: no such user (expected an existing "
                                 "unprivileged user to run exec checks and hooks)") from None
        if entry.pw_uid == 0:
            log.warning("exec_user %s: exec checks and hooks run as uid 0 with every "
                        "capability dropped; an unprivileged user is safer", name)
        return ExecUser(name, entry.pw_uid, entry.pw_gid)
    me = pwd.getpwuid(os.geteuid()).pw_name
    if configured not in (None, me):
        raise PrivilegeError(f"exec_user {configured!r}: vipd runs as {me!r} and may not "
                             "switch users; its commands already run as that user with no "
                             "capabilities. Remove exec_user or run vipd as root.")
    try:
        shed_inheritable_capabilities()
    except OSError as exc:
        raise PrivilegeError(f"cannot keep vipd's capabilities from its children: {exc}") \
            from exc
    return ExecUser(None)
