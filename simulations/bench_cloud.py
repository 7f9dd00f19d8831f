"""Crash failover of a pair with `movers: [netlink, aws]` against an EC2 emulator in the
namespace lab (issue 14).

    python -m simulations.bench_failover --movers aws --trials 20

The lab gets a host ``cloud`` running moto in server mode (``python -m moto.server``) on
its lab address; a VPC with one ENI per node and an Elastic IP are created there through
the emulator's API from the client namespace, and each node's config gets
``movers: [netlink, {aws: {eni: its own, elastic_ips: [the VIP's], endpoint_url: the
emulator}}]`` (the emulated VPC is 198.51.100.0/24, the lab's VIP one of its
addresses) with fake credentials and the metadata lookup disabled in the daemons'
environment: nothing leaves the lab. Each trial starts from the stable pair of the
failover benchmark (node1 holding, which the emulator also says), samples every ENI of
the VPC and the Elastic IP every 20 ms from the client namespace, kills node1 (daemon and
service) and measures: the client-visible outage (the netlink path: ARP and the address
on node2), the time until the emulator shows both the VIP and the Elastic IP on node2's
ENI ("moved"), node2's own time from its takeover to verified ownership
(`vipd_mover_verified_seconds`), and the most ENIs that held the VIP at any sample.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from simulations import disturb
from simulations.splitbrain import metric_values
from vipd.demo.lab import enter_netns
from vipd.demo.pairlab import VIP4, PairLab, outage

MOTO_PORT = 5000
REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
SAMPLE_EVERY = 0.02
MOVE_TIMEOUT = 15.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Cloud:
    url: str
    vpc: str
    enis: dict[str, str]
    allocation: str


def _ec2(url: str) -> Any:
    import boto3

    return boto3.client("ec2", region_name=REGION, endpoint_url=url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def start_cloud(pair: PairLab) -> Cloud:
    """moto on the cloud host, the VPC in it, and each node's config pointed at it."""
    host = pair.lab["cloud"]
    address = str(host.ipv4.ip)
    url = f"http://{address}:{MOTO_PORT}"
    with (pair.workdir / "moto.log").open("a") as out:
        host.spawn(sys.executable, "-m", "moto.server", "-H", address, "-p", str(MOTO_PORT),
                   stderr=out, stdout=out)

    def reachable() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return True
        except (urllib.error.URLError, OSError):
            return False

    if not pair.wait_for(lambda: pair.lab["client"].run(reachable), 20, 0.1):
        raise RuntimeError(f"the EC2 emulator did not answer on {url}")

    def build() -> tuple[str, dict[str, str], str]:
        ec2 = _ec2(url)
        vpc = ec2.create_vpc(CidrBlock="198.51.100.0/24")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="198.51.100.0/25")["Subnet"]["SubnetId"]
        enis = {name: ec2.create_network_interface(
            SubnetId=subnet, PrivateIpAddress=f"198.51.100.{10 + node.index}")[
            "NetworkInterface"]["NetworkInterfaceId"] for name, node in pair.nodes.items()}
        return vpc, enis, ec2.allocate_address(Domain="vpc")["AllocationId"]

    vpc, enis, allocation = pair.lab["client"].run(build)
    cloud = Cloud(url, vpc, enis, allocation)
    private = VIP4  # the lab's VIP, a secondary address in the emulated subnet
    for name, node in pair.nodes.items():
        mover = {"region": REGION, "eni": enis[name], "endpoint_url": url,
                 "secondary_ips": True,
                 "elastic_ips": [{"allocation_id": allocation, "private_ip": private}],
                 "timeout": "5s", "reconcile": "2s"}
        with node.config.open("a") as f:
            f.write(f"movers: [netlink, {json.dumps({'aws': mover})}]\n")
    pair.env.update(CREDENTIALS)
    return cloud


def _holders(ec2: Any, cloud: Cloud, ip: str) -> tuple[list[str], str | None]:
    enis = ec2.describe_network_interfaces(Filters=[
        {"Name": "vpc-id", "Values": [cloud.vpc]}])["NetworkInterfaces"]
    holding = [e["NetworkInterfaceId"] for e in enis
               if any(a["PrivateIpAddress"] == ip and not a.get("Primary")
                      for a in e["PrivateIpAddresses"])]
    address = ec2.describe_addresses(AllocationIds=[cloud.allocation])["Addresses"][0]
    return holding, address.get("NetworkInterfaceId")


