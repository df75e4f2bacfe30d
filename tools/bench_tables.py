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

To add a table: write a render function below that takes `j` (`j[stem]` is bench/<stem>.json, loaded) and returns
`md_table(header, rows)`, register it with `@table("NAME", "stem", ...)`, put the two marker lines where the table
goes and run this script. tools/bench_all.py must list the benchmark command that writes each JSON file
(tests/test_bench_tables.py checks both). Only json and the standard library here: the check runs in the fast tier.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO / "tools"))  # _reproduce_report, also when imported from the tests
DOCS = (REPO / "BENCHMARKS.md", REPO / "README.md")
MARKER = re.compile(r"<!-- (/?)bench:([\w.-]+) -->")

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
                             f"update its render function in tools/bench_tables.py") from None


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


# ---------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md


@table("demo", "demo")
def _demo(j):
    runs = j["demo"]["runs"]
    rows = []
    for name, run in runs.items():
        quiet = runs[name.replace("one core busy", "quiet")]  # each loaded run against its quiet twin
        ratio = f"{run['wall_s'] / quiet['wall_s']:.2f}"
        rows.append((name, f"{run['wall_s']:.1f}", f"{run['prepare_and_train_s']:.1f}", _train_compute(run["compute"]),
                     ratio if run is quiet else bold(ratio)))
    return md_table(("run", "wall s", "prepare + train s", "train computes in", "/ quiet"), rows)


def _train_compute(log_line: str) -> str:
    """'qosora train: computing in bf16 (autocast) on cpu (...); 2 threads' -> 'bf16, 2 threads'."""
    dtype, threads = re.search(r"computing in (\w+).*; (\d+) threads", log_line).groups()
    return f"{dtype}, {threads} thread" + ("" if threads == "1" else "s")


_FIDELITY_ROWS = (  # (fidelity.json result, label, highlighted)
    ("plain NF4 (qlora init)", "plain NF4, bitsandbytes (the anchor; `qlora --nf4-scale absmax`)", False),
    ("plain NF4, searched scales", "plain NF4, searched scales (`qlora`)", False),
    ("randomized SVD, 1 round, absmax scales", "randomized SVD, 1 round, bitsandbytes' absmax scales", False),
    ("randomized SVD, 1 round", "randomized SVD, 1 round (the default)", True),
    ("exact SVD, 1 round", "exact SVD, 1 round", False),
    ("randomized SVD, 5 rounds, absmax scales", "randomized SVD, 5 QPiSSA rounds, absmax scales", False),
    ("randomized SVD, 5 rounds", "randomized SVD, 5 QPiSSA rounds (`--refine-rounds 5`)", True),
)


@table("fidelity", "fidelity")
def _fidelity(j):
    results = j["fidelity"]["results"]
    rows = []
    for key, label, highlighted in _FIDELITY_ROWS:
        r = results[key]
        reduction = pct(r["error_reduction"])
        rows.append((bold(label) if highlighted else label, f"{r['mean_rel_error']:.4f}",
                     bold(reduction) if highlighted else reduction, f"{r['kl_from_fp32']:.4f}",
                     f"{r['kl_ratio_vs_plain_nf4']:.2f}"))
    return md_table(("residual", "mean rel. error", "reduction vs plain NF4", "KL from fp32", "KL / plain NF4's"), rows)


@table("prepare", "prepare")
def _prepare(j):
    p = j["prepare"]
    ours, peft = p["summary"]["qosora"], p["summary"]["peft"]
    rows = [
        (f"wall time (median of {p['repeats']}: {ours['seconds_median']:.1f} s vs {peft['seconds_median']:.1f} s)",
         bold(f"{p['time_ratio_qosora_over_peft']:.2f}")),
        (f"peak RSS, whole route ({mib(ours['peak_rss_bytes_median'])} vs {mib(peft['peak_rss_bytes_median'])})",
         bold(f"{p['rss_ratio_qosora_over_peft']:.2f}")),
        (f"output on disk ({mib(ours['output_bytes'])} vs {mib(peft['output_bytes'])})",
         f"{ours['output_bytes'] / peft['output_bytes']:.2f}"),
    ]
    return md_table(("", "qosora / PEFT"), rows)


