"""The group's keys on etcd (arbiter etcd): what vipd.core.group asks, as etcd v3 calls.

Keys under ``PREFIX/CLUSTER/``: ``holder`` (the holder's name, created put-if-absent
under its lease; its create revision is the term), ``successor`` (a planned handover's
target, no lease: the claim deletes it) and ``members/NODE`` (each node's record, under
its own lease). Values are JSON.

The client is aetcd (asyncio, gRPC; the extra ``vipd[etcd]``). aetcd 1.0 opens only
plaintext channels to one host; `_Client` keeps its calls and replaces the channel: TLS
from the config's ca/cert/key, and every endpoint in one gRPC target, so gRPC itself
fails over between the members of an etcd cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from vipd import credentials
from vipd.config import EtcdConfig
from vipd.core.group import Holder, Member, Observed
from vipd.core.protocol import State
from vipd.errors import VipError


class EtcdError(VipError):
    """An etcd call failed; the message names the endpoint set and the call."""


def _aetcd() -> Any:
    # gRPC's fork handlers crash the children vipd forks for exec checks and hooks
    # (SIGSEGV in the child, seen in the lab) and log a line per fork: vipd forks only
    # to exec, which needs none of them.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        import aetcd
    except ImportError as exc:
        raise EtcdError("arbiter etcd needs the aetcd client: pip install 'vipd[etcd]'") from exc
    return aetcd


def check_client(config: EtcdConfig) -> None:
    """What check-config can tell without calling etcd: the client is installed and the
    TLS files are readable."""
    _aetcd()
    if config.tls is not None:
        for name in ("ca", "cert", "key"):
            path = getattr(config.tls, name)
            if path is None:
                continue
            try:
                credentials.locate(path).read_bytes()
            except credentials.CredentialError as exc:
                if not credentials.encrypted_at_rest(path):  # else: read inside the unit
                    raise EtcdError(f"tls.{name}: {exc}") from exc
            except OSError as exc:
                raise EtcdError(f"tls.{name}: cannot read {path}: "
                                f"{exc.strerror or exc}") from exc


def store_for(config: EtcdConfig, cluster: str, node: str) -> EtcdStore:
    """The store a node of ``cluster`` uses; calls time out after a keep-alive period
    (TTL/4), so an unanswered keep-alive is known before the next one is due."""
    tls = None if config.tls is None else EtcdTls(config.tls.ca, config.tls.cert,
                                                 config.tls.key)
    return EtcdStore([(str(e.host), e.port) for e in config.endpoints], config.prefix,
                     cluster, node, tls=tls, timeout=config.ttl / 4)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    ca: Path
    cert: Path | None = None
    key: Path | None = None


def _target(endpoints: Sequence[tuple[str, int]]) -> str:
    """One gRPC target naming every endpoint (gRPC's pick_first tries them in order)."""
    v6 = any(":" in host for host, _ in endpoints)
    if v6:
        return "ipv6:" + ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                                  for h, p in endpoints)
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in endpoints)


def _client_class() -> Any:
    aetcd = _aetcd()
    import grpc

    class _Client(aetcd.Client):  # type: ignore[misc,name-defined]
        """aetcd's client on a channel to every endpoint, with TLS when configured."""

        def __init__(self, target: str, tls: EtcdTls | None, timeout: float) -> None:
            super().__init__(timeout=timeout)  # type: ignore[arg-type]
            self._target, self._tls = target, tls

        async def connect(self) -> None:
            if self._connected.is_set():
                return
            options = [("grpc.lb_policy_name", "pick_first")]
            if self._tls is not None:
                creds = grpc.ssl_channel_credentials(
                    self._tls.ca.read_bytes(),
                    credentials.locate(self._tls.key).read_bytes() if self._tls.key else None,
                    self._tls.cert.read_bytes() if self._tls.cert else None)
                self.channel = grpc.aio.secure_channel(self._target, creds, options=options)
            else:
                self.channel = grpc.aio.insecure_channel(self._target, options=options)
            rpc = aetcd.rpc
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(rpc.WatchStub(self.channel),
                                                  timeout=self._timeout, metadata=None)
            self._connected.set()

    return _Client


def encode_member(member: Member) -> bytes:
    record = asdict(member)
    record["state"] = member.state.name
    return json.dumps(record, sort_keys=True).encode()


def decode_member(data: bytes) -> Member:
    """A member's record; keys this version does not know (a newer member's) are
    ignored, so a group can be upgraded one node at a time."""
    record = json.loads(data)
    record["state"] = State[record["state"]]
    known = {f.name for f in fields(Member)}
    return Member(**{k: v for k, v in record.items() if k in known})


