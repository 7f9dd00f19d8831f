"""Deterministic fault simulation of a vipd pair: `python -m simulations.simulate --json`.

Every scenario is built from its seed alone (so any violation replays with
`--replay SEED`), runs the real election and protocol code on a virtual clock, and is
checked after every event by `simnet.Checker`. With `--arbiter witness` the pair votes
with a simulated witness (the real vipd.core.witness), each of the three processes runs
its clock at its own rate, and the faults include the witness's. See
simulations/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from simulations import simulate_group
from simulations.simnet import CLUSTER, WITNESS, Attack, Checker, Sim, SimNode
from vipd.core import election as el
from vipd.core.damping import DampingConfig
from vipd.core.protocol import KeyRing, Kind, Session, State, Vote
from vipd.core.votes import RATE_MARGIN, counted_lease

DEFAULTS = el.ElectionConfig(node="x")
KINDS = ["crash", "crash_restart", "stop", "health_fail", "health_flap", "partition",
         "oneway", "attack", "switchover", "maintenance", "promote", "standby_restart",
         "freeze_standby", "freeze_active", "clock_step", "flap_active", "crash_loop"]
# s: shorter and longer than the dead interval, longer than the lease, than the socket buffer
FREEZES = [0.2, 0.7, 1.5, 5.0, 12.0]
CLOCK_STEPS = [3.0, -3.0, 3600.0, -3600.0]  # s, on one node's wall clock
MEASURED = {"crash", "crash_restart", "stop", "health_fail", "switchover", "maintenance",
            "promote"}
LOSSES = [0.0, 0.01, 0.05, 0.05, 0.2]
WARMUP = 1.5
RUN_AFTER = 4.0
# The preferred active flaps (its health, or its daemon in a crash loop): with flap
# damping it moves the VIPs at most twice, away and back once it is stable again.
FLAPPING = {"flap_active", "crash_loop"}
FLAPPING_MOVES = 2
CRASH_LOOP = 5  # kill -9 and restart this many times
FLAP_PERIOD = (0.1, 2.0)  # s, the health flapping's period (half up, half down)

# --arbiter witness: the pair's faults that still apply, and the witness's own.
ARBITER_KINDS = ["crash", "crash_restart", "stop", "health_fail", "switchover", "maintenance",
                 "promote", "standby_restart", "partition", "partition_pair",
                 "partition_witness", "isolate_active", "isolate_standby", "witness_crash",
                 "witness_restart", "witness_crash_then_active_crash", "freeze_active",
                 "freeze_standby", "freeze_witness", "attack", "health_flap", "flap_active",
                 "crash_loop"]
ARBITER_MEASURED = MEASURED | {"isolate_active"}
# Only the witness is out or cut off: the pair's own two votes keep the holder.
WITNESS_OUTAGES = {"witness_crash", "witness_restart", "freeze_witness", "partition_witness"}
# The witness keeps voting for the incumbent when the pair link fails or the standby is
# cut off (docs/election.md, "What happens when ..."): nothing moves either.
HOLDER_STAYS = WITNESS_OUTAGES | {"partition_pair", "isolate_standby"}
# Each clock at most this far from real time, so any two differ by at most the margin
# the vote count allows for (vipd.core.votes.RATE_MARGIN).
RATE_SPREAD = RATE_MARGIN / 2
FREEZE_RANGE = (0.2, 12.0)  # s, log-uniform: as many freezes shorter than a lease as longer


@dataclass
class Outcome:
    seed: int
    kind: str
    loss: float
    delay: float
    violations: list[str]
    failover: float | None = None
    gap: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def scenario(seed: int, interval: float, dead_after: int, arbiter: str = "none",
             damping: DampingConfig | None = None,
             flap_period: tuple[float, float] = FLAP_PERIOD) -> Outcome:
    sim_rng_seed = seed * 7919 + 17
    witness = arbiter == "witness"
    kinds = ARBITER_KINDS if witness else KINDS
    kind = kinds[seed % len(kinds)]
    rng = random.Random(sim_rng_seed)
    loss = rng.choice(LOSSES)
    delay = rng.uniform(0.0002, 0.003)
    jitter = rng.uniform(0.0, delay)
    preempt = rng.random() < 0.5
    prios = rng.choice([(150, 100), (100, 150), (100, 100)])
    if kind in FLAPPING:  # the preferred node (started first) flaps, as operators saw it
        preempt, prios = True, (150, 100)
    cfgs = [el.ElectionConfig(node=name, priority=prio, preempt=preempt,
                              preempt_delay=rng.choice([0.0, 0.2, 1.0]),
                              interval=interval, dead_after=dead_after,
                              damping=damping or DampingConfig())
            for name, prio in zip(("node-a", "node-b"), prios, strict=True)]
    sim = Sim(sim_rng_seed, cfgs, ["203.0.113.10/32", "2001:db8::10/128"], witness=witness)
    for link in sim.links.values():
        link.loss, link.delay, link.jitter = loss, delay, jitter
        if rng.random() < 0.2:
            link.dup = rng.uniform(0, 0.05)
        if rng.random() < 0.2:
            link.reorder = rng.uniform(0, 0.05)
    a, b = sim.nodes.values()
    for node in (a, b):
        node.skew_ns = int(rng.uniform(-0.05, 0.05) * 1e9)
    if sim.witness is not None:
        for process in (a, b, sim.witness):
            process.rate = rng.choice([-1.0, 1.0, rng.uniform(-1.0, 1.0)]) * RATE_SPREAD
        sim.call(0.0, sim.witness.start)
    sim.call(0.0, a.start)
    # With votes, a voter's start is a disturbance: it grants nothing for one lease.
    start_b = (lambda: _disturbed(sim.checker, b.start)) if witness else b.start
    sim.call(rng.uniform(0, 0.1), start_b)
    t_fault = WARMUP + rng.uniform(0, interval)
    sim.run_until(t_fault)
    out = Outcome(seed, kind, loss, delay + jitter / 2, sim.checker.violations)
    if kind == "flap_active":
        out.notes["flap_period_range"] = flap_period
    active = next((n for n in (a, b) if n.state is State.ACTIVE), None)
    if active is None:
        sim.checker.violation("no ACTIVE node after warm-up")
        return out
    other = sim.peer_of(active.name)
    end = t_fault + RUN_AFTER
    if witness:
        _inject_arbiter(kind, sim, rng, active, other, t_fault, interval, out)
    else:
        _inject(kind, sim, rng, active, other, t_fault, interval, out)
    if kind == "crash_restart":
        end += 1.5
    if "thaw_at" in out.notes:
        end = max(end, out.notes["thaw_at"] + 2.0)
    if "stable_from" in out.notes:  # watch until the flapping node may take the VIPs back
        cfg = active.cfg.damping
        end = max(end, out.notes["stable_from"] + (cfg.hold_down if cfg.enabled else 0) + 3.0)
    sim.run_until(end)
    _measure(kind, sim, active, other, t_fault, out, ARBITER_MEASURED if witness else MEASURED)
    if witness:
        _check_end_arbiter(kind, sim, active, other, t_fault, out)
    else:
        _check_end(kind, sim, active, other, out)
    return out


def _inject(kind: str, sim: Sim, rng: Any, active: SimNode, other: SimNode, t: float,
            interval: float, out: Outcome) -> None:
    chk = sim.checker
    chk.disturb()
    if kind in ("crash", "crash_restart"):
        active.crash()
        if kind == "crash_restart":
            sim.call(t + rng.uniform(0.5, 1.5), lambda: _disturbed(chk, active.start))
    elif kind == "stop":
        active.handle(el.Shutdown())
    elif kind == "health_fail":
        active.health = False
        active.handle(el.HealthChanged(False, "sim: service down"))
    elif kind == "health_flap":
        node, when, up = rng.choice([active, other]), t, False
        for _ in range(rng.randint(2, 8)):
            def flip(n: SimNode = node, h: bool = up) -> None:
                chk.disturb()
                n.health = h
                n.handle(el.HealthChanged(h, "sim: flap"))
            sim.call(when, flip)
            when, up = when + rng.uniform(0.02, 0.5), not up
        def heal(n: SimNode = node) -> None:
            chk.disturb()
            n.health = True
            n.handle(el.HealthChanged(True, "sim: stable"))
        sim.call(when, heal)
    elif kind == "flap_active":
        _flap(sim, rng, active, t, out)
    elif kind == "crash_loop":
        _crash_loop(sim, rng, active, t, out)
    elif kind in ("partition", "oneway"):
        links = list(sim.links.values())
        cut = links if kind == "partition" else [rng.choice(links)]
        for link in cut:
            link.blocked = True
        def heal_links() -> None:
            for link in cut:
                link.blocked = False
        duration = rng.uniform(0.1, 2.0)
        out.notes["partition_s"] = duration
        sim.call(t + duration, heal_links)
    elif kind == "attack":
        _schedule_attacks(sim, rng, t)
    elif kind == "switchover":
        active.handle(el.Command(el.CommandKind.SWITCHOVER))
    elif kind == "maintenance":
        active.handle(el.Command(el.CommandKind.MAINTENANCE_ON))
        sim.call(t + 1.5, lambda: _disturbed(chk, lambda: active.handle(
            el.Command(el.CommandKind.MAINTENANCE_OFF))))
    elif kind == "promote":
        other.handle(el.Command(el.CommandKind.PROMOTE))
    elif kind == "standby_restart":
        other.crash()
        sim.call(t + rng.uniform(0.1, 1.0), lambda: _disturbed(chk, other.start))
    elif kind in ("freeze_standby", "freeze_active"):
        node = other if kind == "freeze_standby" else active
        _freeze(sim, rng, node, rng.choice(FREEZES), t, out)
    elif kind == "clock_step":
        node = rng.choice([active, other])
        step = rng.choice(CLOCK_STEPS)
        out.notes.update(step_s=step, stepped=node.name)
        node.skew_ns += int(step * 1e9)


def _flap(sim: Sim, rng: Any, node: SimNode, t: float, out: Outcome) -> None:
    """The active's health flaps (by default with a period of 0.1-2 s) for 2-10 s and at
    least 3 periods, then stays up."""
    period = rng.uniform(*out.notes["flap_period_range"])
    duration = rng.uniform(2.0, 10.0) + 3 * period
    when, up = t, False
    while True:
        def flip(h: bool = up) -> None:
            sim.checker.disturb()
            node.health = h
            node.handle(el.HealthChanged(h, "sim: flap"))
        sim.call(when, flip)
        if up and when >= t + duration:
            break
        when, up = when + period / 2, not up
    out.notes.update(fault_at=t, flap_period_s=period, stable_from=when)


def _crash_loop(sim: Sim, rng: Any, node: SimNode, t: float, out: Outcome) -> None:
    """kill -9 of the active and a restart 0.3-1.5 s later, CRASH_LOOP times, each run
    0.5-2 s long; the last restart stays up."""
    when = t
    for i in range(CRASH_LOOP):
        if i:
            sim.call(when, lambda: _disturbed(sim.checker, node.crash))
        else:
            node.crash()
        when += rng.uniform(0.3, 1.5)
        sim.call(when, lambda: _disturbed(sim.checker, node.start))
        start = when
        when += rng.uniform(0.5, 2.0)
    out.notes.update(fault_at=t, stable_from=start)


def _check_flapping(sim: Sim, active: SimNode, out: Outcome) -> None:
    """The flapping preferred node moved the VIPs at most FLAPPING_MOVES times, and took
    them back only after it had been stable for the hold-down."""
    cfg, t = active.cfg.damping, out.notes["fault_at"]
    moves, holder = [], active.name  # a takeover by the node that held them is no move
    for when, name, _ in sim.checker.takeovers:
        if when >= t and name != holder:
            moves.append((when, name))
            holder = name
    out.notes["moves"] = len(moves)
    back = [when for when, name in moves if name == active.name]
    stable = out.notes["stable_from"]
    if back and back[-1] > stable:
        out.notes["back_after"] = back[-1] - stable
    if not cfg.enabled:
        return
    if len(moves) > FLAPPING_MOVES:
        sim.checker.violation(f"{out.kind}: the VIPs moved {len(moves)} times (at most "
                              f"{FLAPPING_MOVES} with damping): {moves[:6]}")
    # The node's own clock times the hold-down (with a witness it runs up to RATE_SPREAD
    # fast); its health event may come up to 10 ms after the flip.
    if back and back[-1] < stable + cfg.hold_down * (1 - RATE_SPREAD) - 0.01:
        sim.checker.violation(f"{out.kind}: {active.name} took the VIPs back at "
                              f"{back[-1]:.3f}s, stable since {stable:.3f}s, hold-down "
                              f"{cfg.hold_down:g} s")
    if not back and out.loss < 0.2:
        sim.checker.violation(f"{out.kind}: {active.name} never took the VIPs back after "
                              f"being stable since {stable:.3f}s (hold-down {cfg.hold_down:g} s)")


def _freeze(sim: Sim, rng: Any, node: SimNode, pause: float, t: float, out: Outcome) -> None:
    out.notes.update(pause_s=pause, thaw_at=t + pause)
    node.freeze()
    upkeep_first = rng.random() < 0.5
    sim.call(t + pause, lambda: _disturbed(sim.checker, lambda: node.thaw(upkeep_first)))


def _inject_arbiter(kind: str, sim: Sim, rng: Any, active: SimNode, other: SimNode,
                    t: float, interval: float, out: Outcome) -> None:
    """The faults of --arbiter witness; those the pair has too are injected as there."""
    chk, witness = sim.checker, sim.witness
    assert witness is not None
    out.notes["rates"] = {**{n: node.rate for n, node in sim.nodes.items()},
                          WITNESS: witness.rate}
    if kind in ("partition", "partition_pair", "partition_witness", "isolate_active",
                "isolate_standby"):
        chk.disturb()
        _partition(kind, sim, rng, active, other, t, out)
    elif kind in ("witness_crash", "witness_restart", "witness_crash_then_active_crash"):
        chk.disturb()
        witness.crash()
        if kind == "witness_restart":
            sim.call(t + rng.uniform(0.05, 1.5), lambda: _disturbed(chk, witness.start))
        elif kind == "witness_crash_then_active_crash":
            sim.call(t + rng.uniform(0.1, 1.0), lambda: _disturbed(chk, active.crash))
    elif kind in ("freeze_active", "freeze_standby", "freeze_witness"):
        chk.disturb()
        pause = math.exp(rng.uniform(*(math.log(x) for x in FREEZE_RANGE)))
        if kind == "freeze_witness":
            out.notes.update(pause_s=pause, thaw_at=t + pause)
            witness.freeze()
            sim.call(t + pause, lambda: _disturbed(chk, witness.thaw))
        else:
            _freeze(sim, rng, active if kind == "freeze_active" else other, pause, t, out)
    elif kind == "attack":
        _inject(kind, sim, rng, active, other, t, interval, out)
        _schedule_vote_attacks(sim, rng, t)
    else:
        _inject(kind, sim, rng, active, other, t, interval, out)


def _partition(kind: str, sim: Sim, rng: Any, active: SimNode, other: SimNode, t: float,
               out: Outcome) -> None:
    """Block some of the six directed links for 0.1-2 s: any non-empty subset
    (`partition`), the pair link both ways or one way, only node<->witness links, or
    every link of one node."""
    links = list(sim.links)
    if kind == "partition":
        mask = rng.randrange(1, 1 << len(links))
        cut = [link for i, link in enumerate(links) if mask >> i & 1]
    elif kind == "partition_pair":
        pair = [link for link in links if WITNESS not in link]
        cut = rng.choice([pair, pair[:1], pair[1:]])
    elif kind == "partition_witness":
        via = [link for link in links if WITNESS in link]
        mask = rng.randrange(1, 1 << len(via))
        cut = [link for i, link in enumerate(via) if mask >> i & 1]
    else:
        node = active if kind == "isolate_active" else other
        cut = [link for link in links if node.name in link]
    for link in cut:
        sim.links[link].blocked = True

    def heal() -> None:
        for link in cut:
            sim.links[link].blocked = False
    duration = rng.uniform(0.1, 2.0)
    out.notes.update(partition_s=duration, cut=[f"{s}>{d}" for s, d in cut],
                     witness_only=all(WITNESS in link for link in cut))
    sim.call(t + duration, heal)


def _schedule_vote_attacks(sim: Sim, rng: Any, t: float) -> None:
    """Replayed and bit-flipped vote requests and replies, requests sealed with a wrong
    key, from a node the cluster does not have, and garbage, to the witness."""
    bad_keys = KeyRing({7: rng.randbytes(32)})
    names = list(sim.nodes)
    for i in range(20):
        when = t + rng.uniform(0, RUN_AFTER - 0.5)

        def fire(i: int = i) -> None:
            votes = sim.captured_votes
            if not votes:
                return
            data, src, dst = rng.choice(votes[-200:]) if i % 2 else rng.choice(votes)
            choice = i % 4
            if choice in (0, 1):
                sim.inject(dst, Attack("replay", data), src)
            elif choice == 2:
                flipped = bytearray(data)
                flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                sim.inject(dst, Attack("forged", bytes(flipped)), src)
            else:
                now, node = sim.clock.now, rng.choice(names)
                advert = replace(el.Election(el.ElectionConfig(node=node)).advert(),
                                 state=State.ACTIVE, term=10**6)
                for name, keys in ((node, bad_keys), ("node-x", sim.keys)):
                    fake = Session(cluster=CLUSTER, node=name, keys=keys, boot_id=1,
                                   digest=b"\0" * 8, expect=Kind.VOTE_REPLY)
                    request = fake.seal(advert, now, sim.nodes[node].wall_ns(now),
                                        kind=Kind.VOTE_REQUEST, vote=Vote(60_000))
                    sim.inject(WITNESS, Attack("forged", request), node)
                sim.inject(WITNESS, Attack("forged", rng.randbytes(rng.randrange(0, 300))),
                           node)
        sim.call(when, fire)


def _schedule_attacks(sim: Sim, rng: Any, t: float) -> None:
    """Replays of captured datagrams (old and recent) and three kinds of forgery."""
    bad_keys = KeyRing({7: rng.randbytes(32)})
    names = list(sim.nodes)
    for i in range(40):
        when = t + rng.uniform(0, RUN_AFTER - 0.5)
        dst = rng.choice(names)

        def fire(dst: str = dst, i: int = i) -> None:
            captured = sim.captured
            if not captured:
                return
            original = rng.choice(captured[-200:]) if i % 2 else rng.choice(captured)
            choice = i % 4
            if choice in (0, 1):
                sim.inject(dst, Attack("replay", original))
            elif choice == 2:
                pos = rng.randrange(len(original))
                flipped = bytearray(original)
                flipped[pos] ^= 1 << rng.randrange(8)
                sim.inject(dst, Attack("forged", bytes(flipped)))
            else:
                sender = sim.peer_of(dst).name
                fake = Session(cluster=CLUSTER, node=sender, keys=bad_keys, boot_id=1,
                               digest=b"\0" * 8)
                advert = el.Election(el.ElectionConfig(node=sender)).advert()
                advert = replace(advert, state=State.ACTIVE, term=10**6)
                now = sim.clock.now
                sim.inject(dst, Attack("forged", fake.seal(advert, now,
                                                           sim.nodes[dst].wall_ns(now))))
                sim.inject(dst, Attack("forged", rng.randbytes(rng.randrange(0, 300))))
        sim.call(when, fire)


def _disturbed(checker: Checker, act: Callable[[], None]) -> None:
    """A second disturbance (a restart, maintenance off): the checker is told first."""
    checker.disturb()
    act()


def _measure(kind: str, sim: Sim, active: SimNode, other: SimNode, t: float,
             out: Outcome, measured: set[str]) -> None:
    if kind not in measured:
        return
    if kind == "isolate_active" and out.notes["partition_s"] <= (
            active.cfg.vote_lease + 2 * active.cfg.interval):
        return  # healed before its votes could run out: nothing had to move
    taker = other  # every measured fault moves the VIPs to the node that was standby
    after = [when for when, name, _ in sim.checker.takeovers if when >= t and name == taker.name]
    out.failover = (after[0] - t) if after else None
    if out.failover is None:
        sim.checker.violation(f"{kind}: {taker.name} never took over")
    gaps = [length for start, length in sim.checker.gaps if start >= t]
    if sim.checker.no_holder_since is not None and sim.checker.no_holder_since >= t:
        gaps.append(sim.clock.now - sim.checker.no_holder_since)
    out.gap = max(gaps, default=0.0)


def _check_end(kind: str, sim: Sim, active: SimNode, other: SimNode, out: Outcome) -> None:
    states = {n.name: n.state for n in sim.nodes.values()}
    actives = [n for n, s in states.items() if s is State.ACTIVE]
    if len(actives) != 1 and kind not in ("stop",):
        sim.checker.violation(f"end of {kind}: expected exactly one ACTIVE, got {states}")
    # After a crash and restart, or a partition long enough for the taker to settle, the
    # taker keeps the VIPs (clients followed it) unless the old active preempts it back.
    settled = kind == "crash_restart" or (
        kind == "partition" and out.notes["partition_s"] > 3 * active.cfg.dead_interval + 0.2)
    if settled and out.loss < 0.2:
        _check_settled(kind, sim, active, other, states, out)
    _check_moves_and_freezes(kind, sim, active, other, states, out)
    if kind == "clock_step":
        _check_clock_step(sim, out)
    if kind in FLAPPING:
        _check_flapping(sim, active, out)


def _check_moves_and_freezes(kind: str, sim: Sim, active: SimNode, other: SimNode,
                             states: dict[str, State | None], out: Outcome) -> None:
    """End checks of the pair alone and with a witness: a switchover moved the VIPs, the
    holder announced last, a freeze did not make a second holder."""
    actives = [n for n, s in states.items() if s is State.ACTIVE]
    if kind == "switchover" and actives != [other.name]:
        sim.checker.violation(f"switchover: expected {other.name} ACTIVE at the end, got {states}")
    if len(actives) == 1:
        _check_last_announcement(sim, sim.nodes[actives[0]])
    if kind == "freeze_standby":
        _check_frozen_standby(sim, active, other, out)
    elif kind == "freeze_active":
        _check_frozen_active(sim, active, out)


def _check_settled(kind: str, sim: Sim, active: SimNode, other: SimNode,
                   states: dict[str, State | None], out: Outcome) -> None:
    """After a crash and restart, or a partition long enough for the taker to settle, the
    taker keeps the VIPs (clients followed it) unless the old active preempts it back."""
    actives = [n for n, s in states.items() if s is State.ACTIVE]
    # A crash is a failure for flap damping: the restarted node waits the hold-down
    # (longer than the run) before it preempts.
    damped = kind == "crash_restart" and active.cfg.damping.enabled
    back = active.cfg.preempt and active.cfg.priority > other.cfg.priority and not damped
    expected = active.name if back else other.name
    if actives != [expected]:
        what = ("crash_restart" if kind == "crash_restart"
                else f"{kind} of {out.notes['partition_s']:.2f}s healed")
        sim.checker.violation(f"{what} (preempt={active.cfg.preempt}, priorities "
                              f"{active.cfg.priority}/{other.cfg.priority}): expected "
                              f"{expected} ACTIVE at the end, got {states}")


def _check_end_arbiter(kind: str, sim: Sim, active: SimNode, other: SimNode, t: float,
                       out: Outcome) -> None:
    """The pair's end checks that still hold with a witness, and the witness's own."""
    states = {n.name: n.state for n in sim.nodes.values()}
    actives = [n for n, s in states.items() if s is State.ACTIVE]
    if kind == "witness_crash_then_active_crash":
        _check_no_takeover_without_majority(sim, other, t)
    elif len(actives) != 1 and kind != "stop":
        sim.checker.violation(f"end of {kind}: expected exactly one ACTIVE, got {states}")
    settled = kind == "crash_restart" or (
        kind == "isolate_active" and out.notes["partition_s"] > 3 * active.cfg.dead_interval + 0.2)
    if settled and out.loss < 0.2:
        _check_settled(kind, sim, active, other, states, out)
    if (kind in HOLDER_STAYS or out.notes.get("witness_only")) and out.loss < 0.2:
        _check_holder_stays(kind, sim, t, out)
    _check_moves_and_freezes(kind, sim, active, other, states, out)
    if kind in FLAPPING:
        _check_flapping(sim, active, out)


def _check_no_takeover_without_majority(sim: Sim, standby: SimNode, t: float) -> None:
    """The witness down, then the active dead: the standby alone is one vote of three, so
    it must not take over, and its status must say that it waits for votes."""
    took = [when for when, name, _ in sim.checker.takeovers if when >= t and name == standby.name]
    if took:
        sim.checker.violation(f"{standby.name} took over at {took[0]:.3f}s with the witness "
                              f"and the active down (one vote of three)")
    e = standby.election
    if e is None or e.campaign is None:
        sim.checker.violation(f"{standby.name} does not say it waits for votes (campaign "
                              f"{None if e is None else e.campaign})")


def _check_holder_stays(kind: str, sim: Sim, t: float, out: Outcome) -> None:
    """Losing the witness alone, or the pair link while the witness reaches both, never
    moves the VIPs: no takeover, no release after the fault."""
    moved = [x for x in sim.checker.takeovers + sim.checker.releases if x[0] >= t]
    if moved:
        cut = f" (cut {out.notes['cut']})" if "cut" in out.notes else ""
        sim.checker.violation(f"{kind}{cut}: the VIPs moved: {moved[:2]}")


def _check_last_announcement(sim: Sim, holder: SimNode) -> None:
    """Clients follow the last gratuitous ARP: the holder's must be the last one."""
    loser = sim.peer_of(holder.name)
    if loser.last_round is not None and (holder.last_round is None
                                         or holder.last_round < loser.last_round):
        sim.checker.violation(f"{holder.name} holds the VIPs but {loser.name} announced them "
                              f"last (at {loser.last_round:.3f}s; {holder.name} at "
                              f"{holder.last_round}s)")


