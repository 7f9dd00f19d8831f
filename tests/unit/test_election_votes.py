"""The election with an arbiter: campaigns, self-fencing, planned moves and who may have a
vote. Driven through the simulator's network (simulations/simnet.py) with the real
election, sessions and witness core, so each test is a short scripted scenario; the rules
of one ballot and one tally are in tests/unit/test_votes.py, the witness's in
tests/unit/test_core_witness.py."""

from __future__ import annotations

from simulations.simnet import WITNESS, Sim, SimNode
from vipd.core import election as el
from vipd.core.events import Why
from vipd.core.protocol import State, Verdict
from vipd.core.votes import counted_lease

INTERVAL, DEAD_AFTER = 0.04, 8
LEASE = INTERVAL * DEAD_AFTER  # the vote lease defaults to the dead interval


def running_pair() -> tuple[Sim, SimNode, SimNode]:
    """node-a ACTIVE with the votes of all three, node-b STANDBY, after a warm-up."""
    cfgs = [el.ElectionConfig(node="node-a", priority=150, interval=INTERVAL,
                              dead_after=DEAD_AFTER),
            el.ElectionConfig(node="node-b", priority=100, interval=INTERVAL,
                              dead_after=DEAD_AFTER)]
    sim = Sim(5, cfgs, ["203.0.113.10/32"], witness=True)
    assert sim.witness is not None
    a, b = sim.nodes["node-a"], sim.nodes["node-b"]
    sim.witness.start()
    a.start()
    b.start()
    sim.run_until(1.5)
    assert (a.state, b.state) == (State.ACTIVE, State.STANDBY)
    return sim, a, b


def cut(sim: Sim, *links: tuple[str, str]) -> None:
    for link in links:
        sim.links[link].blocked = True


def reasons(sim: Sim, since: float) -> list[tuple[str, str]]:
    return [(name, reason) for when, name, reason in sim.checker.takeovers + sim.checker.releases
            if when >= since]


def test_a_candidate_takes_over_only_with_a_majority() -> None:
    """The witness down, then the active dead: one vote of three is no majority, and the
    standby says why it waits. With the witness back (after its start-up lease) it wins."""
    sim, a, b = running_pair()
    assert sim.witness is not None
    sim.witness.crash()
    a.crash()
    sim.run_until(4.0)
    assert b.state is State.STANDBY and b.election is not None
    assert b.election.campaign is not None and b.election.campaign[0] is Why.PEER_DEAD
    assert "node-b of 3 (need 2)" in b.election.votes_text(b.local(4.0))
    sim.witness.start()
    sim.run_until(4.0 + LEASE + 3 * INTERVAL)
    assert b.state is State.ACTIVE
    assert sim.checker.violations == []


def test_a_holder_cut_off_from_both_voters_fences_itself_before_the_other_opens() -> None:
    sim, a, b = running_pair()
    t = sim.clock.now
    cut(sim, *[link for link in sim.links if "node-a" in link])
    sim.run_until(t + 1.0)
    assert a.election is not None and a.state is State.STANDBY
    (fenced, _, reason), = [r for r in sim.checker.releases if r[0] >= t]
    assert reason.startswith("self-fence") and fenced <= t + counted_lease(LEASE) + INTERVAL
    assert b.state is State.ACTIVE
    opened = [when for when, name in sim.checker.gate_opens if name == "node-b" and when >= t]
    assert opened and opened[0] >= fenced  # break before make, by the votes alone
    assert sim.checker.violations == []


def test_losing_the_witness_alone_moves_nothing() -> None:
    """The pair's own two votes are a majority: the witness is not needed while the nodes
    hear each other."""
    sim, a, _ = running_pair()
    assert sim.witness is not None
    t = sim.clock.now
    sim.witness.crash()
    sim.run_until(t + 3.0)
    assert reasons(sim, t) == []
    assert a.election is not None and a.election.tally is not None
    assert a.election.tally.held(a.local(t + 3.0)) == ["node-a", "node-b"]
    assert sim.checker.violations == []


def test_a_switchover_is_break_before_make_and_waits_for_no_lease() -> None:
    sim, a, b = running_pair()
    t = sim.clock.now
    a.handle(el.Command(el.CommandKind.SWITCHOVER))
    assert not a.gate_open(t)  # shut before the RESIGNING heartbeat leaves
    sim.run_until(t + 0.05)
    took = [when for when, name, _ in sim.checker.takeovers if name == "node-b" and when >= t]
    assert took and took[0] - t < 0.02  # milliseconds, not a lease of 320
    sim.run_until(t + 1.0)
    assert (a.state, b.state) == (State.STANDBY, State.ACTIVE)
    assert sim.checker.violations == []


