"""The `qosora` command: a thin layer over the library. Each verb lives in `qosora/commands/<verb>.py` with
`add_parser(subparsers)` and `run(args) -> int`; errors the user can fix print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from qosora import __version__
from qosora.errors import QosoraError

COMMANDS = ["demo", "prepare", "train", "merge", "export", "generate", "eval", "plan", "inspect"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qosora",
        description="SVD adapters (SORSA, OSoRA, PiSSA) on an NF4 base: prepare -> train -> merge -> export -> run.",
        epilog="Run `qosora VERB --help` for an example of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"qosora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="VERB", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"qosora.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"qosora.commands.{name}":
                raise
            continue  # verb not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QosoraError as e:
        print(f"qosora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qosora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
