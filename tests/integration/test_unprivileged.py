"""vipd without root: an unprivileged user holding only CAP_NET_ADMIN and CAP_NET_RAW.

What the systemd unit does (User=, AmbientCapabilities=, CapabilityBoundingSet=,
NoNewPrivileges=), done with setpriv inside the namespace lab: both daemons run as
``nobody`` with exactly those two capabilities (ambient, so they survive the exec of the
interpreter), fail over when the active is SIGKILLed, announce (gratuitous ARP and
unsolicited NA need CAP_NET_RAW), and release the VIPs on SIGTERM; `vipd release` (the
unit's ExecStopPost) works unprivileged too. Their hooks run with no capability at all.

The daemons run the tests' own interpreter path, ``sys.executable`` (a virtualenv's
``bin/python`` stays a virtualenv's: Python finds its ``pyvenv.cfg`` from that path, not
from the symlink's target). What that interpreter needs (each hop of its symlinks, its
prefixes, every ``sys.path`` entry: the venv's site-packages, the base installation,
the editable install) may sit below a directory ``nobody`` cannot traverse, e.g. /root
(0700) holding a pyenv interpreter. Nothing outside this test's temp dir is changed:
each daemon then runs in a private mount namespace (made inside the lab namespace's own,
so /sys stays that namespace's) where every such directory is a fresh 0755 tmpfs with
only the entries on those paths bound back in, from a stash of the originals on a
private tmpfs over TMP/pyenv. For a pyenv interpreter (outermost hidden directories
first, nested ones the same way):

    ip netns exec NS unshare --mount --propagation private -- /bin/sh -c '
        mount -t tmpfs -o mode=0700 tmpfs TMP/pyenv &&
        mkdir TMP/pyenv/0 && mount --bind /root TMP/pyenv/0 &&
        mount -t tmpfs -o mode=0755 tmpfs /root &&
        mkdir /root/.pyenv && mount --bind TMP/pyenv/0/.pyenv /root/.pyenv &&
        exec "$@"
    ' sh setpriv --reuid=65534 --regid=65534 --clear-groups
        --inh-caps=-all,+net_admin,+net_raw --ambient-caps=-all,+net_admin,+net_raw
        --bounding-set=-all,+net_admin,+net_raw --no-new-privs --
        PYTHON -m vipd.cli run -c TMP/node1.yaml

``unshare`` and ``ip netns exec`` exec (no fork), so the spawned pid is the daemon's.
The daemons' files live in a /tmp/vipd-unpriv-* directory (0711) removed afterwards.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import vipd
from support.netns import Lab, poke
from vipd.keys import generate_key_line

pytestmark = pytest.mark.netns

VIP4 = "198.51.100.100"
VIP6 = "2001:db8:1::100"
PORT = 5405
USER = "nobody"
TWO_CAPS = f"{(1 << 12) | (1 << 13):016x}"  # CAP_NET_ADMIN (12), CAP_NET_RAW (13)
NO_CAPS = "0" * 16
FAILOVER = 5.0
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
PYTHON = sys.executable  # the path the tests run with (a venv's python, a symlink, stays one)


def others_can_traverse(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))


def interpreter_paths() -> set[Path]:
    """Every path the interpreter needs: each hop of its symlinks, its prefixes, and
    sys.path (its site-packages, a virtualenv's and the base installation's)."""
    paths: set[Path] = set()
    hop = Path(os.path.abspath(PYTHON))
    for _ in range(40):  # the kernel's own limit on symlink hops
        paths.add(hop)
        if not hop.is_symlink():
            break
        hop = Path(os.path.normpath(hop.parent / os.readlink(hop)))
    paths.add(Path(os.path.realpath(PYTHON)))
    for entry in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                  *sys.path):
        if entry and os.path.isabs(entry) and os.path.exists(entry):
            paths |= {Path(entry), Path(os.path.realpath(entry))}
    return paths


def hidden_dirs() -> dict[Path, set[str]]:
    """The directories on those paths that others cannot traverse, each with its entries
    that lead to them (empty: the interpreter is reachable by USER as it is)."""
    hidden: dict[Path, set[str]] = {}
    for path in interpreter_paths():
        for parent in reversed(path.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                hidden.setdefault(parent, set()).add(path.relative_to(parent).parts[0])
    return hidden


def mount_script(stash: Path, hidden: dict[Path, set[str]]) -> str:
    """sh commands that replace each hidden directory (outermost first) with a 0755 tmpfs
    holding only its needed entries, bound back from a stash of the original on a private
    tmpfs over ``stash``, then exec "$@"."""
    q = shlex.quote
    steps = [f"mount -t tmpfs -o mode=0700 tmpfs {q(str(stash))}"]
    for i, directory in enumerate(sorted(hidden, key=lambda d: len(d.parts))):
        saved = stash / str(i)
        steps += [f"mkdir {q(str(saved))}", f"mount --bind {q(str(directory))} {q(str(saved))}",
                  f"mount -t tmpfs -o mode=0755 tmpfs {q(str(directory))}"]
        for name in sorted(hidden[directory]):
            target = directory / name
            make = "mkdir" if target.is_dir() else ": >"
            steps += [f"{make} {q(str(target))}",
                      f"mount --bind {q(str(saved / name))} {q(str(target))}"]
    return " && ".join([*steps, 'exec "$@"'])


class Setup:
    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.dir = workdir
        user = pwd.getpwnam(USER)
        self.uid, self.gid = user.pw_uid, user.pw_gid
        self.key = self._private_file("pair.key", generate_key_line(1) + "\n")
        self.hooks = workdir / "hooks"
        self.hooks.mkdir()
        self.hooks.chmod(0o777)  # world-writable: the hooks run as the unprivileged user
        self.pyenv = workdir / "pyenv"  # mount point for the stash of hidden directories
        self.pyenv.mkdir(mode=0o711)
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def _private_file(self, name: str, text: str) -> Path:
        path = self.dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chown(path, self.uid, self.gid)
        return path

    def _private_dir(self, path: Path) -> Path:
        path.mkdir(mode=0o700)
        os.chown(path, self.uid, self.gid)
        return path

    def config(self, node: str, index: int, priority: int) -> Path:
        home = self._private_dir(self.dir / node)
        healthy = self.dir / f"{node}.healthy"
        healthy.touch()
        settings: dict[str, Any] = {
            "node": node, "cluster": "lab", "interface": "eth0",
            "vips": [f"{VIP4}/32", f"{VIP6}/128"], "priority": priority, "preempt": False,
            "heartbeat": {"bind": f"198.51.100.{index}:{PORT}",
                          "peers": [f"198.51.100.{3 - index}:{PORT}"]},
            "auth": {"key_file": str(self.key)},
            # An exec check run by the unprivileged daemon, on a world-reachable file.
            "health": [{"name": "service",
                        "exec": {"command": ["/usr/bin/test", "-e", str(healthy)]},
                        "interval": "100ms", "timeout": "80ms", "rise": 2, "fall": 2}],
            "state_dir": str(home / "state"),  # created by the daemon, as nobody
            "audit": {"file": str(self._private_dir(home / "audit") / "audit.jsonl")},
            "hooks": {"on_active": [
                "/bin/sh", "-c",
                "grep -E '^(Uid|CapPrm|CapEff|CapAmb|NoNewPrivs):' /proc/self/status "
                f"> {self.hooks}/$VIPD_NODE.tmp && mv {self.hooks}/$VIPD_NODE.tmp "
                f"{self.hooks}/$VIPD_NODE.caps"]},
            # exec_user stays unset: an unprivileged vipd runs commands as itself.
        }
        path = self.dir / f"{node}.yaml"
        path.write_text(yaml.safe_dump(settings))
        path.chmod(0o644)
        return path

    def argv(self, config: Path, command: str = "run") -> list[str]:
        setpriv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                   "--inh-caps=-all,+net_admin,+net_raw",
                   "--ambient-caps=-all,+net_admin,+net_raw",
                   "--bounding-set=-all,+net_admin,+net_raw", "--no-new-privs", "--"]
        daemon = [PYTHON, "-m", "vipd.cli", command, "-c", str(config)]
        hidden = hidden_dirs()
        if not hidden:
            return [*setpriv, *daemon]
        return ["unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", mount_script(self.pyenv, hidden), "sh", *setpriv, *daemon]

    def release(self, node: str) -> subprocess.CompletedProcess[str]:
        """`vipd release` (the unit's ExecStopPost), unprivileged like the daemon."""
        return self.lab[node].exec(*self.argv(self.dir / f"{node}.yaml", "release"),
                                   check=False, timeout=30)

    def start(self, node: str, index: int, priority: int) -> subprocess.Popen[str]:
        config = self.config(node, index, priority)
        with self.log(node).open("a") as log:
            proc = self.lab[node].spawn(*self.argv(config), stdout=log, stderr=log,
                                        env=CLEAN_ENV, cwd="/")
        self.procs[node] = proc
        return proc

    def log(self, node: str) -> Path:
        return self.dir / f"{node}.log"

    def logs(self) -> str:
        return "\n".join(f"--- {node} log ---\n{self.log(node).read_text()}"
                         for node in self.procs)

    def hook_caps(self, node: str) -> dict[str, str] | None:
        path = self.hooks / f"{node}.caps"
        if not path.exists():
            return None
        return dict(line.split(":", 1) for line in path.read_text().splitlines())


@pytest.fixture
def setup(lab: Lab) -> Iterator[Setup]:
    """Runs after `lab` is built and ends before it is destroyed (fixture order)."""
    workdir = Path(tempfile.mkdtemp(prefix="vipd-unpriv-", dir="/tmp"))
    try:
        workdir.chmod(0o711)
        yield Setup(lab, workdir)
    finally:
        try:
            lab.node1.kill_procs()
            lab.node2.kill_procs()
        finally:
            # The interpreter's bind mounts only ever exist in the daemons' private
            # mount namespaces, so here workdir/pyenv is an empty directory. Never let
            # rmtree walk into a mount (it would be the interpreter's tree): rmdir first.
            pyenv = workdir / "pyenv"
            if pyenv.exists():
                if os.path.ismount(pyenv):
                    raise RuntimeError(f"{pyenv} is a mount point; not removing {workdir}")
                pyenv.rmdir()
            shutil.rmtree(workdir)


def proc_status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, setup: Setup) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                                 f"{setup.logs()}")
        time.sleep(0.02)


