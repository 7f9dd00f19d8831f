"""The faults of the campaign (`simulations.faults`), each done to a settled pair (node1
active, node2 standby) and undone again.

A fault function takes the `Run` of one trial and returns when the fault is over; it
notes in ``run.unhealthy`` the spans during which no node could serve (both daemons
down), and in ``run.extra`` what the nodes said about it (reload results, rejections,
the forwarder's counts). `undo` leaves no fault behind, after an error too; `prepare`
and `restore` set up and put back what a fault changes in the lab's files (per-node key
files for the key rotation, the configs a bad reload breaks).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations import netfaults, splitbrain
from vipd.demo.pairlab import VIP4, VIP6, PairLab
from vipd.keys import generate_key_line

ACTIVE, STANDBY = "node1", "node2"
LOSS_HOLD = 6.0
NET_HOLD = 6.0
ONEWAY_HOLD = 3.0
STORM = (10, 10.0)  # restarts of the standby, within seconds
CRASHES, CRASH_EVERY = 5, 2.0
CLOCK_STEP, STEP_HOLD = 3.0, 3.0
FLAP_PERIOD, FLAP_FOR = 0.3, 10.0
RELOAD_WAIT = 3.0  # for the daemon to log a reload's outcome
RELOAD_LINES = ("config reloaded", "reload failed", "reload refused")
ROTATED_KEY_ID = 2  # the lab's key has id 1
BROKEN_YAML = "node: [node1\n  priority: {150\n"


@dataclass
class Run:
    """One trial's fault: the pair, its randomness, and what the fault reports back."""

    pair: PairLab
    rng: random.Random
    seed: int
    unhealthy: list[tuple[float, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    forwarder: netfaults.Forwarder | None = None


@dataclass(frozen=True)
class Fault:
    text: str
    act: Callable[[Run], None]
    quiet: bool = False  # done when (no arbiter): 0 ms two MACs, 0 moves
    max_moves: int | None = None  # done when (no arbiter): at most this many moves
    clock: bool = False  # node1's daemon runs under libfaketime
    own_keys: bool = False  # each node gets its own key file


# --- the faults --------------------------------------------------------------------------

def _loss(fraction: float) -> Callable[[Run], None]:
    def act(run: Run) -> None:
        netfaults.set_loss(run.pair.lab, ACTIVE, fraction)
        time.sleep(LOSS_HOLD)
        netfaults.clear(run.pair.lab)
    return act


def _forwarded(mode: str) -> Callable[[Run], None]:
    def act(run: Run) -> None:
        # The forwarder reads both ports before the bridge stops carrying heartbeats:
        # the other way round its start-up (Python, 0.1-0.3 s on a busy machine) was a
        # blackout that, with the first delays, made the standby take over.
        run.forwarder = netfaults.Forwarder.start(run.pair, mode, run.seed)
        netfaults.divert(run.pair.lab, ACTIVE)
        time.sleep(NET_HOLD)
        netfaults.clear(run.pair.lab)  # first: the heartbeats take the bridge again
        forwarder, run.forwarder = run.forwarder, None
        run.extra["forwarder"] = forwarder.stop()
        run.extra["rejected"] = rejected_heartbeats(run.pair)
    return act


def _partition(hold: float, a: str = ACTIVE, b: str = STANDBY,
               oneway: bool = False) -> Callable[[Run], None]:
    def act(run: Run) -> None:
        run.pair.block(a, b, oneway=oneway)
        time.sleep(hold)
        run.pair.heal()
    return act


def _pause(node: str, hold: float) -> Callable[[Run], None]:
    def act(run: Run) -> None:
        run.pair.pause(node)
        time.sleep(hold)
        run.pair.resume(node)
    return act


def _restart_storm(run: Run) -> None:
    """The standby restarted (SIGTERM, start) STORM[0] times within STORM[1] s."""
    count, within = STORM
    t0 = time.monotonic()
    for k in range(count):
        run.pair.stop(STANDBY)
        run.pair.start(STANDBY)
        time.sleep(max(t0 + (k + 1) * within / count - time.monotonic(), 0))


def _crash_loop(run: Run) -> None:
    """kill -9 of the active's daemon and a start right after, CRASHES times,
    CRASH_EVERY s apart (its service keeps running: the daemon crashes)."""
    t0 = time.monotonic()
    for k in range(CRASHES):
        run.pair.kill(ACTIVE, with_service=False)
        run.pair.start(ACTIVE)
        if k < CRASHES - 1:
            time.sleep(max(t0 + (k + 1) * CRASH_EVERY - time.monotonic(), 0))


def _clock_step(run: Run) -> None:
    run.pair.step_clock(ACTIVE, CLOCK_STEP)
    time.sleep(STEP_HOLD)
    run.pair.step_clock(ACTIVE, 0)


def _vip_deleted(run: Run) -> None:
    host = run.pair.host(ACTIVE)
    for vip in (VIP4, VIP6):
        info = host.address(vip)
        if info is not None:
            host.ip("addr", "del", f"{vip}/{info['prefixlen']}", "dev", "eth0")


def _health_flap(run: Run) -> None:
    t0 = time.monotonic()
    k = 0
    while time.monotonic() < t0 + FLAP_FOR:
        k += 1
        run.pair.set_health(ACTIVE, k % 2 == 0)
        time.sleep(max(t0 + k * FLAP_PERIOD / 2 - time.monotonic(), 0))
    run.pair.set_health(ACTIVE, True)


def _bad_reload(run: Run) -> None:
    """Both configs broken, SIGHUP to both; then mended and SIGHUP again."""
    pair = run.pair
    originals = {name: node.config.read_text() for name, node in pair.nodes.items()}
    try:
        for node in pair.nodes.values():
            node.config.write_text(BROKEN_YAML)
        outcome = {name: reload(pair, name) for name in pair.nodes}
    finally:
        for name, node in pair.nodes.items():
            node.config.write_text(originals[name])
    mended = {name: reload(pair, name) for name in pair.nodes}
    run.extra["reloads"] = {name: [outcome[name], mended[name]] for name in pair.nodes}


def _key_rotation(run: Run) -> None:
    """docs/protocol.md's procedure on both nodes (and the witness): add a key, reload
    all, wait until both nodes sign with it (their metrics say so), remove the old one,
    reload all."""
    pair = run.pair
    files = key_files(pair)
    line = generate_key_line(ROTATED_KEY_ID)
    steps: dict[str, list[str]] = {name: [] for name in files}
    for path in files.values():
        write_private(path, path.read_text() + line + "\n")
    for name in files:
        steps[name].append(reload(pair, name))
    started = time.monotonic()
    both = pair.wait_for(lambda: all(_signing_keys(pair, name) == (ROTATED_KEY_ID,) * 2
                                     for name in pair.nodes), 5.0)
    run.extra["both_signing_new_after_ms"] = (round(1000 * (time.monotonic() - started), 1)
                                              if both else None)
    for path in files.values():
        write_private(path, line + "\n")
    for name in reversed(list(files)):
        steps[name].append(reload(pair, name))
    run.extra["reloads"] = steps
    run.extra["rejected"] = rejected_heartbeats(pair)


def _restart_both(run: Run) -> None:
    """Both daemons killed (-9) and started together (their services keep running)."""
    down = time.time()
    for name in run.pair.nodes:
        run.pair.kill(name, with_service=False)
    for name in run.pair.nodes:
        run.pair.start(name)
    run.unhealthy.append((down, time.time()))


FAULTS: dict[str, Fault] = {
    "loss-5": Fault(f"5 % of the heartbeats to and from node1 lost, {LOSS_HOLD:g} s",
                    _loss(0.05)),
    "loss-20": Fault(f"20 % loss, {LOSS_HOLD:g} s", _loss(0.20)),
    "loss-50": Fault(f"50 % loss, {LOSS_HOLD:g} s", _loss(0.50)),
    "delay": Fault(f"heartbeats to and from node1: {netfaults.MODES['delay']}, "
                   f"{NET_HOLD:g} s", _forwarded("delay"), quiet=True),
    "reorder": Fault(f"{netfaults.MODES['reorder']}, {NET_HOLD:g} s", _forwarded("reorder")),
    "duplicate": Fault(f"{netfaults.MODES['duplicate']}, {NET_HOLD:g} s",
                       _forwarded("duplicate")),
    "partition-2s": Fault("node1 <-> node2 cut both ways at the switch, 2 s",
                          _partition(2.0)),
    "partition-10s": Fault("node1 <-> node2 cut both ways, 10 s", _partition(10.0)),
    "oneway-active-deaf": Fault(f"node2 -> node1 dropped (the active hears nothing), "
                                f"{ONEWAY_HOLD:g} s",
                                _partition(ONEWAY_HOLD, STANDBY, ACTIVE, oneway=True),
                                quiet=True),
    "oneway-standby-deaf": Fault(f"node1 -> node2 dropped (the standby hears nothing), "
                                 f"{ONEWAY_HOLD:g} s",
                                 _partition(ONEWAY_HOLD, ACTIVE, STANDBY, oneway=True)),
    "pause-active-1s": Fault("SIGSTOP of node1's daemon, SIGCONT after 1 s",
                             _pause(ACTIVE, 1.0)),
    "pause-active-5s": Fault("SIGSTOP of node1's daemon, SIGCONT after 5 s",
                             _pause(ACTIVE, 5.0)),
    "restart-storm-standby": Fault(f"node2's daemon restarted (SIGTERM, start) {STORM[0]} "
                                   f"times in {STORM[1]:g} s", _restart_storm, quiet=True),
    "crash-loop-active": Fault(f"kill -9 of node1's daemon and a start right after, "
                               f"{CRASHES} times {CRASH_EVERY:g} s apart", _crash_loop,
                               max_moves=2),
    "pause-standby-1.5s": Fault("SIGSTOP of node2's daemon, SIGCONT after 1.5 s",
                                _pause(STANDBY, 1.5)),
    "pause-standby-5s": Fault("SIGSTOP of node2's daemon, SIGCONT after 5 s",
                              _pause(STANDBY, 5.0)),
    "clock-step": Fault(f"node1's wall clock {CLOCK_STEP:+g} s for {STEP_HOLD:g} s, then "
                        f"back (libfaketime in that daemon only)", _clock_step, clock=True),
    "vip-deleted": Fault("the VIPs deleted by hand (ip addr del) on node1", _vip_deleted),
    "health-flap": Fault(f"node1's health check flapping, {FLAP_PERIOD * 1000:g} ms period, "
                         f"{FLAP_FOR:g} s", _health_flap, max_moves=2),
    "bad-reload": Fault("broken YAML in both configs and SIGHUP to both; mended, SIGHUP "
                        "again", _bad_reload, quiet=True),
    "key-rotation": Fault("a new key added on both nodes (and the witness), reload all, the "
                          "old key removed, reload all", _key_rotation, quiet=True,
                          own_keys=True),
    "restart-both": Fault("both daemons killed (-9) and started together", _restart_both,
                          quiet=True),
}


# --- around the faults -------------------------------------------------------------------

def prepare(pair: PairLab, fault: str) -> dict[Path, str]:
    """Before the pair first starts; returns the files `restore` puts back."""
    spec = FAULTS[fault]
    if spec.clock:
        pair.fake_clock(ACTIVE)  # without libfaketime's monotonic fix (pairlab)
    if spec.own_keys:
        shared = pair.workdir / "pair.key"
        for name, node in pair.nodes.items():
            own = pair.workdir / f"{name}.key"
            write_private(own, shared.read_text())
            text = node.config.read_text()
            if f"key_file: {shared}" not in text:
                raise RuntimeError(f"{node.config}: no 'key_file: {shared}' to replace")
            node.config.write_text(text.replace(f"key_file: {shared}", f"key_file: {own}"))
    return {path: path.read_text() for path in (
        *(node.config for node in pair.nodes.values()), *key_files(pair).values())}


def restore(pair: PairLab, saved: dict[Path, str]) -> None:
    """The saved files back; a witness whose key file changed is stopped (the reset
    starts it again): after a rotation it would know only the new key."""
    for path, text in saved.items():
        if path.read_text() != text:
            write_private(path, text)
            if pair.witness_config is not None and path == key_files(pair).get("witness"):
                pair.stop_witness()


def undo(run: Run) -> None:
    """After an error too: no loss, forwarder, partition, frozen daemon, stepped clock or
    failing health check stays."""
    pair = run.pair
    netfaults.clear(pair.lab)
    if run.forwarder is not None:
        run.forwarder.close()
        run.forwarder = None
    pair.heal()
    for name, node in pair.nodes.items():
        if node.daemon is not None and node.daemon.poll() is None:
            pair.resume(name)
        if node.clock_file is not None:
            pair.step_clock(name, 0)
        pair.set_health(name, True)


def key_files(pair: PairLab) -> dict[str, Path]:
    """Who reads which key file: each node its own if it has one, and the witness."""
    files = {}
    for name, node in pair.nodes.items():
        own = pair.workdir / f"{name}.key"
        files[name] = own if f"key_file: {own}" in node.config.read_text() \
            else pair.workdir / "pair.key"
    if pair.witness_config is not None:
        files["witness"] = pair.workdir / "pair.key"
    return files


def reload(pair: PairLab, name: str) -> str:
    """SIGHUP to node ``name``'s daemon (or the witness) and its outcome: the log line
    that says it ("config reloaded...", "reload failed..."), or "no answer"."""
    if name == "witness":
        proc = pair.witness
        log_file = pair.workdir / "witness.log"
    else:
        proc, log_file = pair.nodes[name].daemon, pair.nodes[name].log
    if proc is None or proc.poll() is not None:
        raise RuntimeError(f"{name}: not running, cannot reload")
    seen = len(log_file.read_text().splitlines())
    proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + RELOAD_WAIT
    while time.monotonic() < end:
        new = log_file.read_text().splitlines()[seen:]
        said = [ln for ln in new if any(word in ln for word in RELOAD_LINES)]
        if said:
            return said[0].split(f" {name} ", 1)[-1].strip()[:160]
        time.sleep(0.02)
    return "no answer"


def _signing_keys(pair: PairLab, name: str) -> tuple[float, float]:
    """The key node ``name`` signs with and the one its peer's heartbeats carry."""
    values = splitbrain.metric_values(pair.metrics(name))
    return values[("vipd_heartbeat_signing_key", "")], values[("vipd_peer_signing_key", "")]


def rejected_heartbeats(pair: PairLab) -> dict[str, dict[str, float]]:
    return {name: {labels.removeprefix("reason="): value for (metric, labels), value
                   in splitbrain.metric_values(pair.metrics(name)).items()
                   if metric == "vipd_heartbeats_rejected_total" and value}
            for name in pair.nodes}


def write_private(path: Path, text: str) -> None:
    """Key files must be 0600 (vipd refuses others); configs may be too."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