class EtcdStore:
    """One node's calls; every one raises EtcdError (with the call named) on failure."""

    def __init__(self, endpoints: Sequence[tuple[str, int]], prefix: str, cluster: str,
                 node: str, *, tls: EtcdTls | None = None, timeout: float = 0.3) -> None:
        self.node = node
        self.where = ", ".join(f"{h}:{p}" for h, p in endpoints)
        self.base = f"{prefix.rstrip('/')}/{cluster}/".encode()
        self.timeout = timeout
        self._endpoints, self._tls, self._first = list(endpoints), tls, 0
        self._client = self._connect()
        self._tx = self._client.transactions
        self._closing: set[asyncio.Task[None]] = set()
        import grpc
        aetcd = _aetcd()
        # what a call may raise: aetcd's errors, gRPC's own, the key files' (TLS)
        self._errors = (aetcd.ClientError, grpc.RpcError, OSError)
        # ... and those after which another member may answer where this one did not
        self._unreachable = (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError)

    def _connect(self) -> Any:
        """A client whose channel tries the endpoints from the ``_first`` on."""
        order = self._endpoints[self._first:] + self._endpoints[:self._first]
        return _client_class()(_target(order), self._tls, self.timeout)

    def _fail_over(self) -> None:
        """A call got no answer: the member we talk to may be cut off, and a connection to
        it goes quiet rather than breaking (gRPC would keep it for as long as its
        keepalive allows, which etcd holds to >= 5 s). Later calls go to the next member;
        the old channel is closed, which ends its watch (the caller starts a new one)."""
        if len(self._endpoints) < 2:
            return
        old, self._first = self._client, (self._first + 1) % len(self._endpoints)
        self._client = self._connect()
        task = asyncio.get_running_loop().create_task(old.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def holder_key(self) -> bytes:
        return self.base + b"holder"

    @property
    def successor_key(self) -> bytes:
        return self.base + b"successor"

    def member_key(self, node: str) -> bytes:
        return self.base + b"members/" + node.encode()

    async def _call(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await asyncio.wait_for(call(), self.timeout)
        except (TimeoutError, *self._unreachable) as exc:
            self._fail_over()
            raise EtcdError(f"etcd {self.where}: {what}: no answer within "
                            f"{round(self.timeout * 1000)} ms") from exc
        except self._errors as exc:
            detail = getattr(exc, "details", None)
            text = detail() if callable(detail) else str(exc) or type(exc).__name__
            raise EtcdError(f"etcd {self.where}: {what}: {text}") from exc

    async def grant(self, ttl: float) -> tuple[int, float]:
        """A new lease; returns (id, the TTL etcd granted: it may raise a short one)."""
        lease = await self._call("lease grant", lambda: self._client.lease(max(1, round(ttl))))
        return int(lease.id), float(lease.ttl)

    async def keep_alive(self, lease: int) -> float:
        """One keep-alive: the TTL etcd reports from now (0: the lease is gone)."""
        reply = await self._call("lease keep-alive", lambda: self._client.refresh_lease(lease))
        return float(reply.TTL)

    async def claim(self, lease: int) -> tuple[bool, Holder | None]:
        """Create the holder key under ``lease`` if absent (dropping the successor hint);
        returns whether we won and who holds it now."""
        tx = self._tx
        won, responses = await self._call("claim the holder key", lambda: self._client.transaction(
            compare=[tx.create(self.holder_key) == 0],
            success=[tx.put(self.holder_key, self.node.encode(), lease),
                     tx.delete(self.successor_key), tx.get(self.holder_key)],
            failure=[tx.get(self.holder_key)]))
        kvs = responses[-1]
        if not kvs:
            return bool(won), None
        _, meta = kvs[0]
        return bool(won), Holder(meta.value.decode(), int(meta.create_revision),
                                 int(meta.lease))

    async def resign(self, revision: int, successor: str | None) -> bool:
        """Delete the holder key if its create revision is still ``revision``; name the
        successor (a key without lease: the successor's claim deletes it)."""
        tx = self._tx
        # The successor first: a watcher sees the transaction's events one by one, and
        # must never see the key gone without the successor named (the best member
        # would claim in between).
        ops = [tx.put(self.successor_key, successor.encode())] if successor else []
        ops.append(tx.delete(self.holder_key))
        done, _ = await self._call("resign the holder key", lambda: self._client.transaction(
            compare=[tx.create(self.holder_key) == revision], success=ops, failure=[]))
        return bool(done)

    async def publish(self, member: Member, lease: int) -> None:
        await self._call(f"publish members/{member.node}", lambda: self._client.put(
            self.member_key(member.node), encode_member(member), lease=lease))

    async def leader(self) -> str:
        """The name of etcd's current leader (status, tests)."""
        status = await self._call("status", self._client.status)
        return str(status.leader.name)

    async def revoke(self, lease: int) -> None:
        await self._call("lease revoke", lambda: self._client.revoke_lease(lease))

    async def watch(self, on_change: Callable[[Observed], None]) -> None:
        """Read the group, then follow it: ``on_change`` gets the whole group after every
        change. Returns only by raising EtcdError (the caller reports it and starts over)."""
        result = await self._call("read the group", lambda: self._client.get_prefix(self.base))
        keys = {bytes(kv.key): kv for kv in result}
        revision = int(result.header.revision)
        on_change(self._observed(keys, revision))
        try:
            events = await self._client.watch_prefix(self.base, start_revision=revision + 1)
            async for event in events:
                key = bytes(event.kv.key)
                if event.kind == "DELETE":
                    keys.pop(key, None)
                else:
                    keys[key] = event.kv
                revision = max(revision, int(event.kv.mod_revision))
                on_change(self._observed(keys, revision))
        except self._errors as exc:
            raise EtcdError(f"etcd {self.where}: the watch of {self.base.decode()} broke: "
                            f"{exc or type(exc).__name__}") from exc
        raise EtcdError(f"etcd {self.where}: the watch of {self.base.decode()} ended")

    def _observed(self, keys: dict[bytes, Any], revision: int) -> Observed:
        holder, successor, members = None, None, {}
        for key, kv in keys.items():
            if key == self.holder_key:
                holder = Holder(kv.value.decode(), int(kv.create_revision), int(kv.lease))
            elif key == self.successor_key:
                successor = kv.value.decode()
            elif key.startswith(self.base + b"members/"):
                try:
                    member = decode_member(kv.value)
                except (ValueError, KeyError, TypeError):
                    continue  # a record of another version: ignored, not fatal
                members[member.node] = member
        return Observed(holder, members, successor, revision)

    async def close(self) -> None:
        await self._client.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
