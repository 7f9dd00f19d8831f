"""Lease votes: who may hold the VIPs when a pair has an arbiter. Pure: time is passed in.

Each voter (both nodes and every witness) has one `Ballot`: it grants its vote to at
most one node at a time, for a lease counted on the voter's own clock from when it
grants, and grants no other node until that lease has run out; a voter that (re)starts
grants nothing for one lease, since it may have forgotten a grant. A candidate keeps a
`Tally`: each vote counts from the *send* time of the request that won it, on the
candidate's clock, shortened by `counted_lease`. A node holds the VIPs (keeps its kernel
gate open) only until the moment its majority of counted votes runs out:
`Tally.majority_until`. Why two nodes can never both be inside that moment is argued in
docs/election.md ("arbitration by lease votes").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vipd.core.protocol import Verdict

# Clock-rate margin: the voter's lease may run up to 0.1 % faster (by real time) than the
# candidate's count of it. Crystal oscillators drift by tens of ppm and NTP slews at most
# 500 ppm, so 1000 ppm covers an undisciplined clock too. The fixed part covers the
# kernel gate's timer (nftables set timeouts tick in jiffies: 4 ms at HZ=250) and the
# time between reading the clock and the gate element being written.
RATE_MARGIN = 0.001
FIXED_MARGIN = 0.005
# A node that asks a witness nothing (a standby) probes it this often, so both nodes know
# whether failover would be possible; a witness is reachable while it answered within
# REACHABLE_LEASES leases (or two probes).
PROBE_EVERY = 0.5
REACHABLE_LEASES = 3


def counted_lease(lease: float) -> float:
    """How long a candidate counts a vote of lease ``lease``, from its request's send time."""
    return max(lease * (1.0 - RATE_MARGIN) - FIXED_MARGIN, 0.0)


def majority(voters: int) -> int:
    return voters // 2 + 1


@dataclass(slots=True)
class Ballot:
    """One voter's vote (a node's own, or a witness's for one cluster)."""

    lease: float
    grantee: str | None = None
    granted_at: float = float("-inf")
    until: float = float("-inf")
    blocked_until: float = float("-inf")  # (re)started: no grant before this

    @classmethod
    def started(cls, lease: float, now: float) -> Ballot:
        """A voter that just started may have granted its vote before it (re)started."""
        return cls(lease, blocked_until=now + lease)

    def holder(self, now: float) -> str | None:
        """Whose the vote is now (None: free)."""
        return self.grantee if now < self.until else None

    def grant(self, candidate: str, now: float, lease: float | None = None) -> Verdict:
        """Grant (or renew) the vote to ``candidate`` at ``now`` unless another node holds
        it or the voter is still within its start-up lease. ``lease``: the one asked for
        (a witness grants what the request asks; a node its own configured lease)."""
        if now < self.blocked_until:
            return Verdict.RESTARTING
        holder = self.holder(now)
        if holder is not None and holder != candidate:
            return Verdict.HELD
        self.grantee, self.granted_at = candidate, now
        self.until = max(self.until if holder is not None else now,
                         now + (self.lease if lease is None else lease))
        return Verdict.GRANTED

    def release(self, candidate: str) -> bool:
        """The grantee gives the vote back: it promised it no longer holds anything by it.
        Only the grantee's own word frees a vote early."""
        if self.grantee != candidate:
            return False
        self.grantee, self.until = None, float("-inf")
        return True

    def wait(self, now: float) -> float:
        """Seconds until this voter could grant someone other than its holder."""
        return max(self.until - now, self.blocked_until - now, 0.0)


@dataclass(slots=True)
class Tally:
    """The votes a candidate holds: voter -> the moment (candidate's clock) each runs out."""

    voters: int  # both nodes plus the witnesses
    expiries: dict[str, float] = field(default_factory=dict)
    counted_from: dict[str, float] = field(default_factory=dict)  # request send times
    # Requests sent before this (our clock) are answered for nobody: we gave our votes up
    # then, and the voter may have granted another node since our give-back reached it.
    floor: float = float("-inf")

    def record(self, voter: str, request_sent_at: float, lease: float) -> None:
        """A vote granted in answer to the request we sent at ``request_sent_at``
        (ignored if we have given up our votes since we sent it)."""
        if request_sent_at < self.floor:
            return
        until = request_sent_at + counted_lease(lease)
        if until > self.expiries.get(voter, float("-inf")):
            self.expiries[voter] = until
            self.counted_from[voter] = request_sent_at

    def drop(self, voter: str) -> None:
        self.expiries.pop(voter, None)
        self.counted_from.pop(voter, None)

    def clear(self, now: float) -> None:
        """We count nothing from now on, and no answer to a request sent before now."""
        self.expiries.clear()
        self.counted_from.clear()
        self.floor = now

    def held(self, now: float) -> list[str]:
        """The voters whose vote is unexpired now, sorted."""
        return sorted(v for v, until in self.expiries.items() if now < until)

    def majority_until(self, now: float) -> float | None:
        """Until when a majority of the voters' votes is held (None: not held now)."""
        live = sorted((until for until in self.expiries.values() if now < until),
                      reverse=True)
        need = majority(self.voters)
        return live[need - 1] if len(live) >= need else None
