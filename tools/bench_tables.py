"""The benchmark tables of BENCHMARKS.md and README.md, rendered from the committed bench/*.json.

A hand-copied figure drifts from the JSON it came from; a rendered one cannot. Each table is a name, the
bench/<stem>.json files it reads and a render function (the loaded JSON in, a markdown table out). In the markdown
a generated table sits between two marker lines, which this script owns:

    <!-- bench:NAME -->
    (the table: rewritten from the JSON, hand edits are lost)
    <!-- /bench:NAME -->

    python tools/bench_tables.py            # rewrite every marked block from bench/*.json
    python tools/bench_tables.py --check    # rewrite nothing; print a diff of each stale block; exit 1 if any

An unknown NAME in a marker, or a registered table with no marker, is an error (exit 2).

To add a table: in the tools/_tables/ module of its section, write a render function that takes `j` (`j[stem]` is
bench/<stem>.json, loaded) and returns `md_table(header, rows)`, register it with `@table("NAME", "stem", ...)`, put
the two marker lines where the table goes and run this script. tools/bench_all.py must list the benchmark command that writes each JSON file
(tests/test_bench_tables.py checks both). Only json and the standard library here: the check runs in the fast tier.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _tables and _reproduce_report, also from the tests
from _tables import BENCH, REPO, TABLES, TableError  # noqa: E402

DOCS = (REPO / "BENCHMARKS.md", REPO / "README.md")
MARKER = re.compile(r"<!-- (/?)bench:([\w.-]+) -->")

__all__ = ["BENCH", "DOCS", "TABLES", "TableError", "blocks_in", "main", "regenerate"]


# ---------------------------------------------------------------------------------------------------------------
# Marked blocks


@dataclass(frozen=True)
class Block:
    name: str
    start: int  # index of the opening marker line
    end: int  # index of the closing marker line
    body: str  # the lines between them


def blocks_in(text: str, doc: str = "<text>") -> list[Block]:
    """The marked blocks of a markdown text, in order; malformed markers raise TableError."""
    lines = text.splitlines(keepends=True)
    found, opened = [], None
    for i, line in enumerate(lines):
        m = MARKER.fullmatch(line.strip())
        if not m:
            continue
        closing, name = m[1] == "/", m[2]
        if not closing and opened is None:
            opened = (name, i)
        elif closing and opened is not None and opened[0] == name:
            found.append(Block(name, opened[1], i, "".join(lines[opened[1] + 1:i])))
            opened = None
        else:
            raise TableError(f"{doc}:{i + 1}: unexpected {line.strip()} (blocks open and close in pairs, unnested)")
    if opened:
        raise TableError(f"{doc}:{opened[1] + 1}: <!-- bench:{opened[0]} --> is never closed")
    return found


def _framed(rendered: str) -> str:
    """A block's body: the table with a blank line either side, so no renderer reads a marker as a table row."""
    return f"\n{rendered}\n\n"


def regenerate(docs: Sequence[Path] = DOCS, bench: Path = BENCH) -> dict[Path, tuple[str, str, list[str]]]:
    """{doc: (its text, its text with every block rendered from `bench`, the unified diff of each stale block)}."""
    texts = {doc: doc.read_text() for doc in docs}
    found = {doc: blocks_in(text, str(doc)) for doc, text in texts.items()}
    names = {b.name for blocks in found.values() for b in blocks}
    if unknown := sorted(names - TABLES.keys()):
        raise TableError(f"no table registered for marker(s) {', '.join(unknown)} (tools/bench_tables.py)")
    if missing := sorted(TABLES.keys() - names):
        raise TableError(f"no <!-- bench:NAME --> marker in {', '.join(map(str, docs))} for table(s) "
                         f"{', '.join(missing)}")
    rendered = {name: _framed(TABLES[name].render_from(bench)) for name in sorted(names)}
    result = {}
    for doc, text in texts.items():
        lines, diffs = text.splitlines(keepends=True), []
        for b in reversed(found[doc]):  # from the end, so earlier line indices stay valid
            new = rendered[b.name]
            if new != b.body:
                diffs.insert(0, "".join(difflib.unified_diff(
                    b.body.splitlines(keepends=True), new.splitlines(keepends=True),
                    f"{doc.name} bench:{b.name} (as written)",
                    f"{doc.name} bench:{b.name} (from {', '.join(TABLES[b.name].files)})")))
                lines[b.start + 1:b.end] = [new]
        result[doc] = (text, "".join(lines), diffs)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; print stale blocks as diffs, exit 1 if any")
    ap.add_argument("--bench", type=Path, default=BENCH, help="folder of the JSON files (default: bench/)")
    ap.add_argument("--docs", type=Path, nargs="+", default=list(DOCS), help="markdown files (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        result = regenerate(args.docs, args.bench)
    except (TableError, OSError, json.JSONDecodeError) as e:
        print(f"bench_tables: {e}", file=sys.stderr)
        return 2
    stale = [d for _, _, diffs in result.values() for d in diffs]
    if args.check:
        sys.stdout.writelines(stale)
        if stale:
            print(f"bench_tables: {len(stale)} table(s) differ from bench/*.json; run python tools/bench_tables.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for doc, (old, new, diffs) in result.items():
        if new != old:
            doc.write_text(new)
            print(f"rewrote {len(diffs)} table(s) in {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