_STREAMING_ROWS = (  # (streaming.json step, label)
    ("prepare", "`qosora prepare --rank 64` (searched NF4 scales)"),
    ("merge", "`qosora merge --dtype bfloat16`"),
    ("export_int4", "`qosora export --format int4 --no-check` (default CPU form, `asym`)"),
)


@table("streaming", "streaming")
def _streaming(j):
    s = j["streaming"]
    rows = [(label, f"{s[k]['seconds']:.0f}", mib(s[k]["peak_rss_bytes"]), bold(f"{s[k]['rss_over_fp32']:.2f}"))
            for k, label in _STREAMING_ROWS]
    return md_table(("command", "wall s", "peak RSS", "RSS / fp32 size"), rows)


@table("rehearsal_7b", "rehearsal_7b")
def _rehearsal_7b(j):
    r = j["rehearsal_7b"]
    steps, checks, settings = r["steps"], r["checks"], r["settings"]

    def row(step: str, label: str, target: str = "") -> tuple:
        peak = steps[step]["peak_rss_bytes"]
        return label, seconds(steps[step]["seconds"]), gib(peak), f"{peak / r['checkpoint_bf16_bytes']:.2f}", target

    prepare_check = checks["prepare_peak_le_0.35x_checkpoint_plus_2gib"]
    export_check = checks["export_peak_le_0.5x_checkpoint"]
    train_check = checks["train_peak_within_15pct_of_plan"]
    train_vs_plan = f"within 15 % of the plan: {bold(times(r['training_peak']['measured_over_planned']))}"
    generate = steps["generate"]["result"]
    rows = [
        row("prepare", f"`prepare --rank {settings['rank']}`",
            f"<= 0.35x + 2 GiB ({prepare_check['limit_gib']:.2f} GiB): {verdict(prepare_check['ok'])}"),
        ("`plan --device cpu` (the train step's settings)", seconds(steps["plan"]["seconds"]), "", "",
         f"planned {gib(steps['plan']['result']['total_bytes'])}"),
        row("train", f"`train` {settings['steps']} steps, seq {settings['seq_len']}, batch 1, gradient checkpointing, "
                     "chunked CE, packed", train_vs_plan if train_check["ok"] else f"{train_vs_plan}, **not met**"),
        row("merge", "`merge --dtype bfloat16`"),
        row("export", "`export --format int4` (CPU form, `asym`, no parity check)",
            f"<= 0.5x ({export_check['limit_gib']:.2f} GiB): {verdict(export_check['ok'])}"),
        row("export_cuda", "`export --format int4 --device cuda` (`hqq`, float16)"),
        row("generate", f"`generate`, {generate['new_tokens']} tokens from the int4 export",
            f"({generate['decode_tokens_per_s']:.1f} tok/s decode)"),
    ]
    return md_table(("step", "wall", "peak RSS", "peak RSS / bf16 checkpoint", "target"), rows)


_TRAIN_ROWS = (  # (train.json config, label, highlighted)
    ("sorsa", "qosora SORSA (with its orthonormal regularizer)", True),
    ("osora", "qosora OSoRA", True),
    ("sorsa_full_logits", "qosora SORSA, full-logits loss", False),  # memory only: the chunked loss's saving
)


@table("train", "train")
def _train(j):
    rows = []
    for key, label, highlighted in _TRAIN_ROWS:
        r = j["train"][key]
        time_ratio = "-" if r["time_ratio_vs_peft"] is None else f"{r['time_ratio_vs_peft']:.2f}"
        rss_ratio = f"{r['rss_ratio_vs_peft']:.2f}"
        rows.append((label, *((bold(time_ratio), bold(rss_ratio)) if highlighted else (time_ratio, rss_ratio))))
    return md_table(("config", "s/step / PEFT QLoRA", "peak RSS / PEFT QLoRA"), rows)


