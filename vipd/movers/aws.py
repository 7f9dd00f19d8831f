"""The `aws` mover: where EC2 decides who owns an address (`pip install 'vipd[aws]'`).

Three kinds of resource follow the holder, each optional:

* the VIPs (IPv4) as secondary private IPs of this node's ENI
  (`AssignPrivateIpAddresses` with `AllowReassignment`);
* Elastic IPs associated with this node's ENI and a private IP
  (`AssociateAddress` with `AllowReassociation`);
* route-table entries VIP/32 -> this node's ENI (`ReplaceRoute`, `CreateRoute` when
  missing), for VIPs outside the VPC's CIDR.

EC2 has no compare-and-swap. vipd tags what it moves (the ENI, the Elastic IP allocation,
the route table) with ``vipd:CLUSTER:node`` and ``vipd:CLUSTER:term`` and reads the
current holder's tags before it acquires: a node whose term is lower than the one found
yields (`MoverError(superseded=True)`) instead of fighting. What that leaves open: two
nodes reading at the same moment and both writing (the arbiter and the kernel gate are
what prevent two holders; the tags only stop a stale node from taking back what a newer
one holds). vipd never asks EC2 for an address on two ENIs: before assigning a secondary
IP it removes it from the ENI that holds it, so even an API that ignored
`AllowReassignment` (moto does) shows at most one holder.

Credentials come from the standard chain (environment, shared files, instance profile)
and are never logged. ``endpoint_url`` points at an emulator in tests.
"""

from __future__ import annotations

import contextlib
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from vipd import credentials
from vipd.movers.remote import MoverError, Ownership

RETRIED_CODES = {"RequestLimitExceeded", "Throttling", "ThrottlingException",
                 "InternalError", "ServiceUnavailable", "Unavailable",
                 "InsufficientInstanceCapacity"}


