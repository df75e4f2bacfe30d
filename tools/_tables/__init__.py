"""The registered tables of tools/bench_tables.py, one module per part of the docs.

core (the registry and formatting), pipeline, export, study (BENCHMARKS.md's sections in order) and headline
(README.md). Importing this package registers every table in TABLES.
"""

from . import export, headline, pipeline, study  # noqa: F401  (registers their tables)
from .core import BENCH, REPO, TABLES, Table, TableError, table

__all__ = ["BENCH", "REPO", "TABLES", "Table", "TableError", "table"]
