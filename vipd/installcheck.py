"""`vipd install-check -c FILE`: what would stop this host from running the pair safely.

Each finding is OK, WARN (works, but an operator should know) or FAIL (vipd will not work
as intended). Nothing is sent on the network: peers are checked by a route lookup.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface, ip_address
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vipd import credentials
from vipd.config import Config, load_config
from vipd.errors import ConfigError, VipdError
from vipd.keys import load_keys, read_private_file
from vipd.movers.webhook import load_secret
from vipd.tokens import load_tokens

CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    level: str
    check: str
    detail: str


def _sysctl(path: str) -> str | None:
    try:
        return Path("/proc/sys", path).read_text().strip()
    except OSError:
        return None


def check_file(path: Path, what: str, user: str | None,
               load: Callable[[Path], object] | None = None) -> list[Finding]:
    """Owner and mode of a file vipd reads. A secret comes with its ``load``er, which
    judges its mode, file type and contents exactly as the daemon will; here only the
    owner is added (the loader runs as root and cannot tell)."""
    problems: list[Finding] = []
    if load is not None:
        try:
            load(path)
        except ConfigError as exc:
            problems.append(Finding(FAIL, what, "; ".join(exc.lines())))
    try:
        st = path.stat()
    except OSError as exc:
        return problems or [Finding(FAIL, what, f"{path}: {exc.strerror}")]
    mode = stat.S_IMODE(st.st_mode)
    owner = _user_name(st.st_uid)
    if load is None and mode & 0o002:
        problems.append(Finding(FAIL, what, f"{path}: mode {mode:04o} is world-writable"))
    if load is not None and user is not None and owner != user:
        problems.append(Finding(FAIL, what, f"{path}: owned by {owner}, but vipd runs as "
                                            f"{user} and must read it; chown {user} {path}"))
    return problems or [Finding(OK, what, f"{path}: owner {owner}, mode {mode:04o}")]


def check_secret(path: Path, what: str, user: str | None,
                 load: Callable[[Path], object]) -> list[Finding]:
    """A secret as check_file judges it, and how it lies at rest: a systemd credential
    encrypted by `systemd-creds` (only systemd decrypts it, for the unit), or plaintext on
    disk (a finding of its own: docs/install.md shows how to encrypt it)."""
    name = credentials.name_of(path)
    if name is None:
        return [*check_file(path, what, user, load),
                Finding(WARN, what, f"{path} is plaintext at rest: encrypt it with "
                        f"systemd-creds and use credential:NAME (docs/install.md)")]
    if os.environ.get(credentials.ENV):  # inside the unit (systemd-run): read it
        try:
            load(path)
        except ConfigError as exc:
            return [Finding(FAIL, what, "; ".join(exc.lines()))]
        return [Finding(OK, what, f"credential {name}, from ${credentials.ENV}")]
    where = credentials.stored(name)
    if where is None:
        return [Finding(FAIL, what, credentials.outside_unit(name, None))]
    if where.encrypted:
        return [Finding(OK, what, f"credential {name}: encrypted at rest in {where.path}")]
    return [*check_file(where.path, what, user, load),
            Finding(WARN, what, f"credential {name} is plaintext at rest in {where.path}: "
                    f"encrypt it with systemd-creds encrypt --name={name} (docs/install.md)")]


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_capabilities() -> Finding:
    if os.geteuid() == 0:
        return Finding(OK, "capabilities", "running as root; the systemd unit runs vipd as "
                       "an unprivileged user with CAP_NET_ADMIN and CAP_NET_RAW only")
    status = Path("/proc/self/status").read_text()
    eff = int(next(line.split()[1] for line in status.splitlines()
                   if line.startswith("CapEff:")), 16)
    missing = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                                      (CAP_NET_RAW, "CAP_NET_RAW")) if not eff >> bit & 1]
    if missing:
        return Finding(FAIL, "capabilities", f"this process lacks {', '.join(missing)}: vipd "
                       "needs both to move and announce VIPs")
    return Finding(OK, "capabilities", "CAP_NET_ADMIN and CAP_NET_RAW present")


def check_sysctls(cfg: Config) -> list[Finding]:
    iface, found = cfg.interface, []
    rp = max(int(_sysctl(f"net/ipv4/conf/{k}/rp_filter") or 0) for k in ("all", iface))
    if rp == 1:
        found.append(Finding(WARN, "rp_filter", f"strict reverse-path filtering on {iface} "
                             "(rp_filter=1) drops VIP traffic that arrives on another "
                             "interface than the reply would use; 0 or 2 is safer"))
    ignore = max(int(_sysctl(f"net/ipv4/conf/{k}/arp_ignore") or 0) for k in ("all", iface))
    narrow = [v for v in cfg.vips if isinstance(v, IPv4Interface) and v.network.prefixlen == 32]
    if ignore >= 8:
        found.append(Finding(FAIL, "arp_ignore", f"arp_ignore={ignore} on {iface}: the node "
                             "never answers ARP, clients cannot reach the VIPs"))
    elif ignore >= 2 and narrow:
        found.append(Finding(FAIL, "arp_ignore", f"arp_ignore={ignore} answers ARP only for "
                             f"senders in the target's subnet; a /32 VIP ({narrow[0]}) has no "
                             "such sender: use 0 or 1"))
    announce = max(int(_sysctl(f"net/ipv4/conf/{k}/arp_announce") or 0)
                   for k in ("all", iface))
    if announce == 0:
        found.append(Finding(WARN, "arp_announce", f"arp_announce=0 on {iface}: the VIP may "
                             "be used as the source of ARP requests; 2 keeps neighbours' "
                             "caches pointing at the node's own address"))
    if any(v.version == 6 for v in cfg.vips) and _sysctl(
            f"net/ipv6/conf/{iface}/disable_ipv6") == "1":
        found.append(Finding(FAIL, "ipv6", f"IPv6 is disabled on {iface}, but IPv6 VIPs are "
                             "configured"))
    if not found:
        found.append(Finding(OK, "sysctls", f"rp_filter={rp}, arp_ignore={ignore}, "
                             f"arp_announce={announce} on {iface}"))
    return found


async def _messages(reply: Any) -> list[Any]:
    """pyroute2's async API answers dumps with an async generator, gets with a list."""
    if hasattr(reply, "__aiter__"):
        return [m async for m in reply]
    return list(reply)