@table("planner", "train", "rehearsal_7b")
def _planner(j):
    smol = j["train"]["plan_sorsa"]
    big = j["rehearsal_7b"]["training_peak"]
    rows = [
        ("SmolLM2 SORSA step on this CPU (`--device cpu`)", mib(smol["predicted_bytes"]),
         mib(smol["measured_bytes"]), f"{smol['predicted_bytes'] / smol['measured_bytes']:.2f}"),
        ("Llama-2-7B shape, SORSA r128, seq 512, CPU (the rehearsal above)", gib(big["planned_bytes"]),
         gib(big["measured_bytes"]), f"{big['planned_bytes'] / big['measured_bytes']:.2f}"),
    ]
    return md_table(("prediction", "planned", "measured", "planned / measured"), rows)


_FINETUNE_METHODS = {"sorsa": "SORSA", "osora": "OSoRA", "pissa": "PiSSA"}


@table("finetune", "finetune")
def _finetune(j):
    rows = [(_FINETUNE_METHODS[r["method"]], _short_exp(r["lr"]), f"{r['initial_eval_loss']:.3f}",
             f"{r['final_eval_loss']:.3f}", f"{100 * (r['final_eval_loss'] / r['initial_eval_loss'] - 1):+.0f} %")
            for r in j["finetune"]["runs"]]
    return md_table(("method", "lr", "held-out loss before", "after", "change"), rows)


def _short_exp(x: float) -> str:
    """0.0001 -> '1e-4' (Python writes '1e-04')."""
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.0e}")


def _decode_cell(decode: dict, threads: int, prompt_len: int, batch_size: int) -> dict:
    return next(s for s in decode["summary"]
                if (s["threads"], s["prompt_len"], s["batch_size"]) == (threads, prompt_len, batch_size))


@table("decode", "decode")
def _decode(j):
    rows = []
    for s in j["decode"]["summary"]:
        ours, anchor = s["medians"]["qosora on ours"], s["medians"]["genai on builder"]
        prefill = f"{s['prefill_vs_anchor']['qosora on ours']:.2f}"
        if s["batch_size"] == 1:
            prefill = bold(prefill) if s["prompt_len"] == 512 else prefill  # the README's headline cell
            prefill += f" ({ours['prefill_ms']:.0f} / {anchor['prefill_ms']:.0f} ms)"
        rows.append((s["threads"], s["prompt_len"], s["batch_size"], f"{s['decode_vs_anchor']['qosora on ours']:.2f}x",
                     f"{anchor['decode_tps']:.1f}", f"{s['decode_vs_anchor']['genai on ours']:.2f}x", prefill))
    return md_table(("threads", "prompt", "batch", "`qosora generate` on our graph", "anchor tok/s",
                     "onnxruntime-genai on our graph", "prefill, ours / anchor"), rows)


# The Export section: bench_export.py as it was before issue #11 renamed its rows (`int4` was the `hqq` graph).
_EXPORT_RUNS = ("export", "export_bs64", "export_rotated", "export_rotated_bs64")
_NOT_INT4 = ("fp32", "nf4")
_EXPORT_PPL_ROWS = (  # (label, bench_export.py rows shown in one cell)
    ("ours `hqq` (the `--device cuda` default)", ("int4-linears",)),
    ("ours `asym-ls-float`", ("int4-linears-asym-ls-float",)),
    ("ours `asym-ls`", ("int4-linears-asym-ls",)),
    ("ours `asym` (min/max, integer zero point)", ("int4-linears-asym",)),
    ("ours `sym` (absmax / 7) / `sym-search`", ("int4-linears-sym7", "int4-linears-sym-search")),
    ("onnxruntime RTN symmetric (absmax / 8)", ("ort-rtn-sym",)),
    ("onnxruntime RTN asymmetric", ("ort-rtn-asym",)),
    ("onnxruntime HQQ (the best of onnxruntime's)", ("ort-hqq",)),
    ("**ours `--keep-principal`** (`hqq` residual + rank-64 branch)", ("int4-keep-principal",)),
    ("ours `--keep-principal --int4-scheme asym`", ("int4-keep-principal-asym",)),
    ("`hqq` export, lm_head and embedding int4 too (the default before issue #11)", ("int4",)),
    ("ours fp32 / nf4 (MatMulBnb4 + rank-64 branch)", _NOT_INT4),
    ("ours trt-int4 (symmetric absmax / 7, default ONNX ops only)", ("trt-int4",)),
)


