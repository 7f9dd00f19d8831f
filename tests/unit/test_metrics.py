"""Prometheus metrics (vipd/metrics.py): what a scrape of a running pair shows.

The two-daemon loopback pair of tests/support/daemons.py (FakeMover, no API or metrics
listener, interval 20 ms, dead_after 5) is reused; a "scrape" here is what the /metrics
handler does: ``collector.refresh(held)`` with the VIPs the mover holds, then reading the
registry (``get_sample_value``). The reason-code check runs the simulator plus a few
scripted scenarios that reach the transitions no random scenario produces.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

import simulations.simnet as simnet
from simulations import simulate
from simulations.simnet import CLUSTER, Sim, SimNode
from support.daemons import VIP_SET, VIPS, Node, Pair, eventually, exec_check
from vipd import __version__
from vipd.core import election as el
from vipd.core import group
from vipd.core.events import REASON_CODES
from vipd.core.protocol import Advert, Flag, Reject, Session, State
from vipd.metrics import FAST_BUCKETS, HotMetrics, build_metrics

RELOAD_RESULTS = ("ok", "error", "refused")  # every result vipd/daemon.py counts


def value(node: Node, name: str, **labels: str) -> float | None:
    """One sample as a scrape would show it (the gauges refreshed first)."""
    d = node.daemon
    d.collector.refresh(d.view({str(v) for v in node.mover.addresses}))
    return d.metrics.registry.get_sample_value(name, labels)


def transitions(node: Node, old: State, new: State) -> dict[str, float]:
    """reason code -> count, for the codes that have a sample."""
    found = {}
    for code in REASON_CODES:
        got = value(node, "vipd_transitions_total", from_state=old.name, to_state=new.name,
                    reason=code)
        if got is not None:
            found[code] = got
    return found


def states(node: Node) -> dict[str, float | None]:
    return {s.name: value(node, "vipd_state", state=s.name) for s in State}


def only(state: State) -> dict[str, float]:
    return {s.name: 1.0 if s is state else 0.0 for s in State}




# ---------------------------------------------------------------------------- registry


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FAST_BUCKETS),
                          st.floats(min_value=0.0, max_value=3.0)), max_size=40))
def test_hot_histograms_export_what_prometheus_client_would(values: list[float]) -> None:
    """The plain-int histograms of the hot path expose exactly the samples a
    prometheus_client Histogram with the same buckets exposes, bounds included."""
    mine, theirs = CollectorRegistry(), CollectorRegistry()
    hot = HotMetrics()
    mine.register(hot)
    reference = Histogram("vipd_heartbeat_rtt_seconds", "Heartbeat round trip to the peer",
                          buckets=FAST_BUCKETS, registry=theirs)
    for v in values:
        hot.rtt.observe(v)
        reference.observe(v)
        hot.sent += 2
    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {(s.name, s.labels.get("le", "")): s.value
                for family in registry.collect() for s in family.samples
                if s.name.startswith("vipd_heartbeat_rtt_seconds")
                and not s.name.endswith("_created")}
    got, want = samples(mine), samples(theirs)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert mine.get_sample_value("vipd_heartbeats_sent_total") == 2 * len(values)


def test_build_metrics_uses_a_fresh_registry_each_time() -> None:
    first, second = build_metrics(), build_metrics()  # a clash would raise ValueError
    assert first.registry is not second.registry
    first.hot.sent += 3
    first.transitions.labels("STANDBY", "ACTIVE", "peer_dead").inc()
    assert first.registry.get_sample_value("vipd_heartbeats_sent_total") == 3.0
    assert second.registry.get_sample_value("vipd_heartbeats_sent_total") == 0.0
    assert second.registry.get_sample_value(
        "vipd_transitions_total",
        {"from_state": "STANDBY", "to_state": "ACTIVE", "reason": "peer_dead"}) is None
    # Nothing leaks into the process-wide default registry.
    assert prometheus_client.REGISTRY.get_sample_value("vipd_heartbeats_sent_total") is None
    # A caller's registry is used as given (so registering twice there does clash).
    mine = CollectorRegistry()
    assert build_metrics(mine).registry is mine
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        build_metrics(mine)


def test_every_reject_reason_is_exported_as_zero_from_the_start() -> None:
    m = build_metrics()
    for reason in Reject:
        assert m.registry.get_sample_value("vipd_heartbeats_rejected_total",
                                           {"reason": reason.value}) == 0.0, reason


def test_every_reload_result_is_exported_as_zero_from_the_start() -> None:
    """build_metrics pre-creates "ok" and "error" so that rate() and alerts work from the
    start, but the daemon also counts result="refused" (a reload that tries to change a
    fixed setting: the operator's change is NOT applied). Created lazily, the first
    refusal after a start is invisible to increase()/rate(): an alert on failed reloads
    misses it."""
    m = build_metrics()
    missing = [r for r in RELOAD_RESULTS
               if m.registry.get_sample_value("vipd_config_reloads_total",
                                              {"result": r}) != 0.0]
    assert missing == [], f"vipd_config_reloads_total results not exported at start: {missing}"


# ---------------------------------------------------------------------------- the pair


@pytest.mark.asyncio
async def test_settled_pair_gauges_and_counters(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    a, b = pair.nodes

    def both_see_each_other() -> bool:
        return all(value(n, "vipd_peer_hears_this_node") == 1.0
                   and value(n, "vipd_peer_reachable") == 1.0
                   and (value(n, "vipd_heartbeat_rtt_seconds_count") or 0) > 0
                   for n in (a, b))

    await eventually(both_see_each_other, what="heartbeats, echoes and RTTs both ways")
    assert states(a) == only(State.ACTIVE)
    assert states(b) == only(State.STANDBY)
    for node in (a, b):
        assert value(node, "vipd_term") == node.daemon.election.term
        assert value(node, "vipd_healthy") == 1.0
        assert value(node, "vipd_peer_settings_match") == 1.0
        assert value(node, "vipd_priority") == node.daemon.config.priority
        assert (value(node, "vipd_peer_last_heartbeat_age_seconds") or 0) < 0.1
        assert value(node, "vipd_build_info", version=__version__) == 1.0
    assert a.daemon.election.term >= 1
    assert value(a, "vipd_peer_active") == 0.0
    assert value(b, "vipd_peer_active") == 1.0
    for vip in VIPS:
        assert value(a, "vipd_vip_held", vip=vip) == 1.0
        assert value(b, "vipd_vip_held", vip=vip) == 0.0

    # Exactly one takeover on a, with a known reason code; b never went ACTIVE.
    took = {code: n for code, n in transitions(a, State.STANDBY, State.ACTIVE).items() if n}
    assert len(took) == 1 and sum(took.values()) == 1.0, took
    (code,) = took
    assert code in REASON_CODES, code
    assert transitions(a, State.INIT, State.STANDBY) == {"start": 1.0}
    assert transitions(b, State.INIT, State.STANDBY) == {"start": 1.0}
    assert transitions(b, State.STANDBY, State.ACTIVE) == {}
    assert value(b, "vipd_failover_detection_seconds_count") == 0.0
    await eventually(lambda: value(a, "vipd_vip_acquisition_seconds_count") == 1.0,
                     what="a's acquisition observed")
    assert value(b, "vipd_vip_acquisition_seconds_count") == 0.0

    names = ("vipd_heartbeats_sent_total", "vipd_heartbeats_received_total")
    before = {(n.name, name): value(n, name) or 0.0 for n in (a, b) for name in names}
    await asyncio.sleep(0.1)  # five intervals
    for (node_name, name), old in before.items():
        node = a if node_name == "a" else b
        assert (value(node, name) or 0.0) >= old + 2, (node_name, name, old)


@pytest.mark.asyncio
async def test_crash_of_the_active_shows_as_a_peer_dead_failover_on_the_survivor(
        pair: Pair) -> None:
    pair.start()
    await pair.settled()
    a, b = pair.nodes
    await eventually(lambda: value(b, "vipd_peer_reachable") == 1.0, what="b hears a")
    assert value(b, "vipd_failover_detection_seconds_count") == 0.0
    assert value(b, "vipd_vip_acquisition_seconds_count") == 0.0

    await a.crash()
    await eventually(lambda: b.state is State.ACTIVE and b.mover.addresses == VIP_SET,
                     what="b ACTIVE holding the VIPs")
    await eventually(lambda: value(b, "vipd_vip_acquisition_seconds_count") == 1.0,
                     what="b's acquisition observed")

    assert states(b) == only(State.ACTIVE)
    assert value(b, "vipd_term") == b.daemon.election.term
    assert transitions(b, State.STANDBY, State.ACTIVE) == {"peer_dead": 1.0}
    assert value(b, "vipd_failover_detection_seconds_count") == 1.0
    detection = value(b, "vipd_failover_detection_seconds_sum")
    dead = b.daemon.election.cfg.dead_interval
    assert dead == pytest.approx(0.1)
    assert detection is not None and 0.05 <= detection <= 1.0, detection
    acquisition = value(b, "vipd_vip_acquisition_seconds_sum")
    assert acquisition is not None and 0.0 <= acquisition < 1.0, acquisition
    assert value(b, "vipd_peer_reachable") == 0.0
    assert value(b, "vipd_peer_hears_this_node") == 0.0
    assert value(b, "vipd_peer_active") == 0.0
    for vip in VIPS:
        assert value(b, "vipd_vip_held", vip=vip) == 1.0


@pytest.mark.asyncio
async def test_garbage_datagrams_count_as_malformed_rejections(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    a = pair.a
    for reason in Reject:  # exported from the start, and a clean pair rejects nothing
        assert value(a, "vipd_heartbeats_rejected_total", reason=reason.value) == 0.0, reason
    target = ("127.0.0.1", a.daemon.config.heartbeat.bind.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for data in (b"garbage", b"\x00" * 64, b"VIPD"):
            sock.sendto(data, target)
    await eventually(lambda: value(a, "vipd_heartbeats_rejected_total",
                                   reason="malformed") == 3.0, what="3 malformed counted")
    await asyncio.sleep(0.05)
    for reason in Reject:
        expected = 3.0 if reason is Reject.MALFORMED else 0.0
        assert value(a, "vipd_heartbeats_rejected_total", reason=reason.value) == expected
    assert states(a) == only(State.ACTIVE)


@pytest.mark.asyncio
async def test_failing_health_check_shows_as_check_down_and_unhealthy(
        pair: Pair, tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    flag.touch()
    pair.a.settings["health"] = [exec_check(flag)]
    pair.start()
    await pair.settled()
    a, b = pair.nodes
    assert value(a, "vipd_check_up", check="flag") == 1.0
    assert value(a, "vipd_healthy") == 1.0
    assert (value(a, "vipd_check_duration_seconds_count", check="flag") or 0) >= 1

    flag.unlink()
    await eventually(lambda: a.state is State.FAULT and b.state is State.ACTIVE,
                     what="a FAULT, b ACTIVE")
    assert value(a, "vipd_check_up", check="flag") == 0.0
    assert value(a, "vipd_healthy") == 0.0
    assert states(a) == only(State.FAULT)
    assert transitions(a, State.ACTIVE, State.FAULT) == {"health": 1.0}
    took = transitions(b, State.STANDBY, State.ACTIVE)
    assert sum(took.values()) == 1.0 and "other" not in took, took
    await eventually(lambda: value(a, "vipd_vip_held", vip=VIPS[0]) == 0.0
                     and value(b, "vipd_vip_held", vip=VIPS[0]) == 1.0, what="VIPs moved")


@pytest.mark.asyncio
async def test_reloads_are_counted_by_result(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    a = pair.a

    def reloads(result: str) -> float | None:
        return value(a, "vipd_config_reloads_total", result=result)

    assert (reloads("ok"), reloads("error")) == (0.0, 0.0)
    a.write(priority=200)
    a.daemon._on_reload_signal()
    await eventually(lambda: reloads("ok") == 1.0, what="reload ok counted")
    assert value(a, "vipd_priority") == 200.0

    a.config_path.write_text("node: [a\npriority: 200\n")
    a.daemon._on_reload_signal()
    await eventually(lambda: reloads("error") == 1.0, what="reload error counted")

    a.write(vips=["192.0.2.99/32"])
    a.daemon._on_reload_signal()
    await eventually(lambda: reloads("refused") == 1.0, what="reload refusal counted")
    assert (reloads("ok"), reloads("error")) == (1.0, 1.0)
    assert states(a) == only(State.ACTIVE)


# ---------------------------------------------------------------------------- reason codes


def _sim(witness: bool = False) -> tuple[Sim, SimNode, SimNode]:
    cfgs = [el.ElectionConfig(node="node-a", priority=150, interval=0.04, dead_after=8),
            el.ElectionConfig(node="node-b", priority=100, interval=0.04, dead_after=8)]
    sim = Sim(1, cfgs, ["203.0.113.10/32"], witness=witness)
    if sim.witness is not None:
        sim.witness.start()
    return sim, sim.nodes["node-a"], sim.nodes["node-b"]


def _disguise(node: SimNode, rewrite: Callable[[Advert], Advert]) -> None:
    """Make `node` lie in its heartbeats (its election still runs as usual)."""
    def apply(action: el.Action, now: float) -> None:
        if isinstance(action, el.SendHeartbeat):
            action = el.SendHeartbeat(rewrite(action.advert))
        SimNode.apply(node, action, now)
    node.apply = apply  # type: ignore[method-assign]


def _group_scripted() -> set[str]:
    """The codes only a group node (arbiter etcd, vipd.core.group) produces: its lease may
    expire (self-fence), its holder key is gone."""
    codes = set()
    # at 1.0 s no keep-alive was answered: the lease may be gone; at 0.5 s b holds the key
    for ending, at in ((group.Tick(), 1.0),
                       (group.Observed(group.Holder("b", 9, 2), {}, revision=9), 0.5)):
        node = group.GroupElection(group.GroupConfig("a", ttl=1.0))
        acts = node.handle(el.Start(), 0.0) + node.handle(group.LeaseGranted(1, 1.0, 0.0), 0.0)
        acts += node.handle(el.HealthChanged(True), 0.0)
        acts += node.handle(group.Observed(None, {}, revision=1), 0.0)
        acts += node.handle(group.Claimed(True, group.Holder("a", 2, 1)), 0.0)
        acts += node.handle(ending, at)
        codes |= {a.why.value for a in acts if isinstance(a, el.Transition)}
    return codes


def _scripted() -> None:
    """Transitions the random scenarios (almost) never produce."""
    sim, a, _ = _sim()  # alone: no peer, maintenance without a peer, VIP failure, stop
    a.start()
    sim.run_until(1.0)
    a.handle(el.Command(el.CommandKind.MAINTENANCE_ON))
    sim.run_until(1.5)
    a.handle(el.Command(el.CommandKind.MAINTENANCE_OFF))
    sim.run_until(2.0)
    a.handle(el.VipFailed("netlink says no"))
    sim.run_until(2.5)
    a.handle(el.Shutdown())
    sim.run_until(3.0)

    sim, a, _ = _sim()  # an ACTIVE that stops with no peer to hand over to
    a.start()
    sim.run_until(1.0)
    a.handle(el.Shutdown())
    sim.run_until(2.0)

    sim, a, b = _sim()  # forced promote over a one-way link; then b yields (one-way)
    a.start()
    b.start()
    sim.run_until(1.0)
    sim.links[("node-b", "node-a")].blocked = True
    sim.run_until(1.5)
    b.handle(el.Command(el.CommandKind.PROMOTE, force=True))
    sim.run_until(3.0)

    sim, a, b = _sim()  # the peer dies during a maintenance handover
    a.start()
    b.start()
    sim.run_until(1.0)
    b.crash()
    a.handle(el.Command(el.CommandKind.MAINTENANCE_ON))
    sim.run_until(2.0)

    sim, a, b = _sim()  # an ACTIVE peer that says it is unhealthy
    a.start()
    b.start()
    sim.run_until(1.0)
    _disguise(a, lambda ad: Advert(ad.state, ad.flags & ~Flag.HEALTHY, ad.term,
                                   ad.priority, ad.effective_priority))
    sim.run_until(2.0)

    sim, a, b = _sim()  # the holder frozen past its lease: its VIPs lapsed (VipsLost)
    a.start()
    b.start()
    sim.run_until(1.0)
    a.freeze()
    sim.run_until(5.0)
    a.thaw(upkeep_first=True)
    sim.run_until(6.0)

    sim, a, b = _sim()  # a second live node under a's name
    a.start()
    b.start()
    sim.run_until(1.0)
    assert a.election is not None
    twin = Session(cluster=CLUSTER, node="node-a", keys=sim.keys, boot_id=7,
                   digest=a.cfg.digest)
    a.deliver(twin.seal(a.election.advert(), sim.clock.now, a.wall_ns(sim.clock.now)))
    sim.run_until(2.0)

    sim, a, b = _sim(witness=True)  # an active cut off from both other voters
    a.start()
    b.start()
    sim.run_until(1.0)
    for (src, dst), link in sim.links.items():
        link.blocked = "node-a" in (src, dst)
    sim.run_until(2.0)

    sim, a, b = _sim()  # a winning peer that never takes over
    _disguise(a, lambda ad: Advert(State.STANDBY, Flag.HEALTHY | Flag.PREEMPT, ad.term,
                                   ad.priority, ad.effective_priority))
    a.start()
    b.start()
    sim.run_until(2.0)


@pytest.fixture
def sim_reasons(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[el.Transition]]:
    """Every transition any simulated node makes while the fixture is active."""
    seen: list[el.Transition] = []
    original = simnet.Checker.on_transition

    def on_transition(self: simnet.Checker, node: SimNode, tr: el.Transition,
                      now: float) -> None:
        seen.append(tr)
        original(self, node, tr, now)

    monkeypatch.setattr(simnet.Checker, "on_transition", on_transition)
    yield seen


def test_every_reason_code_is_reachable(sim_reasons: list[el.Transition]) -> None:
    """Every code of the transitions metric is produced by some (simulated) situation."""
    seeds = range(5 * len(simulate.KINDS))  # 60: every kind five times
    kinds = set()
    for seed in seeds:
        out = simulate.scenario(seed, 0.04, 8)
        kinds.add(out.kind)
        assert out.violations == [], (seed, out.kind, out.violations)
    assert kinds == set(simulate.KINDS)
    random_codes = {tr.why.value for tr in sim_reasons}
    _scripted()
    codes = {tr.why.value for tr in sim_reasons} | _group_scripted()
    # Every code is reachable; the random scenarios alone see only some.
    assert codes == set(REASON_CODES), f"never produced: {set(REASON_CODES) - codes}"
    assert {"start", "election", "peer_dead", "health", "handed_over"} <= random_codes


@pytest.mark.asyncio
async def test_heartbeat_socket_errors_are_counted_by_direction(pair: Pair) -> None:
    pair.start()
    await pair.settled()
    a = pair.nodes[0]
    name = "vipd_heartbeat_socket_errors_total"
    assert value(a, name, direction="send") == 0.0
    assert value(a, name, direction="receive") == 0.0
    # A second "peer address" the kernel refuses (UDP port 0: EINVAL) on every send.
    d = a.daemon
    d.driver._peer_addresses = (*d.driver._peer_addresses, ("127.0.0.1", 0))
    sent = value(a, "vipd_heartbeats_sent_total") or 0.0
    errors_then = value(a, name, direction="send") or 0.0
    await eventually(lambda: (value(a, name, direction="send") or 0.0) >= errors_then + 3,
                     what="send errors counted")
    assert value(a, name, direction="receive") == 0.0
    # Only what went out counts as sent: one datagram per heartbeat, not two.
    new_sent = (value(a, "vipd_heartbeats_sent_total") or 0.0) - sent
    new_errors = (value(a, name, direction="send") or 0.0) - errors_then
    assert new_sent == new_errors, (new_sent, new_errors)


@pytest.mark.asyncio
async def test_loop_lag_is_observed_on_a_node_whose_election_timer_never_fires(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answering node may not fire its election timer for hours; the VIP upkeep (a
    renewal every third of the lease here) still feeds vipd_timer_lateness_seconds."""
    pair.start()
    await pair.settled()
    a = pair.nodes[0]
    d = a.daemon
    monkeypatch.setattr(d.driver, "_rearm", lambda: None)  # no election timer from now on
    d.driver._timer.cancel()
    name = "vipd_timer_lateness_seconds_count"
    before = value(a, name) or 0.0
    await asyncio.sleep(1.1)
    assert (value(a, name) or 0.0) >= before + 2


# --- the witness's registry (vipd witness) ---------------------------------------------------

def test_the_witness_registry_reads_the_core_at_scrape_time() -> None:
    from vipd.core.protocol import KeyRing, Kind, Vote
    from vipd.core.witness import ClusterSpec, Witness
    from vipd.metrics import build_witness_metrics

    keys = KeyRing({1: bytes(range(32))})
    clock = [0.0]
    witness = Witness("witness", 1)
    witness.configure({"web": ClusterSpec(keys, frozenset({"vm-a", "vm-b"}))}, 0.0)
    registry, collector = build_witness_metrics(witness, lambda: clock[0])
    nodes = {name: Session(cluster="web", node=name, keys=keys, boot_id=i, digest=bytes(8),
                           expect=Kind.VOTE_REPLY) for i, name in enumerate(["vm-a", "vm-b"], 2)}

    def ask(name: str, now: float) -> None:
        data = nodes[name].seal(Advert(State.ACTIVE, Flag.HEALTHY, 1, 100, 100), now,
                                1_700_000_000_000_000_000 + round(now * 1e9),
                                kind=Kind.VOTE_REQUEST, vote=Vote(lease_ms=1000))
        witness.receive(data, ("198.51.100.1", 1), now, 1_700_000_000_000_000_000
                        + round(now * 1e9))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    ask("vm-a", 0.5)  # within the start-up block
    ask("vm-a", 2.0)
    ask("vm-b", 2.5)
    witness.receive(b"junk", ("198.51.100.9", 1), 2.6, 0)
    clock[0] = 2.75
    assert sample("vipd_witness_up") == 1 and sample("vipd_witness_clusters") == 1
    for verdict, count in (("granted", 1), ("held", 1), ("restarting", 1), ("released", 0),
                           ("stale", 0)):
        assert sample("vipd_witness_requests_total", cluster="web", verdict=verdict) == count
    assert sample("vipd_witness_rejected_total", reason="malformed") == 1
    assert sample("vipd_witness_rejected_total", reason="unknown_node") == 0
    assert sample("vipd_witness_last_request_age_seconds", cluster="web",
                  node="vm-a") == pytest.approx(0.75)
    assert sample("vipd_witness_vote_holder", cluster="web", node="vm-a") == 1
    assert sample("vipd_witness_vote_holder", cluster="web", node="vm-b") == 0
    clock[0] = 3.0  # vm-a's lease ran out: nobody holds the vote
    assert sample("vipd_witness_vote_holder", cluster="web", node="vm-a") == 0
    collector.reloads["error"] += 1
    assert sample("vipd_witness_config_reloads_total", result="error") == 1
    assert sample("vipd_build_info", version=__version__) == 1
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    names = {metric.name for metric in registry.collect() if metric.name.startswith("vipd_")}
    assert {n for n in names if f"`{n}" not in docs} == set(), "missing from docs/metrics.md"
