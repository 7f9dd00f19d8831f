"""An EC2 emulator for the tests: moto in server mode on loopback (a real HTTP endpoint),
fake credentials, the instance-metadata lookup disabled, and a VPC with two ENIs (nodes
a and b), an Elastic IP and a route table. Nothing here contacts a real provider.

moto is laxer than EC2: it ignores AllowReassignment (an address could end up on two
ENIs), and its `addresses.private-ip-address` filter ignores secondary addresses; the
checks here read every ENI of the VPC instead, so they do not depend on either."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import moto.server as moto_server
import pytest

from vipd.movers.aws import AwsMover

REGION = "us-east-1"
VIP = "198.51.100.10"  # a secondary private IP in the VPC 198.51.100.0/24
ROUTED = "203.0.113.10"  # outside the VPC: moved by a route


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
                        "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": str(tmp_path / "none"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@dataclass
class Vpc:
    ec2: Any
    url: str
    enis: dict[str, str]  # node -> ENI id
    allocation: str
    table: str
    vpc: str

    def mover(self, node: str, **kw: Any) -> AwsMover:
        options: dict[str, Any] = {"secondary_ips": True,
                                   "elastic_ips": [(self.allocation, VIP)],
                                   "route_tables": [], "vips": [f"{VIP}/32"]}
        options.update(kw)
        return AwsMover(region=REGION, eni=self.enis[node], cluster="web", node=node,
                        endpoint_url=self.url, **options)

    def ip_holders(self, ip: str = VIP) -> list[str]:
        """The ENIs EC2 says have ``ip`` as a secondary address (Describe of every ENI
        of the VPC: moto's `addresses.private-ip-address` filter ignores secondary
        addresses, a gap against EC2 this check does not depend on)."""
        enis = self.ec2.describe_network_interfaces(Filters=[
            {"Name": "vpc-id", "Values": [self.vpc]}])["NetworkInterfaces"]
        return [e["NetworkInterfaceId"] for e in enis
                if any(a["PrivateIpAddress"] == ip and not a.get("Primary")
                       for a in e["PrivateIpAddresses"])]

    def eip_holder(self) -> str | None:
        address = self.ec2.describe_addresses(AllocationIds=[self.allocation])["Addresses"][0]
        return address.get("NetworkInterfaceId")

    def route_target(self, cidr: str = f"{ROUTED}/32") -> str | None:
        table = self.ec2.describe_route_tables(RouteTableIds=[self.table])["RouteTables"][0]
        return next((r.get("NetworkInterfaceId") for r in table["Routes"]
                     if r.get("DestinationCidrBlock") == cidr), None)


@pytest.fixture
def vpc(moto_url: str) -> Vpc:
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)
    vpc_id = ec2.create_vpc(CidrBlock="198.51.100.0/24")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock="198.51.100.0/25")["Subnet"]["SubnetId"]
    enis = {node: ec2.create_network_interface(SubnetId=subnet, PrivateIpAddress=primary)[
        "NetworkInterface"]["NetworkInterfaceId"]
        for node, primary in (("a", "198.51.100.4"), ("b", "198.51.100.5"))}
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    table = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
    return Vpc(ec2, moto_url, enis, allocation, table, vpc_id)


