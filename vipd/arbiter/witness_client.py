"""A node's end of the witness votes: requests out, replies in, over the heartbeat socket.

One `Session` per witness (its own sequence numbers, replay window and echo), sealing
VOTE_REQUEST messages and opening VOTE_REPLY ones. A reply echoes the request it answers,
so the election learns the send time to count the vote from (`VoteReplied`). The
witnesses' addresses are the voter ids in the election, status and metrics.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from vipd.core.events import VoteReplied
from vipd.core.protocol import (
    Advert,
    Flag,
    KeyRing,
    Kind,
    Received,
    Session,
    Vote,
    flag_of,
)


@dataclass(slots=True)
class WitnessLink:
    voter: str  # "host:port", as configured
    address: tuple[str, int]
    session: Session
    last_reply: float | None = None  # loop time of the last authenticated reply


class WitnessClient:
    def __init__(self, *, cluster: str, node: str, keys: KeyRing, boot_id: int,
                 digest: bytes, witnesses: list[tuple[str, tuple[str, int]]],
                 lease: float, max_skew: float) -> None:
        self.lease_ms = max(round(lease * 1000), 1)
        self.links: dict[Hashable, WitnessLink] = {}
        for voter, (host, port) in witnesses:
            session = Session(cluster=cluster, node=node, keys=keys, boot_id=boot_id,
                              digest=digest, peer_sources={host}, max_skew=max_skew,
                              expect=Kind.VOTE_REPLY)
            self.links[host] = WitnessLink(voter, (host, port), session)

    def rekey(self, keys: KeyRing) -> None:
        for link in self.links.values():
            link.session.rekey(keys)

    def knows(self, source: Hashable) -> bool:
        return source in self.links

    def requests(self, advert: Advert, release: bool, now: float,
                 wall_ns: int) -> list[tuple[bytes, tuple[str, int]]]:
        """One VOTE_REQUEST per witness; ``release``: give our vote back (RESIGNING)."""
        if release:
            advert = Advert(advert.state, flag_of(int(advert.flags | Flag.RESIGNING)),
                            advert.term, advert.priority, advert.effective_priority)
        vote = Vote(lease_ms=self.lease_ms)
        return [(link.session.seal(advert, now, wall_ns, kind=Kind.VOTE_REQUEST, vote=vote),
                 link.address) for link in self.links.values()]

    def open(self, data: bytes, source: Hashable, now: float,
             wall_ns: int) -> VoteReplied:
        """Authenticate a witness's reply (raises `Rejected`) into an election event."""
        link = self.links[source]
        rx: Received = link.session.open(data, now, wall_ns, source)
        link.last_reply = now
        vote = rx.heartbeat.vote
        assert vote is not None  # the VOTE_REPLY kind always has the block
        return VoteReplied(voter=link.voter, verdict=vote.verdict,
                           request_sent_at=rx.echo_sent_at, lease=vote.lease_ms / 1000,
                           wait=vote.wait_ms / 1000)

    def last_replies(self) -> dict[str, float | None]:
        return {link.voter: link.last_reply for link in self.links.values()}

