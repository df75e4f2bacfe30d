"""The table registry and the markdown and number formatting every section's renderers share."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"

Render = Callable[[dict[str, Any]], str]


class TableError(Exception):
    """A marker or a table that cannot be rendered; the message names the file and what to fix."""


@dataclass(frozen=True)
class Table:
    name: str
    stems: tuple[str, ...]  # reads bench/<stem>.json for each
    render: Render
    optional: tuple[str, ...] = ()  # stems that may not exist yet (a column still to be measured): None then

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f"bench/{s}.json" for s in self.stems)

    def render_from(self, bench: Path = BENCH) -> str:
        """The table rendered from the JSON files under `bench`."""
        data = {s: json.loads((bench / f"{s}.json").read_text())
                if s not in self.optional or (bench / f"{s}.json").is_file() else None for s in self.stems}
        try:
            return self.render(data)
        except KeyError as e:  # a benchmark script renamed or dropped a field this table reads
            raise TableError(f"table {self.name!r}: {', '.join(self.files)} has no {e}; "
                             f"update its render function in tools/_tables/") from None


TABLES: dict[str, Table] = {}


def table(name: str, *stems: str, optional: tuple[str, ...] = ()) -> Callable[[Render], Render]:
    """Register the decorated function as the render function of table NAME, reading bench/<stem>.json (`optional`
    stems: None where the file is not there yet)."""
    def register(render: Render) -> Render:
        if name in TABLES:
            raise ValueError(f"table {name!r} registered twice")
        TABLES[name] = Table(name, stems, render, optional)
        return render
    return register


# ---------------------------------------------------------------------------------------------------------------
# Markdown and number formatting


def md_row(cells: Iterable[object]) -> str:
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    return "\n".join([md_row(header), "|" + "---|" * len(header), *map(md_row, rows)])


def bold(text: object) -> str:
    return f"**{text}**"


def times(x: float) -> str:
    return f"{x:.2f}x"


def pct(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def signed(x: float) -> str:
    """A perplexity increase, as every table shows one: +0.280."""
    return f"{x:+.3f}"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def seconds(s: float) -> str:
    """Whole seconds, tenths below 10 s: 550 s, 8.6 s."""
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"
