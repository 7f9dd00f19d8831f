"""Prometheus metrics: every series vipd exports, in one registry per daemon.

Names carry the `vipd_` prefix and their unit; label values are bounded: states, reason
codes (vipd.core.events.REASON_CODES), configured VIPs and check names, routes. Gauges that
describe "now" (state, peer age) are computed at scrape time from the daemon, so a scrape
always sees the current truth. The series touched on every heartbeat are plain
numbers (`HotMetrics`), not prometheus_client objects. docs/metrics.md lists them all.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vipd import __version__
from vipd.api import HTTP_SHUTDOWN_TIMEOUT
from vipd.config import Endpoint
from vipd.core.damping import Cause
from vipd.core.group import Store
from vipd.core.protocol import Reject, State
from vipd.core.witness import Witness
from vipd.movers.remote import MoverState
from vipd.view import GroupView, Status
from vipd.webconfig import WebListener, start_http

FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# readded: a VIP missing on the holder was added again; removed: a VIP found on a node
# that does not hold was removed; lapsed: the holder's lease ran out while it stalled, so
# it stepped down to re-validate instead of re-adding.
VIP_CORRECTIONS = ("readded", "removed", "lapsed")
FAILOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)


class BucketCounts:
    """A histogram's buckets as plain ints, observed on the event loop only."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        counts = list(self.counts)  # one C-level copy: consistent even from another thread
        cumulative, buckets = 0, []
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets,
                                     sum_value=self.sum)