def test_a_standby_probe_never_takes_the_witness_vote() -> None:
    """What the runtime sends for a node that asks for nothing (its advert: neither
    ACTIVE nor CANDIDATE) is a probe: held or free, the witness grants nothing."""
    sim, a, b = running_pair()
    assert sim.witness is not None and sim.witness.core is not None
    assert b.election is not None and b.witness_client is not None

    def probe() -> dict[str, str | None]:
        now = sim.clock.now
        assert b.election is not None and b.witness_client is not None
        for data, _ in b.witness_client.requests(b.election.advert(), False, b.local(now),
                                                 b.wall_ns(now)):
            sim.witness.deliver(data, "node-b")  # type: ignore[union-attr]
        return sim.witness.core.holders(sim.witness.local(now))  # type: ignore[union-attr]

    assert probe() == {"web": "node-a"} and sim.witness.verdicts["HELD"] == 1
    b.handle(el.Command(el.CommandKind.MAINTENANCE_ON))  # b will not campaign
    a.crash()
    sim.run_until(sim.clock.now + 2 * LEASE)
    assert probe() == {"web": None} and sim.witness.verdicts["RELEASED"] == 1


def test_a_standby_does_not_vote_for_a_peer_that_cannot_hear_it() -> None:
    """Regression (python -m simulations.simulate --arbiter witness --replay 7000208): a
    node's vote travels in its heartbeats, so one granted to a peer that does not hear
    them reaches nobody and only kept the node from campaigning with it itself."""
    sim, a, b = running_pair()
    t = sim.clock.now
    cut(sim, ("node-b", "node-a"))  # a hears nothing of b; b still hears a
    sim.run_until(t + 3 * LEASE)
    assert b.election is not None and b.election.ballot is not None
    assert b.election.ballot.holder(b.local(sim.clock.now)) is None
    assert a.state is State.ACTIVE  # with the witness's vote and its own
    assert sim.checker.violations == []


def test_the_witness_stops_renewing_a_node_that_no_longer_hears_it() -> None:
    """Regression (--arbiter witness --replay 7000148, 7000348, 7000448): a node whose
    replies from the witness are lost kept renewing the witness's vote it could not
    count, so the other node could never be elected. Its request echoes our last reply
    it heard; once that is older than the lease the witness answers STALE."""
    sim, a, _ = running_pair()
    assert sim.witness is not None and sim.witness.core is not None
    t = sim.clock.now
    cut(sim, (WITNESS, "node-a"))
    sim.run_until(t + 2 * LEASE + INTERVAL)
    assert a.state is State.ACTIVE  # its own vote and b's: nothing moves
    assert sim.witness.core.holders(sim.witness.local(sim.clock.now)) == {"web": None}
    assert sim.witness.verdicts["STALE"] > 0
    sim.links[(WITNESS, "node-a")].blocked = False
    sim.run_until(sim.clock.now + 0.2)
    assert sim.witness.core.holders(sim.witness.local(sim.clock.now)) == {"web": "node-a"}
    assert reasons(sim, t) == [] and sim.checker.violations == []


def test_a_late_grant_for_a_request_sent_before_stepping_down_is_not_counted() -> None:
    """The holder asks the witness, fails its health check (giving its votes up) and
    recovers: the witness's late GRANTED for the request sent while it was still ACTIVE
    must not count towards a new campaign; the witness may have granted node-b since."""
    sim, a, _ = running_pair()
    assert a.election is not None and a.election.tally is not None
    now = sim.clock.now
    asked_at = a.local(now) - 0.001  # a request that left just before the step-down
    a.health = False
    a.handle(el.HealthChanged(False, "sim: down"))
    assert a.state is State.FAULT and a.election.tally.held(a.local(now)) == []
    a.handle(el.VoteReplied(WITNESS, Verdict.GRANTED, asked_at, LEASE))
    assert WITNESS not in a.election.tally.held(a.local(now))


def test_a_holder_that_fails_frees_the_standbys_vote_at_once() -> None:
    """The active's health fails with the witness down: its FAULT heartbeat (it asks for
    nothing any more) frees the standby's own vote, and with the failed node's vote the
    standby has two of three without waiting for a lease to run out."""
    sim, a, b = running_pair()
    assert sim.witness is not None
    sim.witness.crash()
    t = sim.clock.now
    a.health = False
    a.handle(el.HealthChanged(False, "sim: down"))
    sim.run_until(t + LEASE)
    took = [when for when, name, _ in sim.checker.takeovers if name == "node-b" and when >= t]
    assert took and took[0] - t < LEASE / 4, took
    assert b.state is State.ACTIVE and sim.checker.violations == []