def _export_run(j: dict, stem: str) -> dict:
    """bench/<stem>.json as these tables read it; a run of today's bench_export.py is refused, not misread."""
    if "int4-hqq" in j[stem]["exports"]:
        raise TableError(f"bench/{stem}.json has bench_export.py's rows of issue #11 on (`int4` is the `asym` graph "
                         "now): update the Export tables in tools/bench_tables.py")
    return j[stem]


def _increase(run: dict, row: str) -> float:
    return run["perplexity"]["increase"][row]


def _ppl_cell(run: dict, keys: tuple[str, ...], lowest: float) -> str:
    return " / ".join(bold(signed(x)) if x == lowest else signed(x) for x in (_increase(run, k) for k in keys))


@table("export_perplexity", *_EXPORT_RUNS)
def _export_perplexity(j):
    """Each column's lowest int4 increase in bold."""
    runs = [_export_run(j, stem) for stem in _EXPORT_RUNS]
    int4 = [k for _, keys in _EXPORT_PPL_ROWS for k in keys if k not in _NOT_INT4]
    lowest = [min(_increase(run, k) for k in int4) for run in runs]
    rows = [(label, *(_ppl_cell(run, keys, low) for run, low in zip(runs, lowest))) for label, keys in _EXPORT_PPL_ROWS]
    return md_table(("linears only, perplexity increase over PyTorch", "fixture, block 32", "fixture, block 64",
                     "rotated, block 32", "rotated, block 64"), rows)


_EXPORT_SPEED_ROWS = (  # (bench_export.py row, label)
    ("fp32", "ours fp32"),
    ("int4", "ours int4 `hqq` (fused q/k/v + gate/up, GroupQueryAttention, int4 head and embedding)"),
    ("int4-standard-attn", "same with `--attention standard`"),
    ("int4-asym", "ours int4 `--int4-scheme asym` (no block-offset term)"),
    ("int4-acc4", "ours int4 `--accuracy-level 4` (int8 activations)"),
    ("int4-keep-principal", "ours int4 `--keep-principal` (linears only)"),
    ("ort-rtn-asym", "onnxruntime RTN asymmetric int4 (linears only)"),
    ("ort-hqq", "onnxruntime HQQ int4 (float zero points in MatMulNBits)"),
    ("trt-int4", "ours trt-int4, run by onnxruntime (it re-fuses DequantizeLinear + MatMul)"),
    ("nf4", "ours nf4"),
)


@table("export_speed", "export")
def _export_speed(j):
    speed = _export_run(j, "export")["speed"]
    one, two = speed["1"], speed["2"]
    rows = []
    for key, label in _EXPORT_SPEED_ROWS:
        ratios = [f"{s[key]['decode_vs_fp32']:.2f}" for s in (one, two)]
        if key == "fp32":  # the anchor: its tok/s
            ratios = [f"{r} ({s[key]['decode_tps']:.1f} tok/s)" for r, s in zip(ratios, (one, two))]
        rows.append((label, *ratios, f"{two[key]['prefill_ms']:.0f} ms"))
    return md_table(("graph", "1 thread", "2 threads", "prefill 64 tokens, 2 threads"), rows)