class HotMetrics(Collector):
    """The series updated on every heartbeat, kept as plain numbers.

    prometheus_client's Counter and Histogram take a lock and go through several layers
    per update. An idle daemon wakes about 50 times a second, each time with cold CPU
    caches, and there these updates cost about 0.1 ms per heartbeat, a tenth of
    the idle CPU. Updated on the loop only; `collect()` copies them.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        # By reason, all from the start at 0 so that rate() and alerts work at once; the
        # path a flood of bad datagrams takes.
        self.rejected = dict.fromkeys((reason.value for reason in Reject), 0)
        self.rtt = BucketCounts(FAST_BUCKETS)
        self.lateness = BucketCounts(FAST_BUCKETS)

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())  # fixed names: registration checks them for clashes

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily("vipd_heartbeats_sent_total", "Heartbeat datagrams sent "
                                  "(one per peer address)", value=self.sent)
        yield CounterMetricFamily("vipd_heartbeats_received_total",
                                  "Heartbeats accepted from the peer", value=self.received)
        rejected = CounterMetricFamily("vipd_heartbeats_rejected_total",
                                       "Datagrams dropped, by reason", labels=["reason"])
        for reason, count in list(self.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield self.rtt.family("vipd_heartbeat_rtt_seconds", "Heartbeat round trip to the peer")
        yield self.lateness.family("vipd_timer_lateness_seconds", "How late vipd's timers "
                                   "fired (the election timer, and the VIP upkeep once or "
                                   "twice a second): event loop lag")


@dataclass
class Metrics:
    registry: CollectorRegistry
    hot: HotMetrics
    transitions: Counter
    check_duration: Histogram
    detection: Histogram
    acquisition: Histogram
    announcements: Counter
    hooks: Counter
    reloads: Counter
    api_requests: Counter
    vip_errors: Counter
    vip_corrections: Counter
    scrape: Histogram
    vote_replies: Counter
    self_fence: Counter
    etcd_errors: Counter
    etcd_latency: Histogram
    mover_latency: Histogram
    mover_errors: Counter
    mover_verified: Histogram
    mover_corrections: Counter
    flaps: Counter


def build_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    registry = registry if registry is not None else CollectorRegistry()
    Info("vipd_build", "vipd build information", registry=registry).info(
        {"version": __version__})
    ProcessCollector(registry=registry)  # process_start_time_seconds, CPU, RSS
    hot = HotMetrics()
    registry.register(hot)
    m = Metrics(
        registry=registry,
        hot=hot,
        transitions=Counter("vipd_transitions_total", "State changes of this node",
                            ["from_state", "to_state", "reason"], registry=registry),
        check_duration=Histogram("vipd_check_duration_seconds", "Health probe duration",
                                 ["check"], buckets=FAST_BUCKETS, registry=registry),
        detection=Histogram("vipd_failover_detection_seconds", "From the peer's last "
                            "heartbeat to our takeover decision, for takeovers because the "
                            "peer failed", buckets=FAILOVER_BUCKETS,
                            registry=registry),
        acquisition=Histogram("vipd_vip_acquisition_seconds", "From the takeover decision to "
                              "the VIPs being on the interface", buckets=FAST_BUCKETS,
                              registry=registry),
        announcements=Counter("vipd_announcements_total", "Gratuitous ARP / unsolicited NA "
                              "rounds sent", registry=registry),
        hooks=Counter("vipd_hook_runs_total", "Hook runs by hook and result",
                      ["hook", "result"], registry=registry),
        reloads=Counter("vipd_config_reloads_total", "Config reloads (SIGHUP) by result",
                        ["result"], registry=registry),
        api_requests=Counter("vipd_api_requests_total", "Control API requests",
                             ["route", "code"], registry=registry),
        vip_errors=Counter("vipd_vip_errors_total", "Failed VIP operations (netlink, "
                           "announce)", registry=registry),
        vip_corrections=Counter("vipd_vip_corrections_total", "Differences the VIP upkeep "
                                "found between what this node should hold and what the "
                                "kernel had, by what it did", ["action"], registry=registry),
        scrape=Histogram("vipd_metrics_scrape_duration_seconds", "Daemon time spent on one "
                         "/metrics request (gauges and rendering)", buckets=FAST_BUCKETS,
                         registry=registry),
        vote_replies=Counter("vipd_arbiter_replies_total", "Authenticated witness replies "
                             "to our vote requests, by verdict", ["witness", "verdict"],
                             registry=registry),
        self_fence=Counter("vipd_self_fence_total", "Times this node gave up the VIPs "
                           "because it no longer held a majority of votes, by reason",
                           ["reason"], registry=registry),
        etcd_errors=Counter("vipd_etcd_errors_total", "etcd calls that failed or got no "
                            "answer in time (arbiter etcd), by call", ["call"],
                            registry=registry),
        etcd_latency=Histogram("vipd_etcd_call_duration_seconds", "Round trip of the etcd "
                               "calls that were answered (arbiter etcd), by call", ["call"],
                               buckets=FAST_BUCKETS, registry=registry),
        mover_latency=Histogram("vipd_mover_call_duration_seconds", "Round trip of remote "
                                "mover calls (config `movers`), by mover and operation",
                                ["mover", "operation"], buckets=FAILOVER_BUCKETS,
                                registry=registry),
        mover_errors=Counter("vipd_mover_errors_total", "Remote mover calls that failed, by "
                             "mover, operation and code (timeout, http_503, ...)",
                             ["mover", "operation", "code"], registry=registry),
        mover_verified=Histogram("vipd_mover_verified_seconds", "From a takeover to the "
                                 "remote mover's verified ownership, by mover", ["mover"],
                                 buckets=FAILOVER_BUCKETS, registry=registry),
        mover_corrections=Counter("vipd_mover_corrections_total", "Times the holder found "
                                  "the provider disagreeing and re-asserted, by mover",
                                  ["mover"], registry=registry),
        flaps=Counter("vipd_flaps_total", "Failures of this node that count for flap "
                      "damping (its health turning bad, the daemon starting after an "
                      "unclean exit), by cause", ["cause"], registry=registry),
    )
    for cause in Cause:
        m.flaps.labels(cause.value)
    m.self_fence.labels("votes_lost")
    for result in ("ok", "error", "refused"):
        m.reloads.labels(result)
    for action in VIP_CORRECTIONS:
        m.vip_corrections.labels(action)
    return m


class StatusCollector(Collector):
    """Gauges of "now", built from the node's `Status` by `refresh()` on the event loop;
    `collect()` (which may run in another thread while rendering) only hands them out."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        return list(self._families)

    def refresh(self, status: Status) -> None:
        self._families = list(self._build(status))

    def _build(self, s: Status) -> Iterable[Metric]:
        info = GaugeMetricFamily("vipd_node_info", "Always 1: names this node and its pair",
                                 labels=["cluster", "node"])
        info.add_metric([s.cluster, s.node], 1.0)
        yield info
        state = GaugeMetricFamily("vipd_state", "1 for the current state of this node",
                                  labels=["state"])
        for member in State:
            state.add_metric([member.name], 1.0 if s.state == member.name else 0.0)
        yield state
        yield GaugeMetricFamily("vipd_term", "Term of this node's last takeover", value=s.term)
        yield GaugeMetricFamily("vipd_pair_term", "Highest term known on the pair",
                                value=s.pair_term)
        for name, value, text in (
                ("vipd_maintenance", s.maintenance, "1 while drained by an operator"),
                ("vipd_preferred", s.preferred, "1 while an operator's choice (not preempted)"),
                ("vipd_healthy", s.healthy is True or s.health_override,
                 "1 when all local checks pass (or a forced promote overrides them)"),
                ("vipd_priority", s.priority, "Configured priority"),
                ("vipd_preemption_damped", s.damping is not None and s.damping.damped,
                 "1 while flap damping keeps this node from preempting")):
            yield GaugeMetricFamily(name, text, value=float(value))
        if s.keys is not None:
            yield GaugeMetricFamily("vipd_heartbeat_signing_key", "Id of the heartbeat key "
                                    "this node signs with (its newest the peer also holds)",
                                    value=float(s.keys.signing))
            yield GaugeMetricFamily("vipd_peer_signing_key", "Id of the key the peer's last "
                                    "accepted heartbeat was signed with (0: not heard)",
                                    value=float(s.keys.peer_signing or 0))
        vip = GaugeMetricFamily("vipd_vip_held", "1 when the VIP is on the interface",
                                labels=["vip"])
        for v in s.vips:
            vip.add_metric([v.address], float(v.held))
        yield vip
        checks = GaugeMetricFamily("vipd_check_up", "1 up, 0 down, -1 unknown",
                                   labels=["check"])
        for c in s.checks:
            checks.add_metric([c.name], -1.0 if c.up is None else float(c.up))
        yield checks
        p = s.peer
        yield GaugeMetricFamily("vipd_peer_reachable", "1 when the peer's heartbeats arrive",
                                value=float(p is not None and p.reachable))
        yield GaugeMetricFamily("vipd_peer_hears_this_node",
                                "1 when the peer echoes this node's recent heartbeats",
                                value=float(p is not None and p.hears_us))
        yield GaugeMetricFamily("vipd_peer_eligible", "1 when the peer could take over now "
                                "(reachable, healthy, STANDBY or ACTIVE, not resigning)",
                                value=float(p is not None and p.eligible))
        yield GaugeMetricFamily("vipd_peer_active", "1 when the reachable peer is ACTIVE",
                                value=float(p is not None and p.active))
        age = GaugeMetricFamily("vipd_peer_last_heartbeat_age_seconds",
                                "Seconds since the last valid heartbeat (absent before the "
                                "first)")
        offset = GaugeMetricFamily("vipd_peer_clock_offset_seconds", "The peer's wall clock "
                                   "minus ours, measured through the heartbeat echo (absent "
                                   "before the first); liveness does not depend on it")
        match = GaugeMetricFamily("vipd_peer_settings_match", "0 when the peer's pair "
                                  "settings digest differs")
        if p is not None:
            age.add_metric([], p.last_heartbeat_seconds_ago)
            if p.clock_offset_seconds is not None:
                offset.add_metric([], p.clock_offset_seconds)
            match.add_metric([], float(p.settings_match))
        errors = CounterMetricFamily("vipd_heartbeat_socket_errors_total", "Heartbeat "
                                     "datagrams the socket refused to send, and errors it "
                                     "reported on receive (queued ICMP)", labels=["direction"])
        for direction in ("send", "receive"):
            errors.add_metric([direction], s.socket_errors.get(direction, 0))
        yield from (age, errors, offset, match)
        fence = GaugeMetricFamily("vipd_fence_open", "1 while the kernel gate lets the VIPs "
                                  "answer, 0 while it is shut (absent without `fence`)")
        if s.fence != "none":
            fence.add_metric([], float(s.fence == "open"))
        yield fence
        filtered = CounterMetricFamily(
            "vipd_heartbeat_filtered_total", "Datagrams to the heartbeat port from neither a "
            "peer nor a witness, dropped by the kernel fence's filter before the socket (read "
            "from its nftables counter; absent without the filter)")
        if s.heartbeat_filtered is not None:
            filtered.add_metric([], s.heartbeat_filtered)
        yield filtered
        movers = GaugeMetricFamily("vipd_mover_state", "1 for each remote mover's state now "
                                   "(idle, acquiring, verified, mismatch, superseded, "
                                   "waiting, error)", labels=["mover", "state"])
        for mv in s.movers:
            for kind in MoverState:
                movers.add_metric([mv.name, kind.value], float(mv.state == kind.value))
        yield movers
        yield from self._arbiter(s)

    @staticmethod
    def _arbiter(s: Status) -> Iterable[Metric]:
        a = s.arbiter
        info = GaugeMetricFamily("vipd_arbiter_info", "Always 1: the kind of arbiter (none: a "
                                 "partition of the heartbeat path makes both nodes active)",
                                 labels=["kind"])
        info.add_metric([a.kind], 1.0)
        yield info
        if s.group is not None:
            yield from StatusCollector._group(s.group)
            return
        if a.kind == "none":
            return
        yield GaugeMetricFamily("vipd_arbiter_lease_seconds", "The vote lease",
                                value=a.lease_seconds)
        yield GaugeMetricFamily("vipd_votes_held", "Unexpired votes this node holds (itself "
                                "included)", value=float(len(a.votes)))
        yield GaugeMetricFamily("vipd_votes_needed", "Votes needed to hold the VIPs (a majority "
                                "of the voters)", value=float(a.majority))
        reachable = GaugeMetricFamily("vipd_arbiter_reachable", "1 when the witness answered "
                                      "within three leases", labels=["witness"])
        last = GaugeMetricFamily("vipd_arbiter_last_reply_age_seconds", "Seconds since the "
                                 "witness's last authenticated reply (absent before the first)",
                                 labels=["witness"])
        for w in a.witnesses:
            reachable.add_metric([w.address], float(w.reachable))
            if w.last_reply_seconds_ago is not None:
                last.add_metric([w.address], w.last_reply_seconds_ago)
        age = GaugeMetricFamily("vipd_vote_age_seconds", "Age of each vote held: since the "
                                "request that won it was sent", labels=["voter", "kind"])
        left = GaugeMetricFamily("vipd_vote_remaining_seconds", "Until each vote held runs out, "
                                 "as this node counts it", labels=["voter", "kind"])
        for v in a.votes:
            age.add_metric([v.voter, v.kind], v.age_seconds)
            left.add_metric([v.voter, v.kind], v.remaining_seconds)
        yield from (reachable, last, age, left)

    @staticmethod
    def _group(g: GroupView) -> Iterable[Metric]:
        state = GaugeMetricFamily("vipd_etcd_state", "1 for how this node stands with etcd "
                                  "now (connecting, ok, unreachable, lease_expired)",
                                  labels=["state"])
        for name in (store.value for store in Store):
            state.add_metric([name], float(g.etcd == name))
        yield state
        ttl = GaugeMetricFamily("vipd_etcd_lease_ttl_seconds", "The holder lease TTL: asked "
                                "(config) and granted by etcd (absent before the grant)",
                                labels=["which"])
        ttl.add_metric(["asked"], g.ttl_seconds)
        if g.granted_ttl_seconds is not None:
            ttl.add_metric(["granted"], g.granted_ttl_seconds)
        yield ttl
        left = GaugeMetricFamily("vipd_etcd_lease_remaining_seconds", "How long this node's "
                                 "lease is surely alive on etcd, as it counts (0: lapsed; "
                                 "absent without a lease)")
        if g.lease_remaining_seconds is not None:
            left.add_metric([], g.lease_remaining_seconds)
        yield left
        yield GaugeMetricFamily("vipd_group_holder_term", "Create revision of the holder key "
                                "(0: nobody holds the VIPs)", value=float(g.holder_term))
        yield GaugeMetricFamily("vipd_group_members", "Members that published a record",
                                value=float(len(g.members)))
        yield GaugeMetricFamily("vipd_group_eligible_members", "Members that could hold the "
                                "VIPs now", value=float(sum(m.eligible for m in g.members)))
        yield GaugeMetricFamily("vipd_group_settings_mismatches", "Members whose settings "
                                "digest (VIPs, etcd prefix and TTL) differs from this node's",
                                value=float(sum(not m.settings_match for m in g.members)))


