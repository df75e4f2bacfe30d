"""The tables of BENCHMARKS.md's export sections: Export quality (issue #13) and Export speed and cost (issue #4)."""

from __future__ import annotations

from collections.abc import Callable

from .core import TableError, bold, md_table, seconds, signed, table, times, verdict


# The Export section's speed and cost: bench/export.json, a run of bench_export.py from before issue #11 renamed its
# rows (`int4` was the `hqq` graph then). Its perplexities moved to the Export quality tables (today's rows).
def _export_run(j: dict, stem: str) -> dict:
    """bench/<stem>.json as these tables read it; a run of today's bench_export.py is refused, not misread."""
    if "int4-hqq" in j[stem]["exports"]:
        raise TableError(f"bench/{stem}.json has bench_export.py's rows of issue #11 on (`int4` is the `asym` graph "
                         "now): update the Export tables in tools/_tables/export.py")
    return j[stem]


def _increase(run: dict, row: str) -> float:
    return run["perplexity"]["increase"][row]


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
    ("onnxruntime RTN symmetric (absmax / 8)", "ort-rtn-sym"),
    ("onnxruntime RTN asymmetric", "ort-rtn-asym"),
    ("onnxruntime HQQ", "ort-hqq"),
    ("onnxruntime k-quant", "ort-k-quant"),
    ("onnxruntime GPTQ (the same calibration windows)", "ort-gptq"),
    ("ours `sym` (absmax / 7)", "int4-linears-sym7"),
    ("ours `sym-search`", "int4-linears-sym-search"),
    ("ours `asym` (min/max, integer zero point)", "int4-linears-asym"),
    ("ours `asym-ls` (least-squares scale)", "int4-linears-asym-ls"),
    ("ours `asym-ls-float` (and a float zero point)", "int4-linears-asym-ls-float"),
    ("ours `hqq`", "int4-linears"),
    ("ours `--keep-principal` (`hqq` residual + rank-64 branch)", "int4-keep-principal"),
    ("ours `--keep-principal --int4-scheme asym`", "int4-keep-principal-asym"),
    ("ours `asym --calibrate`", "int4-linears-asym-gptq"),
    ("ours `hqq --calibrate`", "int4-linears-hqq-gptq"),
    ("ours `asym-ls-float --calibrate`", "int4-linears-asym-ls-float-gptq"),
    ("ours `--keep-principal --calibrate` (`hqq` residual compensated)", "int4-linears-keep-principal-gptq"),
    ("ours `asym-ls-float --calibrate --calibration-grid static`", "int4-linears-asym-ls-float-static-gptq"),
    ("ours `--keep-principal --calibrate --calibration-grid static`", "int4-linears-keep-principal-static-gptq"),
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


def _ours_calibrated_lowest(run: dict, against: str = "") -> bool:
    """Our best calibrated linears-only int4 is below every other linears-only int4 row of the run whose name starts
    with `against` (all of them by default; "ort-": onnxruntime's)."""
    rows = _measured(run, [k for _, k in _LINEAR_ROWS])
    ours = [k for k in rows if k.startswith("int4-linears-") and k.endswith("-gptq")]
    others = [k for k in rows if k not in ours and k.startswith(against)]
    return min(_increase(run, k) for k in ours) < min(_increase(run, k) for k in others)


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
    rows.append(("our calibrated int4 below every onnxruntime quantizer", *_columns(
        j, lambda run: verdict(_ours_calibrated_lowest(run, against="ort-")))))
    rows.append(("our calibrated int4 the lowest of all rows", *_columns(
        j, lambda run: verdict(_ours_calibrated_lowest(run)))))
    return md_table(("linears only, perplexity increase over PyTorch", *_QUALITY_COLUMNS), rows)


@table("export_graphs", *_QUALITY_RUNS, optional=_QUALITY_RUNS[1:])
def _export_graphs(j):
    """Whole graphs, data-free -> --calibrate, against onnxruntime's RTN asymmetric (linears only: an easier bar)."""
    rows = [(label, *_columns(j, lambda run: f"{signed(_increase(run, free))} -> {signed(_increase(run, cal))}"))
            for label, free, cal in _GRAPH_ROWS]
    rows.append(("fp32 / nf4 (MatMulBnb4 + rank-64 branch), for reference", *_columns(
        j, lambda run: f"{signed(_increase(run, 'fp32'))} / {signed(_increase(run, 'nf4'))}")))
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
    ("ours int4 linears `--keep-principal --calibrate --calibration-grid static`",
     "int4-linears-keep-principal-static-gptq"),
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
