"""The generated benchmark tables (tools/bench_tables.py) and the benchmark list that feeds them (tools/bench_all.py).

They read the committed bench/*.json and markdown, or copies in tmp_path; no benchmark runs and nothing heavy is
imported here.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(TOOLS))

import bench_all  # noqa: E402
import bench_tables  # noqa: E402


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


def _copy_docs(tmp_path: Path) -> list[Path]:
    return [Path(shutil.copy(doc, tmp_path / doc.name)) for doc in bench_tables.DOCS]


def test_committed_tables_match_the_json():
    out = _tool(str(TOOLS / "bench_tables.py"), "--check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_headline_is_the_rendered_table():
    readme = REPO / "README.md"
    (block,) = [b for b in bench_tables.blocks_in(readme.read_text(), str(readme)) if b.name == "headline"]
    assert block.body.strip() == bench_tables.TABLES["headline"].render_from()
    assert "| `qosora prepare` rank 64, time / peak RSS | 0.84x / 0.43x |" in block.body


def test_a_changed_number_changes_the_table(tmp_path):
    shutil.copytree(bench_tables.BENCH, tmp_path, dirs_exist_ok=True)
    train = json.loads((tmp_path / "train.json").read_text())
    train["sorsa"]["time_ratio_vs_peft"] = 0.5
    (tmp_path / "train.json").write_text(json.dumps(train))
    table = bench_tables.TABLES["train"]
    assert table.render_from(tmp_path) != table.render_from()
    assert "| qosora SORSA (with its orthonormal regularizer) | **0.50** |" in table.render_from(tmp_path)


def test_check_fails_on_an_edited_digit(tmp_path):
    benchmarks, readme = _copy_docs(tmp_path)
    text = benchmarks.read_text()
    assert "| quiet | 47.5 |" in text
    benchmarks.write_text(text.replace("| quiet | 47.5 |", "| quiet | 47.6 |"))
    out = _tool(str(TOOLS / "bench_tables.py"), "--check", "--docs", str(benchmarks), str(readme))
    assert out.returncode == 1
    assert "-| quiet | 47.6 |" in out.stdout and "+| quiet | 47.5 |" in out.stdout
    assert "| quiet | 47.6 |" in benchmarks.read_text()  # --check writes nothing


def test_rewrite_restores_an_edited_block(tmp_path):
    benchmarks, readme = _copy_docs(tmp_path)
    original = benchmarks.read_text()
    benchmarks.write_text(original.replace("| quiet | 47.5 |", "| quiet | 47.6 |"))
    assert bench_tables.main(["--docs", str(benchmarks), str(readme)]) == 0
    assert benchmarks.read_text() == original


def test_unknown_and_missing_markers_are_errors(tmp_path):
    benchmarks, readme = _copy_docs(tmp_path)
    out = _tool(str(TOOLS / "bench_tables.py"), "--check", "--docs", str(benchmarks))  # README's headline missing
    assert out.returncode == 2 and "headline" in out.stderr
    benchmarks.write_text(benchmarks.read_text().replace("bench:demo -->", "bench:nonesuch -->"))
    out = _tool(str(TOOLS / "bench_tables.py"), "--check", "--docs", str(benchmarks), str(readme))
    assert out.returncode == 2 and "nonesuch" in out.stderr


def test_optimum_anchor_rows_appear_when_the_run_has_them(tmp_path):
    shutil.copytree(bench_tables.BENCH, tmp_path, dirs_exist_ok=True)
    export = json.loads((tmp_path / "export.json").read_text())
    export["optimum_anchor"] = {"merge_s": 8.9, "optimum_export_s": 27.9, "optimum_peak_rss_mb": 2852.0,
                                "ort_rtn-asym_s": 5.9, "ort_rtn-asym_peak_rss_mb": 800.0,
                                "optimum_plus_rtn-asym_s": 33.8, "ort_hqq_s": 20.1, "ort_hqq_peak_rss_mb": 1000.0,
                                "optimum_plus_hqq_s": 48.0}
    (tmp_path / "export.json").write_text(json.dumps(export))
    cost = bench_tables.TABLES["export_cost"].render_from(tmp_path)
    assert "| optimum export + onnxruntime RTN-asym int4 (anchor) | 33.8 (27.9 + 5.9) | 2852 MiB |" in cost
    assert "**9.7 (0.29x the RTN route, 0.20x HQQ's)**" in cost
    headline = bench_tables.TABLES["headline"].render_from(tmp_path)
    assert "| `qosora export` int4, time / peak RSS | 0.29x / 0.16x |" in headline


def _out_path(command: str) -> str:
    """The --out argument of a shell command line."""
    words = shlex.split(command)
    return words[words.index("--out") + 1]


def test_bench_all_writes_every_table_input():
    out = _tool(str(TOOLS / "bench_all.py"), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("flock ")]
    assert all(words[:4] == ["flock", "/tmp/qosora-heavy.lock", "bash", "-c"] for words in lines)
    written = {_out_path(words[4]) for words in lines if "--out" in words[4]}
    read = {f for t in bench_tables.TABLES.values() for f in t.files}
    written |= {b.out for b in bench_all.STUDIES}  # run by name only
    assert read <= written, f"no benchmark in tools/bench_all.py writes {sorted(read - written)}"
    for b in bench_all.BENCHMARKS:
        if b.out:
            assert _out_path(b.command) == b.out, b.name


def test_bench_all_commands_are_the_ones_benchmarks_md_quotes():
    quoted = " ".join((REPO / "BENCHMARKS.md").read_text().replace("\\\n", " ").split())
    for b in bench_all.BENCHMARKS + bench_all.STUDIES:
        assert b.command in quoted, f"{b.name}: BENCHMARKS.md does not show {b.command!r}"


def test_bench_all_only_and_skip():
    assert [b.name for b in bench_all.select(["train", "export"], ["export"])] == ["train"]
    assert "demo" not in [b.name for b in bench_all.select([], ["demo"])]
    assert "reproduce" not in [b.name for b in bench_all.select([], [])]  # a study: only when named
    assert [b.name for b in bench_all.select(["reproduce"], [])] == ["reproduce"]


def test_a_newer_bench_export_run_is_refused_not_misread(tmp_path):
    shutil.copytree(bench_tables.BENCH, tmp_path, dirs_exist_ok=True)
    shutil.copy(tmp_path / "export_issue11.json", tmp_path / "export.json")  # `int4` means `asym` there
    with pytest.raises(bench_tables.TableError, match="issue #11"):
        bench_tables.TABLES["export_speed"].render_from(tmp_path)