def holders(lab: Lab, vip: str = VIP4) -> list[str]:
    return [n for n in ("node1", "node2") if lab[n].address(vip) is not None]




def assert_two_caps_only(pid: int, uid: int) -> dict[str, str]:
    status = proc_status(pid)
    assert re.fullmatch(rf"{uid}\s+{uid}\s+{uid}\s+{uid}", status["Uid"]), status["Uid"]
    # vipd keeps exactly the two capabilities it was started with, and clears its own
    # ambient and inheritable sets so none of its children can receive them.
    assert status["CapEff"] == status["CapPrm"] == TWO_CAPS, status
    assert status["CapAmb"] == status["CapInh"] == NO_CAPS, status
    assert status["CapBnd"] == TWO_CAPS, status
    assert status["NoNewPrivs"] == "1", status
    return status


def test_unprivileged_pair_fails_over_and_releases(setup: Setup) -> None:
    lab = setup.lab
    package_root = Path(vipd.__file__).resolve().parent.parent
    assert others_can_traverse(package_root), (
        f"{package_root} (the editable install) is not traversable by {USER}")
    p1 = setup.start("node1", 1, 150)
    p2 = setup.start("node2", 2, 100)

    # Exactly one holder, node1 (priority 150); node2 standing by.
    wait_for(lambda: holders(lab, VIP4) == ["node1"] and holders(lab, VIP6) == ["node1"],
             15, "node1 to hold both VIPs", setup)
    wait_for(lambda: "STANDBY" in setup.log("node2").read_text(), 5, "node2 STANDBY", setup)
    time.sleep(0.5)
    assert holders(lab, VIP4) == ["node1"] and holders(lab, VIP6) == ["node1"], setup.logs()

    # Both are the daemon itself, as nobody with exactly the two capabilities.
    statuses = {}
    for proc in (p1, p2):
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"vipd.cli" in cmdline and os.fsencode(PYTHON) == cmdline[0], cmdline
        statuses[proc.pid] = assert_two_caps_only(proc.pid, setup.uid)
    for pid, status in statuses.items():
        print(f"pid {pid}: " + "; ".join(f"{k}: {status[k]}" for k in (
            "Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")))
    state = setup.dir / "node1" / "state" / "state.json"
    wait_for(state.exists, 5, "node1's state file", setup)
    assert state.stat().st_uid == setup.uid

    # node1's on_active hook ran with no capability left.
    wait_for(lambda: setup.hook_caps("node1") is not None, 5, "node1's hook", setup)
    caps1 = setup.hook_caps("node1")
    print(f"node1 hook: {caps1}")
    assert caps1 is not None
    assert caps1["CapEff"].strip() == caps1["CapAmb"].strip() == NO_CAPS, caps1
    assert caps1["CapPrm"].strip() == NO_CAPS, caps1
    assert caps1["Uid"].split()[0] == str(setup.uid) and caps1["NoNewPrivs"].strip() == "1"

    # The client resolves the VIPs to node1.
    for vip in (VIP4, VIP6):
        lab.client.run(poke, vip)
        wait_for(lambda v=vip: lab.client.lladdr(v) == lab.node1.mac, 3,
                 f"the client to resolve {vip} to node1", setup)

    # Crash: SIGKILL to node1's whole process group.
    os.killpg(p1.pid, signal.SIGKILL)
    p1.wait(5)
    crashed = time.monotonic()
    wait_for(lambda: lab.node2.address(VIP4) is not None
             and lab.node2.address(VIP6) is not None, FAILOVER,
             "node2 to take both VIPs", setup)
    took = time.monotonic() - crashed
    wait_for(lambda: "VIPs added" in setup.log("node2").read_text(), 2,
             "node2's 'VIPs added'", setup)
    # ... and announced them: gratuitous ARP and unsolicited NA (raw sockets) worked.
    for vip in (VIP4, VIP6):
        wait_for(lambda v=vip: lab.client.lladdr(v) == lab.node2.mac,
                 max(FAILOVER - (time.monotonic() - crashed), 1.0),
                 f"the client's entry for {vip} to move to node2", setup)
    print(f"node2 holds the VIPs {took:.2f} s after the crash")
    wait_for(lambda: setup.hook_caps("node2") is not None, 5, "node2's hook", setup)
    caps2 = setup.hook_caps("node2")
    print(f"node2 hook: {caps2}")
    assert caps2 is not None
    assert caps2["CapEff"].strip() == caps2["CapAmb"].strip() == NO_CAPS, caps2
    assert_two_caps_only(p2.pid, setup.uid)  # still nothing more than the two

    # The killed node1 left its VIPs behind (until the lease ends): ExecStopPost's
    # `vipd release` removes them, as the same unprivileged user.
    assert lab.node1.address(VIP4) is not None, "node1's copy outlived it (lease 3 s)"
    released = setup.release("node1")
    assert released.returncode == 0, released.stdout + released.stderr
    assert "released" in released.stdout, released.stdout
    assert lab.node1.address(VIP4) is None and lab.node1.address(VIP6) is None

    # SIGTERM: clean exit and the VIPs released, without root.
    p2.send_signal(signal.SIGTERM)
    assert p2.wait(5) == 0, setup.logs()
    assert lab.node2.address(VIP4) is None and lab.node2.address(VIP6) is None, setup.logs()
    log2 = setup.log("node2").read_text()
    assert "VIPs removed" in log2, log2
    for node in ("node1", "node2"):
        text = setup.log(node).read_text()
        bad = [line for line in text.splitlines()
               if re.search(r"\b(ERROR|CRITICAL|Traceback)\b|cannot write state", line)]
        assert not bad, f"{node}:\n{text}"