def _check_frozen_standby(sim: Sim, active: SimNode, frozen: SimNode, out: Outcome) -> None:
    """A frozen standby never takes over from a peer that was alive throughout."""
    t0 = out.notes["thaw_at"] - out.notes["pause_s"]
    took = [when for when, name, _ in sim.checker.takeovers if when >= t0 and name == frozen.name]
    if took and active.up:
        sim.checker.violation(f"{frozen.name} took over at {took[0]:.3f}s after a "
                              f"{out.notes['pause_s']}s freeze although {active.name} was alive")


def _check_frozen_active(sim: Sim, frozen: SimNode, out: Outcome) -> None:
    """After a freeze, the old holder never adds the VIPs while the other node holds them."""
    for when, name, peer_claims in sim.checker.acquires:
        if name == frozen.name and when >= out.notes["thaw_at"] and peer_claims:
            sim.checker.violation(f"{frozen.name} added the VIPs at {when:.3f}s after a "
                                  f"{out.notes['pause_s']}s freeze while its peer held them")


def _check_clock_step(sim: Sim, out: Outcome) -> None:
    """A wall-clock step on one node moves nothing and drops no heartbeat as stale."""
    t = sim.clock.now - RUN_AFTER  # the step
    moved = [x for x in sim.checker.takeovers + sim.checker.releases if x[0] >= t]
    if moved and out.loss < 0.2:
        sim.checker.violation(f"clock step of {out.notes['step_s']:+g}s on "
                              f"{out.notes['stepped']}: the VIPs moved: {moved[:2]}")
    stale = sum(n.rejects["stale"] for n in sim.nodes.values())
    if stale:
        sim.checker.violation(f"clock step of {out.notes['step_s']:+g}s on "
                              f"{out.notes['stepped']}: {stale} heartbeats dropped as stale")


def quantiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, math.ceil(p * len(values)) - 1)]

    return {"n": len(values), "p50": round(1000 * statistics.median(values), 1),
            "p99": round(1000 * q(0.99), 1), "max": round(1000 * values[-1], 1)}


def soak(loss: float, hours: float, interval: float, dead_after: int, seed: int,
         witness: bool = False) -> dict[str, Any]:
    """A healthy pair under random loss only: how often does the standby falsely take over?
    With a witness a false suspicion finds the witness's vote held for the incumbent."""
    cfgs = [el.ElectionConfig(node="node-a", priority=150, interval=interval,
                              dead_after=dead_after),
            el.ElectionConfig(node="node-b", priority=100, interval=interval,
                              dead_after=dead_after)]
    sim = Sim(seed, cfgs, ["203.0.113.10/32"], witness=witness)
    for link in sim.links.values():
        link.loss, link.delay, link.jitter = loss, 0.0005, 0.0005
    a, b = sim.nodes.values()
    if sim.witness is not None:
        sim.call(0.0, sim.witness.start)
    sim.call(0.0, a.start)
    sim.call(0.01, b.start)
    sim.run_until(2.0)
    start_takeovers = len(sim.checker.takeovers)
    start_releases = len(sim.checker.releases)
    end = 2.0 + hours * 3600
    step = 60.0
    t = 2.0
    while t < end:
        t = min(t + step, end)
        sim.run_until(t)
    takeovers = sim.checker.takeovers[start_takeovers:]
    releases = sim.checker.releases[start_releases:]
    holder = [n.name for n in sim.nodes.values() if n.state is State.ACTIVE]
    return {"loss": loss, "hours": hours,
            "spurious_takeovers": sum(1 for _, n, _ in takeovers if n == b.name),
            "active_lost_vip": sum(1 for _, n, _ in releases if n == a.name),
            "violations": len(sim.checker.violations), "final_active": holder}


