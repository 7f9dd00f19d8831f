"""`vipd demo`: placeholder replaced below."""
import argparse

FAULTS = ("kill", "link-down", "health", "stop")
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fault", choices=FAULTS, default="kill")
def main(args: argparse.Namespace) -> int:
    raise NotImplementedError
