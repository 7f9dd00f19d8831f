"""`vipctl`: see and drive a vipd pair through the local daemon's control API.

Exit codes: 0 done; 1 refused by the daemon (409, with its reason) or failed; 2 bad usage;
3 daemon unreachable; 4 not authorised (401/403); 5 --wait timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from vipd import __version__
from vipd.tokens import Role, new_token
from vipd.view import GroupView, Status

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_TIMEOUT = range(6)
DEFAULT_API = "http://127.0.0.1:9440"


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vipctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vipctl {__version__}")
    p.add_argument("--api", default=os.environ.get("VIPCTL_API", DEFAULT_API),
                   help=f"daemon API URL (default {DEFAULT_API}, or $VIPCTL_API)")
    p.add_argument("--token-file", help="file holding the bearer token (else $VIPCTL_TOKEN)")
    p.add_argument("--cacert", help="CA to verify an https API")
    p.add_argument("--cert", help="client certificate (when the API requires one)")
    p.add_argument("--key", help="client certificate key")
    p.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="both nodes as a table")
    s.add_argument("--json", action="store_true", help="the daemon's JSON as is")
    for name, text in (("switchover", "planned move of the VIPs to the peer (in a group: "
                                      "to the best eligible member, or --to NODE)"),
                       ("promote", "take the VIPs on this node")):
        c = sub.add_parser(name, help=text)
        if name == "switchover":
            c.add_argument("--to", metavar="NODE", help="the member to hand over to (a group)")
        c.add_argument("--force", action="store_true", help="skip the daemon's pre-checks")
        c.add_argument("--expected-term", type=int, help="refuse if the pair moved on")
        c.add_argument("--wait", action="store_true", help="wait until the move finished")
        c.add_argument("--wait-timeout", type=float, default=10.0)
    m = sub.add_parser("maintenance", help="drain this node (on) or return it (off)")
    m.add_argument("mode", choices=("on", "off"))
    m.add_argument("--expected-term", type=int)
    t = sub.add_parser("token", help="token management")
    tsub = t.add_subparsers(dest="token_command", required=True)
    n = tsub.add_parser("new", help="print a new token once and the line for the tokens file")
    n.add_argument("name")
    n.add_argument("role", choices=[r.value for r in Role])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "token":
            return token_new(args)
        return asyncio.run(_run(args))
    except CliError as exc:
        print(f"vipctl: {exc}", file=sys.stderr)
        return exc.code


def token_new(args: argparse.Namespace) -> int:
    try:
        token, line = new_token(args.name, args.role)
    except ValueError as exc:
        raise CliError(EXIT_USAGE, str(exc)) from exc
    print(f"token (shown once, give it to {args.name}): {token}")
    print(f"add this line to the tokens file (api.tokens_file) and reload vipd:\n{line}")
    return EXIT_OK


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            with open(args.token_file) as f:
                return f.read().strip()
        except OSError as exc:
            raise CliError(EXIT_USAGE, f"cannot read token file {args.token_file}: "
                                       f"{exc.strerror}") from exc
    token = os.environ.get("VIPCTL_TOKEN", "").strip()
    if not token:
        raise CliError(EXIT_USAGE, "no token: use --token-file FILE or set VIPCTL_TOKEN")
    return token


def _ssl(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.api.startswith("https:"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=args.cacert)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(EXIT_USAGE, f"cannot load TLS files (--cacert {args.cacert}, --cert "
                                   f"{args.cert}, --key {args.key}): {exc}") from exc
    return ctx


class Client:
    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession) -> None:
        self.base = args.api.rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {_token(args)}"}
        self.ssl = _ssl(args)

    async def call(self, method: str, path: str,
                   body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        url = self.base + path
        try:
            async with self.session.request(method, url, json=body, headers=self.headers,
                                            ssl=self.ssl if self.ssl else True) as resp:
                try:
                    data = await resp.json(content_type=None)
                except (json.JSONDecodeError, aiohttp.ContentTypeError):
                    data = {"error": (await resp.text())[:200]}
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError, ssl.SSLError) as exc:
            raise CliError(EXIT_UNREACHABLE, f"cannot reach the daemon at {url}: "
                                             f"{exc or type(exc).__name__}") from exc
        if status in (401, 403):
            raise CliError(EXIT_AUTH, f"{status}: {data.get('error', 'not authorised')}")
        if status >= 400:
            raise CliError(EXIT_REFUSED, f"refused ({status}): {data.get('error', data)}")
        return status, data


async def _run(args: argparse.Namespace) -> int:
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = Client(args, session)
        if args.command == "status":
            _, status = await client.call("GET", "/v1/status")
            print(json.dumps(status, indent=2) if args.json else render_status(status))
            return EXIT_OK
        if args.command == "maintenance":
            body: dict[str, Any] = {"enabled": args.mode == "on"}
        else:
            body = {"force": args.force}
            if getattr(args, "to", None):
                body["to"] = args.to
        if args.expected_term is not None:
            body["expected_term"] = args.expected_term
        started = time.monotonic()
        _, result = await client.call("POST", f"/v1/{args.command}", body)
        print(f"{args.command}: {result['message']} (state {result['state']}, "
              f"term {result['term']})")
        if getattr(args, "wait", False):
            return await _wait(client, args, started)
        return EXIT_OK


async def _wait(client: Client, args: argparse.Namespace, started: float) -> int:
    """Poll until the VIPs are where the command wanted them."""
    want_here = args.command == "promote"
    deadline = started + args.wait_timeout
    while time.monotonic() < deadline:
        _, s = await client.call("GET", "/v1/status")
        if s.get("group") is not None:
            where = _group_active(s["group"])
            wanted = (where == s["node"]) if want_here else (
                where not in (None, s["node"]) and (not args.to or where == args.to))
            if wanted:
                print(f"done: VIPs on {where} after "
                      f"{1000 * (time.monotonic() - started):.0f} ms")
                return EXIT_OK
            await asyncio.sleep(0.01)
            continue
        peer = s.get("peer") or {}
        here_active = s["state"] == "ACTIVE" and s.get("handover") is None
        peer_active = peer.get("state") == "ACTIVE" and peer.get("reachable")
        if (here_active and not peer_active) if want_here else (
                s["state"] != "ACTIVE" and peer_active):
            where = s["node"] if want_here else peer.get("node")
            print(f"done: VIPs on {where} after {1000 * (time.monotonic() - started):.0f} ms")
            return EXIT_OK
        await asyncio.sleep(0.01)
    raise CliError(EXIT_TIMEOUT, f"the move did not finish within {args.wait_timeout:g} s")


def _group_active(group: dict[str, Any]) -> str | None:
    """The member that holds the key and says it is ACTIVE (has the VIPs up)."""
    return next((m["node"] for m in group["members"]
                 if m["holder"] and m["state"] == "ACTIVE"), None)


def render_status(doc: dict[str, Any]) -> str:
    """Both nodes side by side, from a node's status document (`vipd.view.Status`); a
    group's members one per line."""
    s = Status.from_json(doc)
    if s.group is not None:
        return _render_group(s, s.group)
    p = s.peer
    yes = {True: "yes", False: "no", None: "unknown"}
    rows = [
        ("node", f"{s.node} (this node)", f"{p.node} (peer)" if p else "- (peer)"),
        ("state", s.state + (f" -> {s.handover}" if s.handover else ""),
         p.state if p else "not heard"),
        ("term", str(s.term), str(p.term) if p else "-"),
        ("priority", str(s.priority), str(p.priority) if p else "-"),
        ("healthy", yes[s.healthy] + (" (override)" if s.health_override else ""),
         yes[p.healthy] if p else "-"),
        ("maintenance", yes[s.maintenance], yes[p.state == "MAINTENANCE"] if p else "-"),
        ("preferred", yes[s.preferred], yes["PREFERRED" in p.flags] if p else "-"),
        ("last heartbeat", "-", f"{1000 * p.last_heartbeat_seconds_ago:.0f} ms ago"
         + ("" if p.reachable else " (unreachable)") if p else "-"),
        ("round trip", "-", f"{p.rtt_ms} ms" if p and p.rtt_ms is not None else "-"),
    ]
    width = max(len(r[1]) for r in rows) + 2
    lines = [f"cluster {s.cluster}, pair term {s.pair_term}, vipd {s.version}, "
             f"up {s.uptime_seconds:.0f} s"]
    lines += [f"  {name:<15}{a:<{width}}{b}" for name, a, b in rows]
    held = [v.address for v in s.vips if v.held]
    lines.append(f"  VIPs on {s.interface} here: {', '.join(held) or 'none'}"
                 + ("" if s.fence == "none" else f"; kernel gate {s.fence}"))
    if s.heartbeat_filtered:
        lines.append(f"  heartbeat filter: {s.heartbeat_filtered} datagrams from neither the "
                     f"peer nor a witness dropped by the kernel")
    lines += _arbiter_lines(s)
    lines += _mover_lines(s)
    lines += _damping_lines(s)
    lines += _key_lines(s)
    for c in s.checks:
        lines.append(f"  check {c.name} ({c.kind}): {yes[c.up]} - {c.detail}")
    if p and not p.settings_match:
        lines.append("  WARNING: the peer's pair settings differ (cluster, VIPs, interval, "
                     "dead_after)")
    if s.rejected_heartbeats:
        lines.append(f"  rejected heartbeats: {s.rejected_heartbeats}")
    return "\n".join(lines)