def analytic_rate(loss: float, interval: float, dead_after: int, late: float = 0.5) -> float:
    """False suspicions per hour under independent loss `loss`.

    After an accepted heartbeat, the standby suspects the peer if the next dead_after - 1
    heartbeats are lost and the dead_after-th is lost or arrives after the deadline (it
    is late with probability `late`: 1/2 for independent continuous jitter).
    """
    per_hour = 3600 / interval * (1 - loss)
    return per_hour * loss ** (dead_after - 1) * (loss + (1 - loss) * late)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.simulate", description=__doc__)
    ap.add_argument("--scenarios", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--interval", type=float, default=DEFAULTS.interval)
    ap.add_argument("--dead-after", type=int, default=DEFAULTS.dead_after)
    ap.add_argument("--replay", type=int, help="run one scenario seed and print its violations")
    ap.add_argument("--soak-hours", type=float, default=0.25,
                    help="simulated hours per loss level for the false-failover check")
    ap.add_argument("--arbiter", choices=["none", "witness", "etcd"], default="none",
                    help="the pair alone (default), voting with a simulated witness, or a "
                         "group of --nodes nodes on a simulated etcd")
    ap.add_argument("--nodes", type=int, default=3, help="group size with --arbiter etcd")
    ap.add_argument("--damping-sweep", action="store_true",
                    help="VIP moves of flapping scenarios against damping settings (how "
                         "the defaults were chosen); --scenarios per cell")
    args = ap.parse_args(argv)
    if args.damping_sweep:
        return damping_sweep(args)
    if args.arbiter == "etcd":
        return group_main(args)
    if args.replay is not None:
        out = scenario(args.replay, args.interval, args.dead_after, args.arbiter)
        print(json.dumps(out.__dict__, indent=2, default=str))
        return 1 if out.violations else 0
    outcomes = [scenario(args.seed * 1_000_003 + i, args.interval, args.dead_after,
                         args.arbiter)
                for i in range(args.scenarios)]
    report = build_report(outcomes, args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if report["violations"]["count"] else 0


SWEEP_HOLD_DOWNS = [None, 5.0, 10.0, 30.0, 60.0]  # None: damping off
SWEEP_PERIODS = [(0.1, 2.0), (2.0, 10.0), (10.0, 40.0)]


def damping_sweep(args: argparse.Namespace) -> int:
    """Moves per flapping scenario against the hold-down (one failure damps): the health
    of the preferred active flapping with short, medium and long periods, and a crash
    loop; and how long after it was last stable it took the VIPs back."""
    rows = []
    cells = [("flap_active", p) for p in SWEEP_PERIODS] + [("crash_loop", FLAP_PERIOD)]
    for kind, period in cells:
        seeds = [KINDS.index(kind) + len(KINDS) * (args.seed * 1000 + i)
                 for i in range(args.scenarios)]
        for hold in SWEEP_HOLD_DOWNS:
            damping = DampingConfig(failures=0) if hold is None else DampingConfig(
                failures=1, hold_down=hold)
            outs = [scenario(s, args.interval, args.dead_after, damping=damping,
                             flap_period=period) for s in seeds]
            moves = [o.notes["moves"] for o in outs]
            back = [o.notes["back_after"] for o in outs if "back_after" in o.notes]
            rows.append({
                "kind": kind, "flap_period_s": list(period) if kind == "flap_active" else None,
                "hold_down_s": hold, "n": len(outs), "mean_moves": round(statistics.mean(moves), 2),
                "max_moves": max(moves), "over_2_moves": sum(1 for m in moves if m > 2),
                "back_after_stable_s_median": round(statistics.median(back), 2) if back else None,
                "violations": sum(len(o.violations) for o in outs)})
    if args.json:
        print(json.dumps({"seed": args.seed, "scenarios_per_cell": args.scenarios,
                          "rows": rows}, indent=2))
        return 0
    print(f"{'fault':<12}{'period s':>10}{'hold-down':>10}{'n':>5}{'mean':>7}{'max':>5}"
          f"{'>2':>5}{'back after s':>14}")
    for r in rows:
        span = "-" if r["flap_period_s"] is None else "{:g}-{:g}".format(*r["flap_period_s"])
        held = "off" if r["hold_down_s"] is None else f"{r['hold_down_s']:g} s"
        after = r["back_after_stable_s_median"]
        print(f"{r['kind']:<12}{span:>10}{held:>10}{r['n']:>5}{r['mean_moves']:>7}"
              f"{r['max_moves']:>5}{r['over_2_moves']:>5}{'-' if after is None else after:>14}")
    return 0


def group_main(args: argparse.Namespace) -> int:
    """--arbiter etcd: N nodes on a simulated etcd (simulations/simulate_group.py)."""
    if args.replay is not None:
        out = simulate_group.scenario(args.replay, args.nodes)
        print(json.dumps(out.__dict__, indent=2, default=str))
        return 1 if out.violations else 0
    outcomes = [simulate_group.scenario(args.seed * 1_000_003 + i, args.nodes)
                for i in range(args.scenarios)]
    bad = [o for o in outcomes if o.violations]
    failover = {kind: quantiles([o.failover for o in outcomes
                                 if o.kind == kind and o.failover is not None])
                for kind in sorted(simulate_group.MEASURED)}
    report = {"arbiter": "etcd", "nodes": args.nodes, "scenarios": len(outcomes),
              "seed": args.seed, "ttl_s": simulate_group.TTL,
              "violations": {"count": sum(len(o.violations) for o in bad),
                             "scenarios": len(bad),
                             "first": [{"seed": o.seed, "kind": o.kind,
                                        "violations": o.violations[:3],
                                        "replay": f"python -m simulations.simulate --arbiter "
                                                  f"etcd --nodes {args.nodes} --replay {o.seed}"}
                                       for o in bad[:5]]},
              "failover_ms": failover}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{len(outcomes)} scenarios, {args.nodes} nodes on etcd (TTL "
              f"{simulate_group.TTL:g} s), seed {args.seed}: "
              f"{report['violations']['count']} violations")
        for v in report["violations"]["first"]:
            print(f"  seed {v['seed']} ({v['kind']}): {v['violations']}")
        print(f"{'fault':<16}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
        for kind, q in failover.items():
            print(f"{kind:<16}{q['n']:>5}{q.get('p50', '-'):>9}{q.get('p99', '-'):>9}"
                  f"{q.get('max', '-'):>9}")
    return 1 if bad else 0


def build_report(outcomes: list[Outcome], args: argparse.Namespace) -> dict[str, Any]:
    witness = args.arbiter == "witness"
    bad = [o for o in outcomes if o.violations]
    failover: dict[str, Any] = {}
    for kind in sorted(ARBITER_MEASURED if witness else MEASURED):
        # (outcome, failover) of the scenarios where the other node did take over
        rows = [(o, o.failover) for o in outcomes if o.kind == kind and o.failover is not None]
        failover[kind] = quantiles([f for _, f in rows])
        at5 = [(o, f) for o, f in rows if o.loss == 0.05]
        failover[kind]["at_5pct_loss"] = quantiles([f for _, f in at5])
        if kind in ("stop", "health_fail"):
            # The resign target is per scenario: failover <= 2 x its one-way delay + 10 ms.
            excess = quantiles([f - 2 * o.delay for o, f in at5])
            failover[kind]["at_5pct_loss"]["p99_minus_2x_delay_ms"] = excess.get("p99")
            failover[kind]["at_5pct_loss"]["over_2x_delay_plus_10ms"] = sum(
                1 for o, f in at5 if f > 2 * o.delay + 0.010)
        if kind in ("switchover", "maintenance", "promote", "stop"):
            failover[kind]["max_gap_without_holder_ms"] = round(
                1000 * max((o.gap or 0.0 for o, _ in rows), default=0.0), 1)
    soaks = [soak(p, args.soak_hours, args.interval, args.dead_after, args.seed, witness)
             for p in (0.2, 0.3, 0.4)] if args.soak_hours > 0 else []
    for s in soaks:
        s["analytic_per_hour"] = round(analytic_rate(s["loss"], args.interval,
                                                     args.dead_after), 3)
        s["simulated_per_hour"] = round(s["spurious_takeovers"] / s["hours"], 3)
    replay = "python -m simulations.simulate" + (" --arbiter witness" if witness else "")
    report: dict[str, Any] = {
        "scenarios": len(outcomes),
        "seed": args.seed,
        "heartbeat": {"interval_ms": round(args.interval * 1000, 3),
                      "dead_after": args.dead_after,
                      "dead_interval_ms": round(args.interval * args.dead_after * 1000, 3)},
        "violations": {"count": sum(len(o.violations) for o in bad),
                       "scenarios": len(bad),
                       "first": [{"seed": o.seed, "kind": o.kind, "loss": o.loss,
                                  "violations": o.violations[:3],
                                  "replay": f"{replay} --replay {o.seed}"}
                                 for o in bad[:5]]},
        "failover_ms": failover,
        "false_failovers_per_hour": {
            str(p): analytic_rate(p, args.interval, args.dead_after) for p in (0.01, 0.05, 0.2)},
        "false_failover_method": (
            "analytic rate of false suspicions (standby takeovers while the active is fine) "
            "= heartbeats/h x loss^(dead_after-1) x (loss + (1-loss)/2), checked against "
            "simulated soaks at 20/30/40% loss (soak_checks); a false suspicion never moves "
            "the VIP because the incumbent wins the split brain, so this rate bounds it"),
        "soak_checks": soaks,
        "flapping": flapping_summary(outcomes),
    }
    if witness:
        report["arbiter"] = arbiter_summary(outcomes, args)
    return report


def flapping_summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """VIP moves per flapping scenario (flap_active, crash_loop): how many scenarios moved
    them how often (at most FLAPPING_MOVES with damping)."""
    summary: dict[str, Any] = {}
    for kind in sorted(FLAPPING):
        moves = [o.notes["moves"] for o in outcomes if o.kind == kind and "moves" in o.notes]
        summary[kind] = {"n": len(moves), "max_moves": max(moves, default=0),
                         "scenarios_by_moves": {str(m): moves.count(m)
                                                for m in sorted(set(moves))}}
    return summary


def arbiter_summary(outcomes: list[Outcome], args: argparse.Namespace) -> dict[str, Any]:
    """What the witness runs add to the report: the lease and margin, and how often the
    faults that must not move the VIPs (or must not elect a lone standby) were run."""
    lease = args.interval * args.dead_after
    kinds = {o.kind for o in outcomes}
    return {
        "kind": "witness",
        "vote_lease_ms": round(1000 * lease, 3),
        "counted_lease_ms": round(1000 * counted_lease(lease), 3),
        "max_clock_rate_difference": 2 * RATE_SPREAD,
        "kinds": sorted(kinds),
        "holder_must_stay": sum(1 for o in outcomes if o.kind in HOLDER_STAYS
                                or o.notes.get("witness_only")),
        "lone_standby_must_wait": sum(1 for o in outcomes
                                      if o.kind == "witness_crash_then_active_crash"),
        "liveness_bound_ms": round(1000 * (lease + 2 * args.interval), 3),
    }


def print_table(report: dict[str, Any]) -> None:
    hb = report["heartbeat"]
    print(f"{report['scenarios']} scenarios, seed {report['seed']}, heartbeat "
          f"{hb['interval_ms']} ms x {hb['dead_after']}: "
          f"{report['violations']['count']} violations")
    if "arbiter" in report:
        arb = report["arbiter"]
        print(f"arbiter: witness, vote lease {arb['vote_lease_ms']} ms (counted "
              f"{arb['counted_lease_ms']} ms), clock rates within "
              f"{arb['max_clock_rate_difference']:.2%} of each other")
    for v in report["violations"]["first"]:
        print(f"  seed {v['seed']} ({v['kind']}, loss {v['loss']}): {v['violations']}")
    print(f"{'fault':<14}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}   at 5% loss: "
          f"{'n':>4}{'p50':>8}{'p99':>8}{'max':>8}")
    for kind, q in report["failover_ms"].items():
        q5 = q["at_5pct_loss"]
        print(f"{kind:<14}{q['n']:>5}{q.get('p50', '-'):>9}{q.get('p99', '-'):>9}"
              f"{q.get('max', '-'):>9}   {'':>12}{q5['n']:>4}{q5.get('p50', '-'):>8}"
              f"{q5.get('p99', '-'):>8}{q5.get('max', '-'):>8}")
    for kind, f in report["flapping"].items():
        print(f"{kind}: {f['n']} scenarios, VIP moves at most {f['max_moves']} "
              f"(scenarios by moves: {f['scenarios_by_moves']})")
    for p, rate in report["false_failovers_per_hour"].items():
        print(f"false failovers/hour at {float(p):.0%} loss (analytic): {rate:.3g}")
    for s in report["soak_checks"]:
        print(f"soak {s['loss']:.0%} loss, {s['hours']} h: simulated {s['simulated_per_hour']}/h "
              f"vs analytic {s['analytic_per_hour']}/h; the active lost the VIP "
              f"{s['active_lost_vip']}x")


if __name__ == "__main__":
    sys.exit(main())