log = logging.getLogger(__name__)


async def serve_metrics(listen: Endpoint | None, metrics: Metrics, collector: StatusCollector,
                        status: Callable[[], Awaitable[Status]],
                        web_config_file: Path | None = None) -> WebListener | None:
    """GET /metrics on metrics.listen, behind the web config's TLS and basic auth if one
    is given. The status (with its VIP check) is read on the loop (cheap); rendering the
    text runs in a thread so a scrape never delays a heartbeat."""
    if listen is None:
        return None

    async def serve(request: web.Request) -> web.Response:
        current = await status()
        refreshed = time.perf_counter()
        collector.refresh(current)
        body = await asyncio.to_thread(generate_latest, metrics.registry)
        # The VIP read is a netlink round trip in a thread; count only our own work.
        metrics.scrape.observe(time.perf_counter() - refreshed)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    return await start_http(app, listen, web_config_file, "metrics.listen",
                            HTTP_SHUTDOWN_TIMEOUT)


# --- the witness (vipd witness) -------------------------------------------------------------

class WitnessCollector(Collector):
    """Every series of the witness, read from its pure core at scrape time (on the event
    loop: the core's counters are plain ints the loop updates)."""

    def __init__(self, witness: Witness, now: Callable[[], float]) -> None:
        self.witness = witness
        self.now = now
        self.reloads = dict.fromkeys(("ok", "error"), 0)

    def describe(self) -> Iterable[Metric]:
        return []  # label sets change with the config

    def collect(self) -> Iterable[Metric]:
        w, now = self.witness, self.now()
        yield GaugeMetricFamily("vipd_witness_up", "Always 1 while the witness answers",
                                value=1.0)
        yield GaugeMetricFamily("vipd_witness_clusters", "Clusters this witness serves",
                                value=len(w.clusters))
        requests = CounterMetricFamily("vipd_witness_requests_total", "Vote requests "
                                       "answered, by cluster and verdict",
                                       labels=["cluster", "verdict"])
        for (cluster, verdict), count in sorted(w.requests.items()):
            requests.add_metric([cluster, verdict], count)
        yield requests
        rejected = CounterMetricFamily("vipd_witness_rejected_total", "Datagrams refused, "
                                       "by reason", labels=["reason"])
        for reason, count in list(w.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        age = GaugeMetricFamily("vipd_witness_last_request_age_seconds", "Seconds since "
                                "the node's last accepted request (absent before the first)",
                                labels=["cluster", "node"])
        for (cluster, node), at in sorted(w.last_requests().items()):
            age.add_metric([cluster, node], max(now - at, 0.0))
        yield age
        holder = GaugeMetricFamily("vipd_witness_vote_holder", "1 for the node holding this "
                                   "witness's vote of its cluster now, 0 for the others",
                                   labels=["cluster", "node"])
        holders = w.holders(now)
        for cluster, nodes in w.nodes().items():
            for node in nodes:
                holder.add_metric([cluster, node], float(holders.get(cluster) == node))
        yield holder
        reloads = CounterMetricFamily("vipd_witness_config_reloads_total", "Config "
                                      "reloads (SIGHUP) by result", labels=["result"])
        for result, count in self.reloads.items():
            reloads.add_metric([result], count)
        yield reloads


def build_witness_metrics(witness: Witness, now: Callable[[], float]) -> tuple[
        CollectorRegistry, WitnessCollector]:
    """The witness's own registry: build info, process metrics and `WitnessCollector`."""
    registry = CollectorRegistry()
    Info("vipd_build", "vipd build information", registry=registry).info(
        {"version": __version__})
    ProcessCollector(registry=registry)
    collector = WitnessCollector(witness, now)
    registry.register(collector)
    return registry, collector
