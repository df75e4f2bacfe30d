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
