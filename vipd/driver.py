"""The driver: the one place that feeds the election and reads the loop clock.

Data flows one way. A datagram, the timer or a command becomes an event; the driver
hands it to the pure election with the loop's time (`handle`); the election answers
with actions; the driver gives each to the part that carries it out (the session and
socket for heartbeats, the VIP worker for addresses and announcements, the hook runner,
the state file, sd_notify, metrics). Exactly one timer is armed: the election's next
deadline, re-armed after every step (aioquic's get_timer / handle_timer shape).

Datagrams arrive in batches (`HeartbeatTransport` drains its socket): the whole batch is
authenticated before the election acts on the first, and the timer drains the socket
before it decides, so after a stall the peer's queued heartbeats are heard first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from vipd import flaps
from vipd.arbiter.witness_client import WitnessClient
from vipd.config import Config
from vipd.core import election as el
from vipd.core.events import UNPLANNED_TAKEOVERS
from vipd.core.protocol import KeyRing, Reject, Rejected, Session, State
from vipd.core.votes import PROBE_EVERY
from vipd.deadline import DeadlineTimer
from vipd.hooks import HookRunner
from vipd.metrics import Metrics
from vipd.statefile import StateFile
from vipd.systemd import Notifier
from vipd.transport import HeartbeatTransport
from vipd.vipworker import VipWorker

log = logging.getLogger(__name__)


def new_session(config: Config, keys: KeyRing, boot_id: int, digest: bytes) -> Session:
    hb = config.pair
    return Session(cluster=config.cluster, node=config.node, keys=keys, boot_id=boot_id,
                   digest=digest, peer_sources={str(p.host) for p in hb.peers},
                   max_skew=hb.max_clock_skew)


def new_witness_client(config: Config, keys: KeyRing, boot_id: int,
                       digest: bytes) -> WitnessClient | None:
    if config.arbiter is None or config.arbiter.witness is None:
        return None
    return WitnessClient(
        cluster=config.cluster, node=config.node, keys=keys, boot_id=boot_id, digest=digest,
        witnesses=[(str(w), (str(w.host), w.port)) for w in config.arbiter.witness],
        lease=config.vote_lease, max_skew=config.pair.max_clock_skew)


class Driver:
    def __init__(self, config: Config, election: el.Election, session: Session,
                 worker: VipWorker, hooks: HookRunner, state_file: StateFile,
                 notifier: Notifier, metrics: Metrics, on_finished: Callable[[], None],
                 witnesses: WitnessClient | None = None, crashed: bool = False) -> None:
        self.config = config
        self.crashed = crashed  # the previous run ended without a clean stop
        self.witnesses = witnesses  # the arbiter's witnesses (config `arbiter`)
        self.election = election
        self.session = session
        self.worker = worker
        self.hooks = hooks
        self.state_file = state_file
        self.notifier = notifier
        self.metrics = metrics
        self._on_finished = on_finished
        self.transport: HeartbeatTransport | None = None
        # (host, port) tuples made once: the send path runs for every heartbeat.
        self._peer_addresses = [(str(p.host), p.port) for p in config.pair.peers]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer = DeadlineTimer(self._on_timer, metrics.hot.lateness.observe)
        self._ready_sent = False
        self._offset_warned = False
        self._last_ask = float("-inf")  # loop time of our last vote request to the witnesses
        self.last_rtt: float | None = None

    def attach(self, transport: HeartbeatTransport) -> None:
        """The heartbeat socket is open: datagrams may arrive from now on (before Start
        they only teach the election about the peer)."""
        self._loop = asyncio.get_running_loop()
        self.transport = transport

    def start(self) -> None:
        self.handle(el.Start(crashed=self.crashed))
        self.state_file.save(running=True)  # until a clean stop says otherwise

    def stop(self) -> None:
        self._timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def ready(self, now: float) -> bool:
        return self.election.ready(now)

    def gate_limit(self, now: float) -> float | None:
        """Until when the kernel gate may stay open: never past the votes held."""
        return self.election.gate_limit(now)

    def tasks(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        """Long-lived tasks of a pair besides the timer: the witness probes."""
        return [] if self.witnesses is None else [(self.probe_witnesses(), "witness probes")]

    # --- events in -----------------------------------------------------------------------

    def handle(self, event: el.Event) -> list[el.Action]:
        """One step of the election at the loop's time; its actions carried out in order."""
        assert self._loop is not None
        now = self._loop.time()
        actions = self.election.handle(event, now)
        for action in actions:
            self._apply(action, now)
        self._rearm()
        if self.election.finished:
            self.state_file.save(running=False)
            self._on_finished()
        elif not self._ready_sent and self.election.ready(now):
            self._ready_sent = True
            self.notifier.notify(READY=1, STATUS=self.status_line())
        return actions

    def reconfigure(self, config: Config, election_cfg: el.ElectionConfig,
                    keys: KeyRing) -> None:
        """A reload: new keys for the session, the new settings to the election as an
        event, the rest to the parts that read them."""
        self.config = self.worker.config = self.hooks.config = config
        self.session.rekey(keys)
        if self.witnesses is not None:
            self.witnesses.rekey(keys)
        self.handle(el.Reconfigure(election_cfg))

    def on_datagrams(self, batch: list[tuple[bytes, str]]) -> None:
        """Authenticate the whole batch, then let the election act on each in order: a
        heartbeat sent in reaction to the first already echoes the newest. (After a
        stall the peer then sees at once that we hear it again.)"""
        assert self._loop is not None
        now, wall_ns = self._loop.time(), time.time_ns()
        events = [event for data, source in batch
                  if (event := self._open(data, source, now, wall_ns)) is not None]
        for event in events:
            self.handle(event)

    def _open(self, data: bytes, source: str, now: float,
              wall_ns: int) -> el.HeartbeatReceived | el.DuplicateNode | el.VoteReplied | None:
        try:
            if self.witnesses is not None and self.witnesses.knows(source):
                reply = self.witnesses.open(data, source, now, wall_ns)
                self.metrics.vote_replies.labels(reply.voter, reply.verdict.name.lower()).inc()
                return reply
            rx = self.session.open(data, now, wall_ns, source)
        except Rejected as exc:
            rejected = self.metrics.hot.rejected
            count = rejected[exc.reason.value] + 1
            rejected[exc.reason.value] = count
            if exc.reason is Reject.DUPLICATE_NODE:
                return self._duplicate_node(source, count)
            if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th ...: visible, not spam
                log.warning("heartbeat from %s rejected (%d so far): %s", source, count, exc)
            return None
        hot = self.metrics.hot
        hot.received += 1
        if rx.rtt is not None:
            self.last_rtt = rx.rtt
            hot.rtt.observe(rx.rtt)
        if rx.clock_offset is not None:
            self._watch_clock_offset(rx.clock_offset)
        return el.HeartbeatReceived(rx)

    def _duplicate_node(self, source: str, count: int) -> el.DuplicateNode:
        """Another live node sends heartbeats under our name: a configuration error that
        would otherwise leave both nodes ACTIVE. The election goes FAULT while it lasts."""
        node, bind = self.config.node, self.config.pair.bind
        detail = (f"duplicate node name {node!r}: the node at {source} uses it too (this "
                  f"node sends from {bind}); give each node its own name")
        if count & (count - 1) == 0:
            log.error("%s; FAULT and no VIPs here while it is heard (%d heartbeats so far)",
                      detail, count)
        return el.DuplicateNode(detail)

    def _watch_clock_offset(self, offset: float) -> None:
        """The wall clocks may disagree (heartbeats stay fresh by the echo); say so once
        when the offset crosses max_clock_skew, and once when it is back."""
        limit = self.config.pair.max_clock_skew
        far = abs(offset) > limit
        if far == self._offset_warned:
            return
        self._offset_warned = far
        if far:
            log.warning("the peer's wall clock is %+.3f s from ours (more than "
                        "max_clock_skew %g s): check NTP on both nodes; heartbeats stay "
                        "valid, their freshness is proven by the echo", offset, limit)
        else:
            log.info("the peer's wall clock agrees with ours again (%+.3f s)", offset)

    # --- the timer -----------------------------------------------------------------------

    def _rearm(self) -> None:
        self._timer.arm(self.election.next_deadline())

    def _on_timer(self, deadline: float) -> None:
        if self.transport is not None:
            self.transport.drain()  # after a stall the peer's heartbeats are heard first
        self.handle(el.Tick())

    def timer_works(self, stale: float) -> bool:
        return self._timer.works(stale)

    # --- actions out ---------------------------------------------------------------------

    def _apply(self, action: el.Action, now: float) -> None:
        match action:
            case el.SendHeartbeat(advert=advert):
                assert self.transport is not None
                data = self.session.seal(advert, now, time.time_ns())
                self.metrics.hot.sent += self.transport.send(data, self._peer_addresses)
            case el.Transition(old=old, new=new, why=why, reason=reason, term=term):
                self._log_transition(old, new, reason, term, now)
                self.notifier.notify(STATUS=f"{new.name} term {term} ({reason})")
                self.metrics.transitions.labels(old.name, new.name, why.value).inc()
                if why is el.Why.NO_QUORUM:
                    self.metrics.self_fence.labels("votes_lost").inc()
                peer = self.election.peer
                if new is State.ACTIVE and peer is not None and why in UNPLANNED_TAKEOVERS:
                    self.metrics.detection.observe(max(now - peer.received_at, 0.0))
                self.state_file.save(term=term, maintenance=self.election.maintenance)
            case el.AcquireVips() | el.ReleaseVips():
                self.worker.apply(action, now)
            case el.Announce(reason=reason):
                self.worker.announce(reason)
            case el.RunHook():
                self.hooks.start(action)
            case el.CommandResult(kind=kind, accepted=ok, message=message):
                log.info("command %s %s: %s", kind, "accepted" if ok else "refused", message)
                self.state_file.save(term=self.election.term,
                                     maintenance=self.election.maintenance)
            case el.Warn(message=message):
                log.warning("%s", message)
            case el.CloseGate(reason=reason):
                self.worker.close_gate(reason)  # at once: a later action may vote for the peer
            case el.AskVotes(release=release):
                self._ask_witnesses(release, now)
            case el.DampingChanged():
                flaps.report(action, self.election.damper, now, self.state_file, self.metrics)

    def _ask_witnesses(self, release: bool, now: float) -> None:
        """Vote requests to every witness: what the election's advert says decides what
        the witness does (ACTIVE or CANDIDATE: grant; RESIGNING: give back; else probe)."""
        if self.witnesses is None or self.transport is None:
            return
        self._last_ask = now
        for data, address in self.witnesses.requests(self.election.advert(), release, now,
                                                     time.time_ns()):
            self.transport.send(data, (address,))

    async def probe_witnesses(self) -> None:
        """A node that asks the witnesses nothing (a standby) still probes them, so both
        nodes know, and say, whether a failover would find a majority."""
        while True:
            await asyncio.sleep(PROBE_EVERY)
            if self._loop is not None and self.loop_time() - self._last_ask >= PROBE_EVERY:
                self._ask_witnesses(False, self.loop_time())

    def witness_replies(self) -> dict[str, float | None]:
        return {} if self.witnesses is None else self.witnesses.last_replies()

    def _log_transition(self, old: State, new: State, reason: str, term: int,
                        now: float) -> None:
        detail = ""
        peer = self.election.peer
        if new is State.ACTIVE and peer is not None:
            detail = f", peer last heard {1000 * (now - peer.received_at):.0f} ms ago"
        log.info("%s -> %s (%s), term %d%s", old.name, new.name, reason, term, detail)

    def status_line(self) -> str:
        e = self.election
        peer = e.peer.heartbeat if e.peer is not None else None
        seen = f"peer {peer.node} {peer.state.name}" if peer is not None else "peer not heard"
        return f"{e.state.name} term {e.term}, {seen}"