def _optimum_routes(anchor: dict) -> dict[str, tuple[float, float]]:
    """bench_export.py --optimum-python: {onnxruntime quantizer: (optimum export + quantizer s, peak RSS MiB)}."""
    return {kind: (anchor[f"optimum_plus_{kind}_s"], max(anchor["optimum_peak_rss_mb"],
                                                         anchor[f"ort_{kind}_peak_rss_mb"]))
            for kind in ("rtn-asym", "hqq")}


@table("export_cost", "export")
def _export_cost(j):
    """The optimum anchor rows only where the run had --optimum-python."""
    run = _export_run(j, "export")
    ex, checkpoint_mib = run["exports"], run["fp32_checkpoint_mb"]
    ours = ex["int4"]
    rows, wall = [], f"{ours['wall_s']:.1f}"
    if "optimum_anchor" in run:
        anchor = run["optimum_anchor"]
        routes = _optimum_routes(anchor)
        (rtn_s, rtn_mib), (hqq_s, hqq_mib) = routes["rtn-asym"], routes["hqq"]
        rtn_parts = f"({anchor['optimum_export_s']:.1f} + {anchor['ort_rtn-asym_s']:.1f})"
        rows += [
            ("optimum export + onnxruntime RTN-asym int4 (anchor)", f"{rtn_s:.1f} {rtn_parts}", f"{rtn_mib:.0f} MiB"),
            ("optimum export + onnxruntime HQQ int4", f"{hqq_s:.1f}", f"{hqq_mib:.0f} MiB"),
        ]
        wall += f" ({times(ours['wall_s'] / rtn_s)} the RTN route, {times(ours['wall_s'] / hqq_s)} HQQ's)"
    peak = (f"{ours['peak_rss_mb']:.0f} MiB ({times(ours['peak_rss_mb'] / checkpoint_mib)} the "
            f"{checkpoint_mib:.0f} MiB fp32 checkpoint)")
    others = ("fp32", "nf4", "trt-int4")
    rows += [
        (bold("ours int4 (default)"), bold(wall), bold(peak)),
        ("ours int4 `asym`", f"{ex['int4-asym']['wall_s']:.1f}", f"{ex['int4-asym']['peak_rss_mb']:.0f} MiB"),
        ("ours fp32 / nf4 / trt-int4", " / ".join(f"{ex[k]['wall_s']:.1f}" for k in others),
         " / ".join(f"{ex[k]['peak_rss_mb']:.0f}" for k in others) + " MiB"),
    ]
    return md_table(("", "wall s", "peak RSS"), rows)


_QUALITY_RUNS = ("export_calibrated", "export_calibrated_bs64", "export_calibrated_rotated",
                 "export_calibrated_rotated_bs64")
_QUALITY_COLUMNS = ("fixture, block 32", "fixture, block 64", "rotated, block 32", "rotated, block 64")
_LINEAR_ROWS = (  # (label, bench_export.py row): lm_head and embedding dense, as onnxruntime's quantizers leave them
    ("onnxruntime RTN symmetric", "ort-rtn-sym"),
    ("onnxruntime RTN asymmetric", "ort-rtn-asym"),
    ("onnxruntime HQQ", "ort-hqq"),
    ("onnxruntime k-quant", "ort-k-quant"),
    ("onnxruntime GPTQ (the same calibration windows)", "ort-gptq"),
    ("ours `asym`", "int4-linears-asym"),
    ("ours `hqq`", "int4-linears"),
    ("ours `asym-ls-float`", "int4-linears-asym-ls-float"),
    ("ours `--keep-principal` (`hqq` residual + rank-64 branch)", "int4-keep-principal"),
    ("ours `asym --calibrate`", "int4-linears-asym-gptq"),
    ("ours `hqq --calibrate`", "int4-linears-hqq-gptq"),
    ("ours `asym-ls-float --calibrate`", "int4-linears-asym-ls-float-gptq"),
)
_GRAPH_ROWS = (  # (label, data-free row, calibrated row): whole graphs as `qosora export` writes them
    ("int4, the CPU default (`asym`; lm_head and embedding int4)", "int4", "int4-gptq"),
    ("int4 `hqq` (the `--device cuda` scheme)", "int4-hqq", "int4-hqq-gptq"),
    ("trt-int4 `sym` (absmax / 7; lm_head int4; the default before this run)", "trt-int4", "trt-int4-gptq"),
    ("trt-int4 `sym-search` (the trt-int4 default)", "trt-int4-sym-search", "trt-int4-sym-search-gptq"),
    ("trt-int4 `--keep-principal` (residual int4 + float rank-64 branch)", "trt-int4-keep-principal",
     "trt-int4-keep-principal-gptq"),
    ("trt-int4, lm_head dense (`--no-quantize-lm-head`)", "trt-int4-linears", "trt-int4-linears-gptq"),
)


