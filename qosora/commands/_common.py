"""Helpers shared by the verbs: example-bearing help, strict JSON output."""

from __future__ import annotations

import argparse
import json
import math
import sys


def add_verb(sub, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def add_output_flags(p: argparse.ArgumentParser, out_flag: str = "--out", what: str = "output directory") -> None:
    """The flags every writing verb shares: where (written atomically, never over its input), replace, JSON."""
    p.add_argument(out_flag, required=True, metavar="OUT", dest=out_flag.lstrip("-"),
                   help=f"{what} (written atomically; never the input)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _finite(obj):
    """NaN / inf -> null: `--json` output must parse as strict JSON (RFC 8259 has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def print_json(obj) -> None:
    json.dump(_finite(obj), sys.stdout, indent=2, default=str, allow_nan=False)
    sys.stdout.write("\n")
