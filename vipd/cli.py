"""The ``vipd`` command: one subcommand per entry in COMMANDS.

Exit codes: 0 ok, 1 a runtime failure (VipdError), 2 bad usage or a bad config/key file.
Errors are printed as ``FILE: key.path: message`` lines, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

from vipd import __version__, credentials
from vipd.config import Config, format_duration, load_config
from vipd.errors import ConfigError, VipdError
from vipd.keys import MAX_KEY_ID, generate_key_line, load_keys, read_private_file
from vipd.movers.webhook import load_secret
from vipd.tokens import load_tokens

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


# --- check-config -------------------------------------------------------------------

def _add_check_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the pair's YAML config")


def check_config(args: argparse.Namespace) -> int:
    file: str = args.file
    config = load_config(file)
    notes: list[str] = []
    keys = _secret(load_keys, config.key_file, notes) if config.auth is not None else {}
    if config.etcd is not None:
        from vipd.arbiter.etcd import EtcdError, check_client

        try:
            check_client(config.etcd)
        except EtcdError as exc:
            raise ConfigError(file, [("arbiter.etcd", str(exc))]) from exc
    if config.api.tokens_file is not None:
        _secret(load_tokens, config.api.tokens_file, notes)  # as the daemon will at start
    if config.metrics.web_config_file is not None:
        from vipd.webconfig import load_web_config

        load_web_config(config.metrics.web_config_file)  # keys, hashes, TLS files
    for i, mover in enumerate(config.movers):
        if mover.webhook is not None:
            _secret(load_secret, mover.webhook.secret_file, notes)  # 0600, long enough
        if mover.aws is not None and mover.aws.credentials_file is not None:
            _secret(lambda p: read_private_file(p, "AWS credentials file"),
                    mover.aws.credentials_file, notes)
        if mover.aws is not None:
            try:
                import aiobotocore  # noqa: F401
            except ImportError as exc:
                raise ConfigError(file, [(f"movers[{i}].aws", "the aws mover needs "
                                          "aiobotocore: pip install 'vipd[aws]'")]) from exc
    if config.fence == "kernel":
        from vipd.fence import FenceError, check_nftables

        try:
            check_nftables(talk=False)
        except FenceError as exc:
            raise ConfigError(file, [("fence", str(exc))]) from exc
    print(f"{file}: ok: {summary(config, None if keys is None else len(keys))}")
    for note in notes:
        print(f"  {note}")
    return EXIT_OK


T = TypeVar("T")


def _secret(load: Callable[[Path], T], path: Path, notes: list[str]) -> T | None:
    """A secret loaded as the daemon will load it; outside the unit, a credential that is
    encrypted at rest (which only systemd decrypts) is noted instead (None)."""
    name = credentials.name_of(path)
    if name is not None and not os.environ.get(credentials.ENV):
        where = credentials.stored(name)
        if where is not None and where.encrypted:
            notes.append(f"credential {name}: encrypted at rest in {where.path}; its contents "
                         "are checked when the unit starts (LoadCredentialEncrypted=)")
            return None
    return load(path)


def summary(config: Config, key_count: int | None) -> str:
    """The one-line description check-config prints for a valid config."""
    head = [f"node {config.node} in cluster {config.cluster}",
            f"{_count(len(config.vips), 'VIP')} on {config.interface}"]
    if config.etcd is not None:
        etcd = config.etcd
        return ", ".join([*head,
            f"group on etcd {','.join(map(str, etcd.endpoints))} (prefix {etcd.prefix}, "
            f"ttl {format_duration(etcd.ttl)}{', TLS' if etcd.tls else ''})",
            f"priority {config.priority}", _count(len(config.health), "check"),
            f"fence {config.fence}"])
    hb = config.pair
    return ", ".join([*head,
        f"{'peer' if len(hb.peers) == 1 else 'peers'} {','.join(map(str, hb.peers))}",
        f"heartbeat {format_duration(hb.interval)} x {hb.dead_after} "
        f"(dead after {format_duration(hb.dead_interval)})",
        _count(len(config.health), "check"),
        _count(key_count, "key") if key_count is not None else "keys in a credential",
        (f"arbiter witness {','.join(map(str, config.arbiter.witnesses))} (vote lease "
         f"{format_duration(config.vote_lease)})" if config.arbiter else "no arbiter"),
        f"fence {config.fence}",
    ])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- keygen -------------------------------------------------------------------------

def _key_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_KEY_ID:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_KEY_ID}, got {value}")
    return value


def _add_keygen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", type=_key_id, default=None, metavar="N",
                        help="key id (default: the current Unix time, so newer keys "
                             "get higher ids)")


def keygen(args: argparse.Namespace) -> int:
    print(generate_key_line(args.id))
    return EXIT_OK


# --- run / release ------------------------------------------------------------------

def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, metavar="FILE",
                        help="the pair's YAML config")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    import asyncio

    from vipd import logs
    from vipd.daemon import Daemon

    config = load_config(args.config)
    logs.setup(config.node, args.log_format)
    daemon = Daemon(config, config_path=Path(args.config))
    return asyncio.run(daemon.run())


def _add_release(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, metavar="FILE",
                        help="the pair's YAML config")


def release(args: argparse.Namespace) -> int:
    """Remove this config's VIPs (systemd ExecStopPost): a killed daemon leaves none."""
    import asyncio

    from vipd.movers.netlink import NetlinkMover

    config = load_config(args.config)
    mover = NetlinkMover(config.interface, config.vips)
    asyncio.run(mover.release())
    if config.fence == "kernel":
        from vipd.fence import KernelFence

        KernelFence(config.cluster, config.vips).remove()
    print(f"{args.config}: released {', '.join(map(str, config.vips))} on {config.interface}")
    return EXIT_OK