def _measured(run: dict, rows) -> list[str]:
    """The rows a run has (onnxruntime's GPTQ is measured in the first column only)."""
    return [k for k in rows if k in run["perplexity"]["increase"]]


def _ours_calibrated_lowest(run: dict) -> bool:
    """Our best calibrated linears-only int4 is below every other linears-only int4 row of the run."""
    rows = _measured(run, [k for _, k in _LINEAR_ROWS])
    ours = [k for k in rows if k.startswith("int4-linears-") and k.endswith("-gptq")]
    return min(_increase(run, k) for k in ours) < min(_increase(run, k) for k in rows if k not in ours)


def _ppl_or_dash(run: dict, key: str, lowest: float) -> str:
    if "failed" in run["exports"].get(key, {}):
        return "fails (onnxruntime error)"
    if key not in run["perplexity"]["increase"]:
        return "(not run)"
    x = _increase(run, key)
    return bold(signed(x)) if x == lowest else signed(x)


def _columns(j: dict, cell: Callable[[dict], str]) -> list[str]:
    """One cell per quality column; a column not measured yet says so."""
    return [cell(j[stem]) if j[stem] is not None else "(not run yet)" for stem in _QUALITY_RUNS]


@table("export_quality", *_QUALITY_RUNS, optional=_QUALITY_RUNS[1:])
def _export_quality(j):
    """Linears-only int4 against onnxruntime's quantizers; each column's lowest in bold."""
    def lowest(run):
        return min(_increase(run, k) for k in _measured(run, [k for _, k in _LINEAR_ROWS]))
    rows = [(label, *_columns(j, lambda run: _ppl_or_dash(run, k, lowest(run)))) for label, k in _LINEAR_ROWS]
    rows.append(("our calibrated int4 the lowest", *_columns(j, lambda run: verdict(_ours_calibrated_lowest(run)))))
    return md_table(("linears only, perplexity increase over PyTorch", *_QUALITY_COLUMNS), rows)


@table("export_graphs", *_QUALITY_RUNS, optional=_QUALITY_RUNS[1:])
def _export_graphs(j):
    """Whole graphs, data-free -> --calibrate, against onnxruntime's RTN asymmetric (linears only: an easier bar)."""
    rows = [(label, *_columns(j, lambda run: f"{signed(_increase(run, free))} -> {signed(_increase(run, cal))}"))
            for label, free, cal in _GRAPH_ROWS]
    rows.append(("onnxruntime RTN asymmetric, lm_head dense (the bar)",
                 *_columns(j, lambda run: signed(_increase(run, "ort-rtn-asym")))))
    rows.append(("calibrated trt-int4 `sym` no worse than the bar", *_columns(
        j, lambda run: verdict(_increase(run, "trt-int4-gptq") <= _increase(run, "ort-rtn-asym")))))
    return md_table(("perplexity increase, data-free -> `--calibrate`", *_QUALITY_COLUMNS), rows)