async def check_network(cfg: Config) -> list[Finding]:
    found = []
    async with AsyncIPRoute() as ipr:
        links = await ipr.link_lookup(ifname=cfg.interface)
        if not links:
            return [Finding(FAIL, "interface", f"{cfg.interface} does not exist")]
        link = (await _messages(await ipr.link("get", index=links[0])))[0]
        up = link.get("state") == "up" or bool(link["flags"] & 1)
        found.append(Finding(OK if up else FAIL, "interface",
                             f"{cfg.interface} is {'up' if up else 'down'}"))
        local = {str(ip_address(m.get("address") or m.get("local")))
                 for m in await _messages(await ipr.addr("dump"))
                 if m.get("address") or m.get("local")}
        if cfg.heartbeat is None:
            return found  # a group: its nodes meet in etcd
        bind = str(cfg.heartbeat.bind.host)
        if bind not in local and not ip_address(bind).is_unspecified:
            found.append(Finding(FAIL, "heartbeat.bind", f"{bind} is not an address of this "
                                 "host: heartbeats could not be sent from it"))
        for peer in cfg.heartbeat.peers:
            try:
                route = (await _messages(await ipr.route("get", dst=str(peer.host))))[0]
            except (NetlinkError, IndexError) as exc:
                found.append(Finding(FAIL, "peer", f"no route to {peer.host}: {exc}"))
                continue
            via = route.get("oif")
            names = [m.get_attr("IFLA_IFNAME")
                     for m in await _messages(await ipr.link("get", index=via))]
            found.append(Finding(OK, "peer", f"{peer} is routed via {names[0]}"))
    return found


