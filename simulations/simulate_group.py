"""Fault scenarios of a group of nodes on etcd (`simulate --arbiter etcd --nodes N`).

Every scenario is built from its seed alone, runs `vipd.core.group` on the simulated
etcd of simulations/simgroup.py, and is checked after every event (never two gates open)
and at the end (one holder; the holder moved only when the fault called for it;
liveness: no stretch without a holder longer than LIVENESS while an eligible node could
reach etcd). See simulations/README.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from simulations.simgroup import CALL_TIMEOUT, EXPIRY_TICK, GroupNode, GroupSim, new_group
from vipd.core.election import _name_key
from vipd.core.events import Command, CommandKind, HealthChanged, Shutdown
from vipd.core.protocol import State

TTL = 1.0
KINDS = ["crash", "crash_restart", "stop", "health_fail", "switchover", "maintenance",
         "promote", "isolate_holder", "oneway_holder", "isolate_standby", "freeze_holder",
         "freeze_standby", "leader_change", "etcd_down", "standby_restart"]
MEASURED = {"crash", "crash_restart", "stop", "health_fail", "switchover", "maintenance",
            "promote", "isolate_holder"}
NO_MOVE = {"isolate_standby", "leader_change", "standby_restart", "freeze_standby"}
FREEZES = [0.2, 0.7, 1.5, 5.0, 12.0]
LOSSES = [0.0, 0.0, 0.01, 0.05]
WARMUP = 3.0
RUN_AFTER = 6.0
# A holder that dies is replaced once its lease expires (TTL after its last keep-alive,
# up to EXPIRY_TICK later), the watch shows it, and the best member claims; a member
# that is not the best waits one TTL more for the best. Plus calls and retransmissions.
LIVENESS = 2 * TTL + EXPIRY_TICK + 2 * CALL_TIMEOUT + 0.5


@dataclass
class GroupOutcome:
    seed: int
    kind: str
    nodes: int
    loss: float
    violations: list[str]
    failover: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def scenario(seed: int, nodes: int = 3) -> GroupOutcome:
    rng = random.Random(seed * 7919 + 29)
    kind = KINDS[seed % len(KINDS)]
    loss = rng.choice(LOSSES)
    priorities = [rng.choice([100, 120, 150]) for _ in range(nodes)]
    sim = new_group(seed, priorities, ttl=TTL, preempt=rng.random() < 0.5,
                    preempt_delay=rng.choice([0.0, 0.5]))
    for node in sim.nodes.values():
        node.rate = rng.uniform(-0.0005, 0.0005)  # any two within the 0.1 % margin
        node.link.loss = loss
        node.link.delay = rng.uniform(0.0002, 0.002)
    members = list(sim.nodes.values())
    for node in members:
        sim.call(rng.uniform(0, 0.3), node.start)
    sim.run_until(WARMUP)
    out = GroupOutcome(seed, kind, nodes, loss, sim.checker.violations)
    holders = sim.checker.holders()
    if len(holders) != 1:
        sim.checker.violation(f"after warm-up expected one holder, got {holders}")
        return out
    holder = sim.nodes[holders[0]]
    best = max(members, key=lambda n: (n.cfg.priority, _name_key(n.name)))
    # All started within 0.3 s, less than the start wait (a TTL): the best holds, unless
    # a lost segment kept its first calls from etcd for the whole wait.
    if holder is not best and loss == 0:
        sim.checker.violation(f"started together, {holder.name} (priority "
                              f"{holder.cfg.priority}) holds, not the best, {best.name} "
                              f"({best.cfg.priority})")
    standby = rng.choice([n for n in members if n is not holder])
    t = WARMUP + rng.uniform(0, 0.3)
    sim.run_until(t)
    quiet_from = _inject(kind, sim, rng, holder, standby, t, out)
    end = max(t + RUN_AFTER, quiet_from + LIVENESS + 1.0)
    _watch_liveness(sim, quiet_from, end)
    sim.run_until(end)
    _check_end(kind, sim, holder, t, out)
    return out


def _inject(kind: str, sim: GroupSim, rng: random.Random, holder: GroupNode,
            standby: GroupNode, t: float, out: GroupOutcome) -> float:
    """Sets the fault going; returns when the group is whole again (liveness from then)."""
    if kind in ("crash", "crash_restart"):
        holder.crash()
        if kind == "crash_restart":
            back = t + rng.uniform(0.3, 2.0)
            sim.call(back, holder.start)
            return back
    elif kind == "stop":
        holder.handle(Shutdown())
    elif kind == "health_fail":
        holder.health = False
        holder.handle(HealthChanged(False, "sim: service down"))
    elif kind == "switchover":
        target = rng.choice([standby.name, ""])
        holder.handle(Command(CommandKind.SWITCHOVER, target=target))
        out.notes["target"] = target or None
    elif kind == "maintenance":
        holder.handle(Command(CommandKind.MAINTENANCE_ON))
    elif kind == "promote":
        standby.handle(Command(CommandKind.PROMOTE))
        out.notes["promoted"] = standby.name
    elif kind in ("isolate_holder", "oneway_holder", "isolate_standby"):
        node = standby if kind == "isolate_standby" else holder
        both = kind != "oneway_holder"
        direction = rng.choice(["to", "from"])
        if both or direction == "to":
            node.link.to_etcd_blocked = True
        if both or direction == "from":
            node.link.from_etcd_blocked = True
        length = rng.uniform(0.3, 4.0)
        out.notes.update(cut_s=round(length, 3), direction=None if both else direction)

        def heal(n: GroupNode = node) -> None:
            n.link.to_etcd_blocked = n.link.from_etcd_blocked = False
            n.watch_dirty = True

        sim.call(t + length, heal)
        # the rest of the group is whole throughout when the cut node is a standby
        return t if kind == "isolate_standby" else t + length
    elif kind in ("freeze_holder", "freeze_standby"):
        node = holder if kind == "freeze_holder" else standby
        pause = rng.choice(FREEZES)
        out.notes["pause_s"] = pause
        node.freeze()
        sim.call(t + pause, node.thaw)
        return t if kind == "freeze_standby" else t + pause
    elif kind == "leader_change":
        sim.etcd.leader_change()
    elif kind == "etcd_down":
        length = rng.uniform(0.3, 4.0)
        out.notes["down_s"] = round(length, 3)
        sim.etcd.up = False

        def etcd_back() -> None:
            sim.etcd.up = True
            for n in sim.nodes.values():
                n.watch_dirty = True

        sim.call(t + length, etcd_back)
        return t + length
    elif kind == "standby_restart":
        standby.crash()
        back = t + rng.uniform(0.1, 1.0)
        sim.call(back, standby.start)
    return t


def _watch_liveness(sim: GroupSim, since: float, end: float) -> None:
    """From ``since`` on, every stretch without a holder while an eligible node is up
    ends within LIVENESS."""
    step = 0.05
    state: dict[str, float | None] = {"empty_since": None}

    def sample() -> None:
        now = sim.clock.now
        eligible = [n for n in sim.nodes.values() if n.up and not n.frozen
                    and n.election is not None and n.election.eligible(n.local(now))]
        if sim.checker.holders() or not eligible:
            state["empty_since"] = None
        elif (since_empty := state["empty_since"]) is None:
            state["empty_since"] = now
        elif now - since_empty > LIVENESS:
            sim.checker.violation(f"no holder for {now - since_empty:.2f} s although "
                                  f"{eligible[0].name} is eligible (bound {LIVENESS:.2f} s)")
            state["empty_since"] = None
        if now + step <= end:
            sim.clock.at(now + step, sample)

    sim.clock.at(since, sample)


def _check_end(kind: str, sim: GroupSim, holder: GroupNode, t: float,
               out: GroupOutcome) -> None:
    chk = sim.checker
    holders = chk.holders()
    if len(holders) != 1:
        chk.violation(f"end of {kind}: expected one holder, got {holders} "
                      f"(states {[(n.name, n.state) for n in sim.nodes.values()]})")
    moved = [x for x in chk.takeovers if x[0] >= t]
    if kind in NO_MOVE and moved and out.loss < 0.05:
        chk.violation(f"{kind}: the VIPs moved: {moved[:2]}")
    if kind in MEASURED:
        if kind == "isolate_holder" and out.notes["cut_s"] < TTL + EXPIRY_TICK + TTL / 4:
            return  # healed before etcd surely expired the lease: a move or none
        others = [x for x in moved if x[1] != holder.name]
        out.failover = (others[0][0] - t) if others else None
        if out.failover is None and kind != "crash_restart":
            chk.violation(f"{kind}: no other node took over from {holder.name}")
        if kind == "promote" and others and others[0][1] != out.notes["promoted"]:
            chk.violation(f"promote of {out.notes['promoted']}: {others[0][1]} took over")
        if kind == "switchover" and out.notes["target"] and others \
                and others[0][1] != out.notes["target"]:
            chk.violation(f"switchover to {out.notes['target']}: {others[0][1]} took over")


def holders_at_end(sim: GroupSim) -> list[str]:
    return [n.name for n in sim.nodes.values() if n.state is State.ACTIVE]