_COST_ROWS = (  # (label, bench_export.py row)
    ("ours int4 (CPU default)", "int4"),
    ("ours int4 `--calibrate`", "int4-gptq"),
    ("ours int4 `hqq --calibrate`", "int4-hqq-gptq"),
    ("ours trt-int4", "trt-int4"),
    ("ours trt-int4 `--calibrate`", "trt-int4-gptq"),
    ("ours trt-int4 `--keep-principal --calibrate`", "trt-int4-keep-principal-gptq"),
    ("ours fp32 (what onnxruntime's quantizers start from)", "fp32"),
    ("onnxruntime RTN asymmetric on it", "ort-rtn-asym"),
    ("onnxruntime HQQ on it", "ort-hqq"),
    ("onnxruntime k-quant on it", "ort-k-quant"),
    ("onnxruntime GPTQ on it (the same windows)", "ort-gptq"),
)


@table("export_quality_cost", "export_calibrated")
def _export_quality_cost(j):
    run = j["export_calibrated"]
    ex = run["exports"]
    rows = [(label, seconds(ex[k]["wall_s"]), f"{ex[k]['peak_rss_mb']:.0f} MiB", f"{ex[k]['onnx_mb']:.1f} MB",
             signed(_increase(run, k))) for label, k in _COST_ROWS]
    return md_table(("fixture, block 32", "wall", "peak RSS", "model.onnx + data", "perplexity increase"), rows)


@table("reproduce_methods", "reproduce")
def _reproduce_methods(j):
    """tools/reproduce.py's study: its own report module renders it (also for `reproduce.py --report`)."""
    from _reproduce_report import method_table

    return method_table(j["reproduce"])


@table("reproduce_variants", "reproduce")
def _reproduce_variants(j):
    from _reproduce_report import variants_table

    return variants_table(j["reproduce"])


# ---------------------------------------------------------------------------------------------------------------
# README.md


@table("headline", "prepare", "fidelity", "train", "export", "export_bs64", "export_rotated", "export_rotated_bs64",
       "decode", "rehearsal_7b", "export_calibrated", "export_calibrated_rotated")
