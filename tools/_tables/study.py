"""The method comparison's tables: tools/_reproduce_report.py renders them (also for `reproduce.py --report`)."""

from __future__ import annotations

from .core import table

@table("reproduce_methods", "reproduce")
def _reproduce_methods(j):
    """tools/reproduce.py's study: its own report module renders it (also for `reproduce.py --report`)."""
    from _reproduce_report import method_table

    return method_table(j["reproduce"])


@table("reproduce_variants", "reproduce")
def _reproduce_variants(j):
    from _reproduce_report import variants_table

    return variants_table(j["reproduce"])


@table("reproduce_parity", "reproduce")
def _reproduce_parity(j):
    from _reproduce_report import parity_line

    return parity_line(j["reproduce"])