class AwsMover:
    name = "aws"

    def __init__(self, *, region: str, eni: str, cluster: str, node: str,
                 vips: list[str], secondary_ips: bool,
                 elastic_ips: list[tuple[str, str]], route_tables: list[str],
                 endpoint_url: str | None = None,
                 credentials_file: Path | None = None) -> None:
        self.region, self.eni, self.cluster, self.node = region, eni, cluster, node
        self.credentials_file = credentials_file  # None: botocore's default chain
        self.ips = [str(IPv4Interface(v).ip) for v in vips if ":" not in v]
        self.cidrs = [f"{ip}/32" for ip in self.ips]
        self.secondary_ips, self.elastic_ips = secondary_ips, elastic_ips
        self.route_tables, self.endpoint_url = route_tables, endpoint_url
        self._stack = contextlib.AsyncExitStack()
        self._ec2: Any = None
        self._vpc: str | None = None  # our ENI's VPC, looked up once
        self.tag_node, self.tag_term = f"vipd:{cluster}:node", f"vipd:{cluster}:term"

    async def _client(self) -> Any:
        if self._ec2 is None:
            try:
                import aiobotocore.session  # noqa: F401
            except ImportError as exc:
                raise MoverError("the aws mover needs aiobotocore: pip install 'vipd[aws]'",
                                 operation="connect", code="missing_client",
                                 retry=False) from exc
            from aiobotocore.config import AioConfig

            # one attempt per call: the runner retries with its own backoff and timeout
            config = AioConfig(connect_timeout=2, read_timeout=5,
                               retries={"max_attempts": 1, "mode": "standard"})
            self._ec2 = await self._stack.enter_async_context(self.session().create_client(
                "ec2", region_name=self.region, endpoint_url=self.endpoint_url,
                config=config))
        return self._ec2

    def session(self) -> Any:
        """The aiobotocore session: botocore's credential chain, which reads its shared
        credentials file from `credentials_file` (which may be credential:NAME, a systemd
        credential) when one is configured."""
        from aiobotocore.session import get_session

        session = get_session()
        if self.credentials_file is not None:
            try:
                path = credentials.locate(self.credentials_file)
            except credentials.CredentialError as exc:
                raise MoverError(str(exc), operation="connect", code="credentials",
                                 retry=False) from exc
            session.set_config_variable("credentials_file", str(path))
        return session

    async def _api(self, operation: str, call: str, **params: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        ec2 = await self._client()
        try:
            return await getattr(ec2, call)(**params)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "unknown")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            raise MoverError(f"aws: {operation}: {call}: {code}: "
                             f"{exc.response.get('Error', {}).get('Message', '')}",
                             operation=operation, code=code,
                             retry=code in RETRIED_CODES or status >= 500) from exc
        except BotoCoreError as exc:  # endpoint unreachable, read timeout, ...
            raise MoverError(f"aws: {operation}: {call}: {exc}", operation=operation,
                             code=type(exc).__name__, retry=True) from exc

    # --- who holds, by the tags --------------------------------------------------------

    def _tagged(self, tags: list[dict[str, str]] | None) -> tuple[str | None, int | None]:
        found = {t["Key"]: t["Value"] for t in tags or []}
        term = found.get(self.tag_term)
        return found.get(self.tag_node), int(term) if term and term.isdigit() else None

    async def _vpc_enis(self, operation: str) -> list[dict[str, Any]]:
        """Every ENI of our ENI's VPC (where a secondary address can live). A filter on
        the address itself would be one call less, but emulators do not all support it
        (moto ignores secondary addresses in it); the VPC filter works everywhere."""
        if self._vpc is None:
            mine = (await self._api(operation, "describe_network_interfaces",
                                    NetworkInterfaceIds=[self.eni]))["NetworkInterfaces"]
            if not mine:
                raise MoverError(f"aws: {operation}: ENI {self.eni} not found",
                                 operation=operation, code="InvalidNetworkInterfaceID.NotFound",
                                 retry=False)
            self._vpc = mine[0]["VpcId"]
        found: list[dict[str, Any]] = (await self._api(
            operation, "describe_network_interfaces",
            Filters=[{"Name": "vpc-id", "Values": [self._vpc]}]))["NetworkInterfaces"]
        return found

    def _owner(self, eni: str | None, tags: list[dict[str, str]] | None
               ) -> tuple[str | None, int | None]:
        """Who a shared resource (an Elastic IP, a route table) says holds it: its tags
        name the last node that took it, which is only believed while the resource
        points at an ENI, and at ours exactly when the tags name us (else someone moved
        it by hand)."""
        node, term = self._tagged(tags)
        if eni is None or (node == self.node) != (eni == self.eni):
            return None, None
        return node, term

    async def _holders(self, operation: str) -> list[tuple[str, str | None, int | None]]:
        """(resource, node, term) of whoever holds each moved resource now; node None:
        nobody, or an ENI without our tags."""
        seen: list[tuple[str, str | None, int | None]] = []
        if self.secondary_ips and self.ips:
            enis = await self._vpc_enis(operation)
            for ip in self.ips:
                holding = [e for e in enis if any(a["PrivateIpAddress"] == ip and not
                                                  a.get("Primary") for a in
                                                  e.get("PrivateIpAddresses", []))]
                if len(holding) != 1:
                    seen.append((ip, None, None))
                else:
                    seen.append((ip, *self._tagged(holding[0].get("TagSet"))))
        for allocation, _ in self.elastic_ips:
            addresses = (await self._api(operation, "describe_addresses",
                                         AllocationIds=[allocation]))["Addresses"]
            address = addresses[0] if addresses else {}
            seen.append((allocation, *self._owner(address.get("NetworkInterfaceId"),
                                                  address.get("Tags"))))
        for table in self.route_tables:
            tables = (await self._api(operation, "describe_route_tables",
                                      RouteTableIds=[table]))["RouteTables"]
            routes = {r.get("DestinationCidrBlock"): r for r in
                      (tables[0].get("Routes", []) if tables else [])}
            tags = tables[0].get("Tags") if tables else None
            for cidr in self.cidrs:
                target = (routes.get(cidr) or {}).get("NetworkInterfaceId")
                seen.append((f"{table} {cidr}", *self._owner(target, tags)))
        return seen

    async def verify(self) -> Ownership:
        seen = await self._holders("verify")
        owners = {(node, term) for _, node, term in seen}
        if len(owners) == 1:
            node, term = owners.pop()
            return Ownership(node, term)
        newest = max((o for o in owners if o[1] is not None), key=lambda o: o[1] or 0,
                     default=(None, None))
        return Ownership(newest[0] if newest[0] != self.node else None, newest[1],
                         f"resources disagree: {seen}")

    # --- acquire -------------------------------------------------------------------------

    async def acquire(self, term: int) -> None:
        for resource, node, held in await self._holders("acquire"):
            if node not in (None, self.node) and held is not None and held > term:
                raise MoverError(f"aws: acquire: {resource} is held by {node} with term "
                                 f"{held}, above ours ({term})", operation="acquire",
                                 code="superseded", retry=False, superseded=True)
        tags = [{"Key": self.tag_node, "Value": self.node},
                {"Key": self.tag_term, "Value": str(term)}]
        if self.secondary_ips and self.ips:
            await self._take_secondary_ips(tags)
        for allocation, private_ip in self.elastic_ips:
            await self._api("acquire", "associate_address", AllocationId=allocation,
                            NetworkInterfaceId=self.eni, PrivateIpAddress=private_ip,
                            AllowReassociation=True)
            await self._api("acquire", "create_tags", Resources=[allocation], Tags=tags)
        for table in self.route_tables:
            await self._point_routes(table)
            await self._api("acquire", "create_tags", Resources=[table], Tags=tags)

    async def _take_secondary_ips(self, tags: list[dict[str, str]]) -> None:
        enis = await self._vpc_enis("acquire")
        for eni in enis:  # never two holders, even where reassignment is not enforced
            if eni["NetworkInterfaceId"] == self.eni:
                continue
            theirs = [a["PrivateIpAddress"] for a in eni.get("PrivateIpAddresses", [])
                      if a["PrivateIpAddress"] in self.ips and not a.get("Primary")]
            if theirs:
                await self._api("acquire", "unassign_private_ip_addresses",
                                NetworkInterfaceId=eni["NetworkInterfaceId"],
                                PrivateIpAddresses=theirs)
        # tags first: a reader that sees the address here sees our term with it
        await self._api("acquire", "create_tags", Resources=[self.eni], Tags=tags)
        await self._api("acquire", "assign_private_ip_addresses", NetworkInterfaceId=self.eni,
                        PrivateIpAddresses=self.ips, AllowReassignment=True)

    async def _point_routes(self, table: str) -> None:
        for cidr in self.cidrs:
            try:
                await self._api("acquire", "replace_route", RouteTableId=table,
                                DestinationCidrBlock=cidr, NetworkInterfaceId=self.eni)
            except MoverError as exc:
                if exc.code not in ("InvalidRoute.NotFound", "InvalidParameterValue"):
                    raise
                await self._api("acquire", "create_route", RouteTableId=table,
                                DestinationCidrBlock=cidr, NetworkInterfaceId=self.eni)

    async def release(self, term: int) -> None:
        """Nothing: the next holder reassigns (releasing first would leave a gap in
        which nobody holds the address)."""

    async def close(self) -> None:
        await self._stack.aclose()
        self._ec2 = None