def _headline(j):
    """One entry a row, (what, measured, anchor): a new headline is one more entry. None (no data) is left out."""
    prep, fid, train, dec, big = j["prepare"], j["fidelity"]["results"], j["train"], j["decode"], j["rehearsal_7b"]
    ex32, ex64, rot32, rot64 = (_export_run(j, stem) for stem in _EXPORT_RUNS)
    cal, cal_rot = j["export_calibrated"], j["export_calibrated_rotated"]
    big_ratio = {step: big["steps"][step]["peak_rss_bytes"] / big["checkpoint_bf16_bytes"]
                 for step in ("prepare", "train", "export")}
    rows = [
        ("`qosora prepare` rank 64, time / peak RSS",
         f"{times(prep['time_ratio_qosora_over_peft'])} / {times(prep['rss_ratio_qosora_over_peft'])}",
         "PEFT's PiSSA route (fp32 load, `pissa_niter_4`, 4-bit reload)"),
        ("error below plain NF4, 1 / 5 rounds",
         f"{pct(fid['randomized SVD, 1 round']['error_reduction'])} / "
         f"{pct(fid['randomized SVD, 5 rounds']['error_reduction'])}",
         "bitsandbytes NF4 of the same weights (QLoRA's base)"),
        ("training step, SORSA / OSoRA, s/step",
         f"{times(train['sorsa']['time_ratio_vs_peft'])} / {times(train['osora']['time_ratio_vs_peft'])}",
         "PEFT QLoRA r16"),
        _headline_export_cost(ex32),
        ("int4 perplexity increase, linears, block 32 / 64",
         f"{signed(_increase(ex32, 'int4-linears'))} / {signed(_increase(ex64, 'int4-linears'))}",
         f"onnxruntime's best (HQQ) {signed(_increase(ex32, 'ort-hqq'))} / {signed(_increase(ex64, 'ort-hqq'))}"),
        ("same, `--keep-principal`",
         f"{signed(_increase(ex32, 'int4-keep-principal'))} / {bold(signed(_increase(ex64, 'int4-keep-principal')))}",
         f"on the rotated copy (no Q4_1 grid): {signed(_increase(rot32, 'int4-keep-principal'))} / "
         f"{signed(_increase(rot64, 'int4-keep-principal'))} vs onnxruntime HQQ {signed(_increase(rot32, 'ort-hqq'))}"
         f" / {signed(_increase(rot64, 'ort-hqq'))}"),
        ("`export --calibrate` (GPTQ), default int4 graph, fixture / rotated copy",
         f"{signed(_increase(cal, 'int4-gptq'))} / {signed(_increase(cal_rot, 'int4-gptq'))} "
         f"(data-free {signed(_increase(cal, 'int4'))} / {signed(_increase(cal_rot, 'int4'))})",
         f"onnxruntime GPTQ, lm_head dense {signed(_increase(cal, 'ort-gptq'))} (fixture)"),
        ("`export --format trt-int4 --calibrate` (`sym-search`, standard ONNX ops), fixture / rotated",
         f"{signed(_increase(cal, 'trt-int4-sym-search-gptq'))} / "
         f"{signed(_increase(cal_rot, 'trt-int4-sym-search-gptq'))}",
         f"onnxruntime RTN asymmetric, lm_head dense {signed(_increase(cal, 'ort-rtn-asym'))} / "
         f"{signed(_increase(cal_rot, 'ort-rtn-asym'))}"),
        ("`qosora generate` int4 decode, 1 / 2 threads, batch 1",
         f"{_decode_range(dec, threads=1, batch_size=1)} / {_decode_range(dec, threads=2, batch_size=1)}",
         "onnxruntime-genai's Generator on its builder's int4 graph, AVX-512 CPU"),
        ("prefill of 512 tokens / int4 perplexity increase",
         f"{times(_decode_cell(dec, 1, 512, 1)['prefill_vs_anchor']['qosora on ours'])} the time / "
         f"{dec['perplexity']['increase']['ours']:+.2f}",
         f"same anchor / {dec['perplexity']['increase']['builder']:+.2f}"),
        ("Llama-2-7B shape on this CPU: prepare, train, export peak RSS",
         " / ".join(times(x) for x in big_ratio.values()) + " the bf16 checkpoint",
         f"training peak {times(big['training_peak']['measured_over_planned'])} `qosora plan`"),
        ("nf4 export greedy agreement, 64 tokens x 5 prompts",
         f"{ex32['greedy_64']['nf4']['greedy_agree_tokens']} / {ex32['greedy_64']['nf4']['greedy_total_tokens']}",
         "PyTorch model of the same directory"),
    ]
    return md_table(("what", "measured", "anchor, same run"), [r for r in rows if r is not None])


def _headline_export_cost(run: dict) -> tuple | None:
    """Time and peak RSS of our int4 export against optimum's route, where the run measured it."""
    if "optimum_anchor" not in run:
        return None
    rtn_s, rtn_mib = _optimum_routes(run["optimum_anchor"])["rtn-asym"]
    ours = run["exports"]["int4"]
    return ("`qosora export` int4, time / peak RSS", f"{times(ours['wall_s'] / rtn_s)} / "
            f"{times(ours['peak_rss_mb'] / rtn_mib)}", "optimum-onnx export + onnxruntime int4 quantizer")


def _decode_range(decode: dict, threads: int, batch_size: int) -> str:
    """Our decode speed over the anchor's, lowest-highest over prompt lengths: '0.95-1.01x'."""
    ratios = [s["decode_vs_anchor"]["qosora on ours"] for s in decode["summary"]
              if (s["threads"], s["batch_size"]) == (threads, batch_size)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


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
