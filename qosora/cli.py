"""The `qosora` command: a thin layer over the library. Each verb lives in `qosora/commands/<verb>.py` with
`add_parser(subparsers)` and `run(args) -> int`.

Every verb fails the same way (`fail`): one line on stderr, `qosora VERB: error: <problem>: <fix>`, exit 2, and
the output directory the verb was asked to create removed if it did not exist before. SIGTERM unwinds like
Ctrl-C, so temporary directories are removed on both.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import signal
import sys
from pathlib import Path

from qosora import __version__
from qosora.errors import QosoraError
from qosora.threads import configure_threads

COMMANDS = ["demo", "prepare", "train", "merge", "convert", "export", "generate", "eval", "plan", "inspect"]
COMMANDS.append("bench")  # qosora/commands/bench.py: prefill / decode speed of an exported directory
_OUTPUT_ARGS = ("out", "onnx")  # the verbs' output-directory flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qosora",
        description="SVD adapters (SORSA, OSoRA, PiSSA) on an NF4 base: prepare -> train -> merge -> export -> run.",
        epilog="Run `qosora VERB --help` for an example of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"qosora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="VERB", required=True)
    for name in COMMANDS:
        importlib.import_module(f"qosora.commands.{name}").add_parser(sub)
    return parser


def _new_outputs(args) -> list[Path]:
    paths = [getattr(args, a, None) for a in _OUTPUT_ARGS]
    return [Path(p) for p in paths if isinstance(p, str) and not Path(p).exists() and not Path(p).is_symlink()]


def fail(command: str, message: str, created: list[Path], code: int = 2) -> int:
    """Print one error line (never glued to a progress bar), remove what the verb created, return the exit code."""
    bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(bars, "_instances", ())):
        bar.close()
    for path in created:  # a run with checkpoints stays: `--resume` continues it
        if path.is_dir() and not path.is_symlink() and not (path / "checkpoints").is_dir():
            shutil.rmtree(path, ignore_errors=True)
    print(f"qosora {command}: error: {message}", file=sys.stderr)
    return code


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_threads()
    created = _new_outputs(args)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return int(args.func(args) or 0)
    except QosoraError as e:
        return fail(args.command, str(e), created)
    except KeyboardInterrupt:
        return fail(args.command, "interrupted", created, code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