def _key_lines(s: Status) -> list[str]:
    """Which heartbeat key each node signs with: a rotation's old key may be removed once
    both sign with the new one (docs/protocol.md, key rotation)."""
    k = s.keys
    if k is None:
        return []
    line = (f"  heartbeat keys: {', '.join(map(str, k.loaded))} loaded, signs with "
            f"{k.signing}; ")
    if k.peer_signing is None:
        return [line + "peer not heard"]
    line += f"peer signs with {k.peer_signing}, holds up to {k.peer_newest}"
    newest, older = max(k.loaded), [i for i in k.loaded if i < max(k.loaded)]
    if not older:
        return [line]
    if k.signing == k.peer_signing == newest:
        return [line + f"; both sign with {newest}: key {', '.join(map(str, older))} "
                f"may be removed"]
    return [line + f"; rotation to key {newest} not done (both must sign with it)"]


def _damping_lines(s: Status) -> list[str]:
    """Flap damping, when it keeps this node from preempting."""
    d = s.damping
    if d is None or not d.damped:
        return []
    left = ("until healthy" if d.remaining_seconds is None
            else f"{d.remaining_seconds:.0f} s more")
    return [f"  preemption damped ({left}, hold-down {d.hold_down_seconds:g} s): "
            f"{d.failures} failure(s) within {d.window_seconds:g} s, last "
            f"{d.last_failure_seconds_ago or 0:.0f} s ago: {d.last_failure}"]