@dataclass
class Sampler:
    """Describe every SAMPLE_EVERY from a thread inside the client namespace."""

    pair: PairLab
    cloud: Cloud
    ip: str = VIP4
    rows: list[tuple[float, list[str], str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        enter_netns(self.pair.lab["client"].ns)
        ec2 = _ec2(self.cloud.url)
        while not self._stop.is_set():
            try:
                holding, eip = _holders(ec2, self.cloud, self.ip)
            except Exception as exc:
                self.errors.append(repr(exc))
            else:
                self.rows.append((time.time(), holding, eip))
            self._stop.wait(SAMPLE_EVERY)

    def latest(self) -> tuple[list[str], str | None] | None:
        return (self.rows[-1][1], self.rows[-1][2]) if self.rows else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def run_trial(pair: PairLab, cloud: Cloud, index: int) -> dict[str, Any]:
    """One kill of node1 from a stable pair (the probe is running); stops the probe."""
    sampler = Sampler(pair, cloud)
    try:
        on1 = (cloud.enis["node1"],)
        if not pair.wait_for(lambda: sampler.latest() == (list(on1), on1[0]), MOVE_TIMEOUT):
            return {"error": f"node1 never held in the emulator: {sampler.latest()}"}
        before = dict(metric_values(pair.metrics("node2")))
        time.sleep(0.3)
        killed = time.time()
        pair.kill("node1")
        on2 = cloud.enis["node2"]
        moved = pair.wait_for(lambda: sampler.latest() == ([on2], on2), MOVE_TIMEOUT, 0.01)
        moved_at = next((t for t, ips, eip in sampler.rows
                         if t >= killed and ips == [on2] and eip == on2), None)
        time.sleep(0.5)
    finally:
        sampler.stop()
        samples = pair.stop_probe()
    gap, _ = outage(samples, killed)
    after = metric_values(pair.metrics("node2"))
    key_sum = ("vipd_mover_verified_seconds_sum", "mover=aws")
    key_count = ("vipd_mover_verified_seconds_count", "mover=aws")
    verified = None
    if after.get(key_count, 0) > before.get(key_count, 0):
        verified = (after[key_sum] - before.get(key_sum, 0)) / (
            after[key_count] - before.get(key_count, 0))
    return {"outage_ms": round(gap * 1000, 1),
            "moved_ms": round((moved_at - killed) * 1000, 1) if moved and moved_at else None,
            "verified_ms": None if verified is None else round(verified * 1000, 1),
            "samples": len(sampler.rows), "sample_errors": len(sampler.errors),
            "max_enis_holding": max((len(ips) for _, ips, _ in sampler.rows), default=0),
            "error": "" if moved else f"not moved within {MOVE_TIMEOUT:g} s"}


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [t for t in trials if not t["error"]]
    return {"n": len(ok), "failed": len(trials) - len(ok),
            "outage_ms": disturb.spread(ok, "outage_ms"),
            "moved_ms": disturb.spread(ok, "moved_ms"),
            "verified_ms": disturb.spread(ok, "verified_ms"),
            "samples": sum(t.get("samples", 0) for t in ok),
            "max_enis_holding": max((t.get("max_enis_holding", 0) for t in ok), default=0),
            "errors": [t["error"] for t in trials if t["error"]]}


def table(s: dict[str, Any]) -> str:
    def cell(key: str) -> str:
        return f"{s[key]['median']} / {s[key]['max']}"

    failed = f" ({s['failed']} failed)" if s["failed"] else ""
    return "\n".join([
        "kill -9 of node1, movers [netlink, aws] against moto in the lab (Describe every "
        f"{int(SAMPLE_EVERY * 1000)} ms)", "",
        "| n | client outage ms (netlink) median / max | VIP + Elastic IP on node2's ENI ms "
        "median / max | node2 takeover to verified ms median / max | Describe samples | "
        "most ENIs holding the VIP at a sample |",
        "|---|---|---|---|---|---|",
        f"| {s['n']}{failed} | {cell('outage_ms')} | {cell('moved_ms')} | "
        f"{cell('verified_ms')} | {s['samples']} | {s['max_enis_holding']} |",
        *[f"* error: {e}" for e in s["errors"]]])