def _add_install_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, metavar="FILE",
                        help="the pair's YAML config")
    parser.add_argument("--user", default="vipd",
                        help="the user the service runs as (systemd unit: vipd); "
                             "'' to skip ownership checks")


def install_check(args: argparse.Namespace) -> int:
    """Exit 0 when nothing FAILs (warnings are printed), 1 otherwise."""
    from vipd.installcheck import FAIL, run_checks

    findings = run_checks(args.config, args.user or None)
    for f in findings:
        print(f"{f.level:<5} {f.check:<15} {f.detail}")
    failed = sum(1 for f in findings if f.level == FAIL)
    print(f"{args.config}: {failed} problem(s), "
          f"{sum(1 for f in findings if f.level == 'WARN')} warning(s)")
    return EXIT_FAILURE if failed else EXIT_OK


def _add_witness(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, metavar="FILE",
                        help="the witness's YAML config (docs/witness.md)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")


def witness(args: argparse.Namespace) -> int:
    from vipd.witness import main as witness_main

    return witness_main(Path(args.config), args.log_format)


def _add_demo(parser: argparse.ArgumentParser) -> None:
    from vipd.demo.command import add_arguments

    add_arguments(parser)


def demo(args: argparse.Namespace) -> int:
    from vipd.demo.command import main as demo_main

    return demo_main(args)


# --- wiring -------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "check-config": Command("validate a config file and the key file it names",
                            _add_check_config, check_config),
    "keygen": Command("print a new heartbeat key line 'ID SECRET'; append it with "
                      "(umask 077; vipd keygen >> /etc/vipd/NAME.key)",
                      _add_keygen, keygen),
    "run": Command("run the daemon for one pair config", _add_run, run),
    "release": Command("remove this config's VIPs from the interface (ExecStopPost)",
                       _add_release, release),
    "install-check": Command("report what is missing or unsafe for running this config "
                             "(file modes, user, capabilities, interface, sysctls, peers)",
                             _add_install_check, install_check),
    "witness": Command("serve as the third voter (witness) of the pairs in a witness config",
                       _add_witness, witness),
    "demo": Command("build a throwaway namespace lab, fail over, print the timeline (root)",
                    _add_demo, demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vipd", description="Keep virtual IP addresses on one healthy node of a pair.")
    parser.add_argument("--version", action="version", version=f"vipd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(cmd_parser)
        cmd_parser.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except VipdError as exc:
        print(f"vipd {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return code


if __name__ == "__main__":
    raise SystemExit(main())