def _render_group(s: Status, g: GroupView) -> str:
    """A group on etcd: the etcd connection, then every member, the holder marked."""
    yes = {True: "yes", False: "no", None: "unknown"}
    lines = [f"cluster {s.cluster}, group term {s.pair_term}, vipd {s.version}, "
             f"up {s.uptime_seconds:.0f} s",
             f"  this node: {s.node} {s.state} term {s.term}, priority {s.priority}, healthy "
             f"{yes[s.healthy]}, maintenance {yes[s.maintenance]}",
             f"  etcd {', '.join(g.endpoints)} ({g.prefix}): {g.etcd} - {g.etcd_detail}"]
    ttl = f"lease TTL {g.ttl_seconds:g} s"
    if g.granted_ttl_seconds is not None and g.granted_ttl_seconds != g.ttl_seconds:
        ttl += f" (etcd granted {g.granted_ttl_seconds:g} s)"
    if g.lease_remaining_seconds is not None:
        ttl += f", lease {g.lease} alive for {1000 * g.lease_remaining_seconds:.0f} ms more"
    lines.append(f"  {ttl}")
    lines.append(f"  holder: {g.holder or 'nobody'}"
                 + (f" (term {g.holder_term})" if g.holder else "")
                 + (f", successor named: {g.successor}" if g.successor else ""))
    rows = [("member", "state", "priority", "healthy", "eligible", "notes")]
    for m in g.members:
        notes = [n for n, on in (("holder", m.holder), ("maintenance", m.maintenance),
                                 ("asks for the VIPs", m.wants),
                                 ("starting: waits one TTL for the group", m.starting),
                                 ("SETTINGS DIFFER", not m.settings_match)) if on]
        rows.append((m.node + (" (this node)" if m.node == s.node else ""), m.state,
                     str(m.priority), yes[m.healthy], yes[m.eligible], ", ".join(notes)))
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(5)]
    lines += ["  " + "".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + r[5]
              for r in rows]
    held = [v.address for v in s.vips if v.held]
    lines.append(f"  VIPs on {s.interface} here: {', '.join(held) or 'none'}"
                 + ("" if s.fence == "none" else f"; kernel gate {s.fence}"))
    lines += _mover_lines(s)
    for c in s.checks:
        lines.append(f"  check {c.name} ({c.kind}): {yes[c.up]} - {c.detail}")
    if any(not m.settings_match for m in g.members):
        lines.append("  WARNING: members' settings differ (VIPs, etcd prefix or TTL)")
    return "\n".join(lines)


def _mover_lines(s: Status) -> list[str]:
    """Each remote mover: its state and what the provider said when last verified."""
    lines = []
    for m in s.movers:
        seen = ("" if m.verified_seconds_ago is None else
                f", verified {1000 * m.verified_seconds_ago:.0f} ms ago")
        holder = "" if m.holder is None and m.term is None else (
            f" (provider: {m.holder or 'nobody'}, term {m.term})")
        lines.append(f"  mover {m.name}: {m.state}{holder}{seen}"
                     + (f"; last error: {m.last_error}" if m.last_error else ""))
    return lines


def _arbiter_lines(s: Status) -> list[str]:
    """The votes: who has them, for how long, and why a takeover waits."""
    a = s.arbiter
    if a.kind == "none":
        return ["  arbiter: none (a partition of the heartbeat path makes both nodes active)"]
    votes = ", ".join(f"{v.voter} ({v.kind}, {1000 * v.remaining_seconds:.0f} ms left)"
                      for v in a.votes) or "none"
    until = ("" if a.majority_remaining_seconds is None
             else f"; majority for {1000 * a.majority_remaining_seconds:.0f} ms")
    lines = [f"  arbiter: witness, lease {1000 * a.lease_seconds:.0f} ms, "
             f"{a.majority} of {a.voters} votes needed",
             f"  votes held: {votes}{until}",
             f"  our vote: {a.vote_for or 'free'}"]
    for w in a.witnesses:
        seen = ("never answered" if w.last_reply_seconds_ago is None else
                f"last reply {1000 * w.last_reply_seconds_ago:.0f} ms ago ({w.verdict})")
        lines.append(f"  witness {w.address}: {'reachable' if w.reachable else 'UNREACHABLE'}"
                     f", {seen}")
    if a.campaign:
        lines.append(f"  waiting for votes to take over: {a.campaign}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
