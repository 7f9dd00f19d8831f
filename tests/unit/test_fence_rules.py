"""The kernel fence's commands (vipd/fence.py) without a kernel: the heartbeat filter's
rules, reading its counter, and how the daemon builds it and reports it (status, metrics,
vipctl status).
tests/integration/test_fence.py runs the same tables on the real kernel."""

from __future__ import annotations

import logging
from ipaddress import ip_address, ip_interface
from pathlib import Path

import pytest

from support.daemons import Pair, eventually
from vipd.config import load_config
from vipd.configtypes import Endpoint
from vipd.daemon import heartbeat_filter
from vipd.fence import FenceError, HeartbeatFilter, KernelFence
from vipd.vipctl import render_status

VIPS = [ip_interface("198.51.100.100/32"), ip_interface("2001:db8:1::100/128")]


class RecordingNft:
    """An `Nft` that keeps the commands and answers with ``output``."""

    def __init__(self, output: str = "") -> None:
        self.commands: list[str] = []
        self.output = output

    def run(self, commands: str) -> str:
        self.commands.append(commands)
        return self.output


def hb(bind: str, *sources: str) -> HeartbeatFilter:
    return HeartbeatFilter(Endpoint.parse(bind), tuple(ip_address(s) for s in sources))


def chain(lines: list[str]) -> list[str]:
    """The rules of the heartbeat chain, without indentation."""
    start = next(i for i, line in enumerate(lines) if "chain heartbeat" in line)
    return [line.strip() for line in lines[start + 1:-1]]


def test_ipv4_heartbeats_pass_from_the_listed_sources_only() -> None:
    lines = hb("198.51.100.1:5405", "198.51.100.4", "198.51.100.2", "198.51.100.2").rules()
    assert "elements = { 198.51.100.2, 198.51.100.4 }" in lines[0]
    assert "type ipv4_addr" in lines[0]
    assert "hook input priority filter - 10; policy accept;" in "\n".join(lines)
    assert chain(lines) == ["ip daddr 198.51.100.1 udp dport 5405 ip saddr != "
                            "@heartbeat_sources counter name heartbeat_filtered drop"]


def test_ipv6_on_any_address_also_drops_ipv4_mapped_datagrams() -> None:
    """A socket bound to :: receives IPv4 as well; no peer of an IPv6 bind speaks it."""
    lines = hb("[::]:5405", "2001:db8:1::2").rules()
    assert "type ipv6_addr" in lines[0]
    assert chain(lines) == [
        "udp dport 5405 ip6 saddr != @heartbeat_sources counter name heartbeat_filtered drop",
        "meta nfproto ipv4 udp dport 5405 counter name heartbeat_filtered drop"]


def test_the_filter_lives_in_the_fence_table_and_goes_with_it() -> None:
    nft = RecordingNft()
    fence = KernelFence("web-1", VIPS, nft=nft,  # type: ignore[arg-type]
                        heartbeat=hb("198.51.100.1:5405", "198.51.100.2"))
    fence.install()
    (batch,) = nft.commands
    inet = batch[batch.index("table inet vipd_web_1 {"):]
    assert "chain heartbeat" in inet and "counter heartbeat_filtered" in inet
    assert "heartbeat" not in batch[batch.index("table arp"):batch.index("table inet")]
    fence.remove()
    assert "delete table inet vipd_web_1" in nft.commands[-1]


def test_without_heartbeat_settings_there_is_no_filter() -> None:
    nft = RecordingNft()
    fence = KernelFence("web", VIPS, nft=nft)  # type: ignore[arg-type]
    fence.install()
    assert "heartbeat" not in nft.commands[0]
    assert fence.filtered() is None
    assert len(nft.commands) == 1, "no counter to read"


def test_the_count_is_read_from_the_named_counter() -> None:
    nft = RecordingNft("table inet vipd_web {\n\tcounter heartbeat_filtered {\n\t\tcomment "
                       "\"x\"\n\t\tpackets 1234 bytes 98765\n\t}\n}\n")
    fence = KernelFence("web", VIPS, nft=nft,  # type: ignore[arg-type]
                        heartbeat=hb("198.51.100.1:5405", "198.51.100.2"))
    assert fence.filtered() == 1234
    assert nft.commands == ["list counter inet vipd_web heartbeat_filtered\n"]
    nft.output = "table inet vipd_web {\n}\n"
    with pytest.raises(FenceError, match="counter inet vipd_web heartbeat_filtered"):
        fence.filtered()


def config_text(tmp_path: Path, extra: str) -> Path:
    key = tmp_path / "key"
    key.write_text("1 " + "ab" * 32 + "\n")
    key.chmod(0o600)
    path = tmp_path / "node.yaml"
    path.write_text(f"node: a\ncluster: web\ninterface: eth0\nvips: [198.51.100.100/32]\n"
                    f"priority: 100\nauth: {{key_file: {key}}}\n{extra}")
    return path


def test_the_daemon_lets_in_the_peers_and_the_witnesses(tmp_path: Path) -> None:
    cfg = load_config(config_text(tmp_path, (
        'heartbeat: {bind: "198.51.100.1:5405", peers: ["198.51.100.2:5405", '
        '"203.0.113.2:5405"]}\narbiter: {witness: ["198.51.100.4:5406"]}\n')))
    assert cfg.fence == "kernel"
    assert heartbeat_filter(cfg) == hb("198.51.100.1:5405", "198.51.100.2", "203.0.113.2",
                                       "198.51.100.4")


class CountingFence:
    """What the VIP worker and the status use of a `KernelFence`, with a set count."""

    def __init__(self, count: int | None) -> None:
        self.count = count

    def open(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def filtered(self) -> int | None:
        if self.count is None:
            raise FenceError("nftables refused the fence commands: No such file or directory")
        return self.count


@pytest.mark.asyncio
async def test_status_and_metrics_show_the_kernel_count(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    pair.start()
    await pair.settled()
    d = pair.a.daemon

    def scrape() -> float | None:
        d.collector.refresh(d.view({str(v) for v in pair.a.mover.addresses}))
        return d.metrics.registry.get_sample_value("vipd_heartbeat_filtered_total")

    assert d.view(set()).heartbeat_filtered is None and scrape() is None, "no fence: absent"
    d.worker.fence = CountingFence(41)  # type: ignore[assignment]
    doc = d.view(set()).to_json()
    assert doc["heartbeat_filtered"] == 41
    assert scrape() == 41.0
    assert "heartbeat filter: 41 datagrams from neither the peer nor a witness dropped" in \
        render_status(doc)
    d.worker.fence = CountingFence(None)  # type: ignore[assignment]
    assert d.view(set()).heartbeat_filtered is None, "an unreadable counter fails no status"
    await eventually(lambda: any("heartbeat filter's counter" in r.getMessage()
                                 for r in caplog.records if r.levelno == logging.WARNING),
                     what="the warning")
    d.worker.fence = None