def check_fence(cfg: Config) -> list[Finding]:
    """The arbiter and the kernel fence: is split brain possible, does nftables work."""
    from vipd.fence import FenceError, check_nftables

    found = []
    if cfg.arbiter is None:
        found.append(Finding(WARN, "arbiter", "no arbiter: a partition of the heartbeat path "
                             "makes both nodes active (docs/election.md: when to use a "
                             "witness)"))
    elif cfg.arbiter.etcd is not None:
        etcd = cfg.arbiter.etcd
        found.append(Finding(OK, "arbiter", f"etcd {', '.join(map(str, etcd.endpoints))}, "
                             f"ttl {etcd.ttl:g} s" + (", TLS" if etcd.tls else "")))
        if etcd.tls is None:
            found.append(Finding(WARN, "arbiter", "etcd without TLS: anyone on the path "
                                 "can read and forge the group's keys"))
    else:
        found.append(Finding(OK, "arbiter", f"witness {', '.join(map(str, cfg.arbiter.witnesses))}"
                             f", vote lease {cfg.vote_lease * 1000:.0f} ms"))
    if cfg.fence == "kernel":
        try:
            found.append(Finding(OK, "fence", check_nftables(talk=os.geteuid() == 0)))
        except FenceError as exc:
            found.append(Finding(FAIL, "fence", str(exc)))
        if cfg.heartbeat is not None:
            found.append(Finding(OK, "fence", f"heartbeats to {cfg.heartbeat.bind} are "
                                 "accepted from the peers and witnesses only, in the kernel"))
    elif cfg.heartbeat is not None:
        found.append(Finding(WARN, "fence", "fence: none: every host can make the daemon "
                             "read and reject datagrams at the heartbeat port (fence: kernel "
                             "filters them in the kernel)"))
    else:
        found.append(Finding(WARN, "fence", "fence: none: after kill -9 or a frozen process "
                             "the VIPs answer until their address lifetime runs out"))
    return found


def check_metrics(cfg: Config, user: str | None) -> list[Finding]:
    """The /metrics listener: its web config (TLS, basic auth) as the daemon will load
    it, and plain HTTP that other hosts can reach."""
    from vipd.webconfig import load_web_config, plain_beyond_loopback, plain_warning

    listen, file = cfg.metrics.listen, cfg.metrics.web_config_file
    if listen is None:
        return [Finding(OK, "metrics", "metrics.listen is off")]
    found: list[Finding] = []
    security = None
    if file is not None:
        found += check_file(file, "metrics web config", user)
        try:
            security = load_web_config(file)
        except ConfigError as exc:
            return [*found, Finding(FAIL, "metrics", "; ".join(exc.lines()))]
        if (tls := security.config.tls_server_config) is not None:
            found += check_secret(tls.key_file, "metrics TLS key", user,
                                  lambda p: read_private_file(p, "TLS key file"))
    if plain_beyond_loopback(listen, security is not None and security.ssl_context is not None):
        return [*found, Finding(WARN, "metrics", plain_warning("metrics.listen", listen))]
    how = security.describe() if security is not None else "plain HTTP on loopback"
    return [*found, Finding(OK, "metrics", f"{listen}: {how}")]


def run_checks(path: str, user: str | None) -> list[Finding]:
    cfg = load_config(path)
    found: list[Finding] = [Finding(OK, "config", f"{path} is valid")]
    found += check_file(Path(path), "config file", user)
    if cfg.auth is not None:
        found += check_secret(cfg.auth.key_file, "key file", user, load_keys)
    for mover in cfg.remote_movers:
        if mover.aws is not None and mover.aws.credentials_file is not None:
            found += check_secret(mover.aws.credentials_file, "AWS credentials file", user,
                                  lambda p: read_private_file(p, "AWS credentials file"))
        if mover.webhook is not None:
            found += check_secret(mover.webhook.secret_file, "webhook secret file", user,
                                  load_secret)
    if cfg.etcd is not None and cfg.etcd.tls is not None:
        for name in ("ca", "cert", "key"):
            if (path := getattr(cfg.etcd.tls, name)) is None:
                continue
            if name == "key":
                found += check_secret(path, "etcd key file", user,
                                      lambda p: read_private_file(p, "etcd key file"))
            else:
                found += check_file(path, f"etcd {name} file", user)
    if cfg.api.tokens_file is not None:
        found += check_secret(cfg.api.tokens_file, "tokens file", user, load_tokens)
    if cfg.api.tokens_file is None and cfg.api.listen is not None:
        found.append(Finding(WARN, "api", "no api.tokens_file: vipctl cannot drive this node"))
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            found.append(Finding(FAIL, "user", f"user {user} does not exist: install "
                                 "systemd/vipd.sysusers.conf (systemd-sysusers)"))
    found += check_metrics(cfg, user)
    found.append(check_capabilities())
    found += check_sysctls(cfg)
    found += check_fence(cfg)
    try:
        found += asyncio.run(check_network(cfg))
    except (OSError, VipdError) as exc:
        found.append(Finding(FAIL, "network", f"cannot inspect the network: {exc}"))
    return found
