"""`export_onnx`: merged + requantized ONNX decoder with a KV cache, written atomically, checked against PyTorch.

    export_onnx("run/", "out/", format="int4")  ->  out/
        model.onnx, model.onnx.data          the decoder (weights in the external data file)
        tokenizer files, generation_config.json, config.json, qosora_config.json (when the source has one)
        genai_config.json                    for onnxruntime-genai
        export_report.json                   options, per-layer requantization error, parity, timings, peak RSS

The directory is built under a hidden temporary name next to `out/` and renamed into place only when everything,
the parity check included, has succeeded: an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from qosora.errors import QosoraError
from qosora.export.genai import genai_config, tensorrt_shape_profile
from qosora.export.graph import DATA_FILE, build_decoder_graph
from qosora.export.options import ExportOptions, Format
from qosora.export.source import WeightSource, open_source
from qosora.export.tokenizer import make_portable

REPORT_NAME = "export_report.json"


def export_onnx(src: str | Path | WeightSource, out_dir: str | Path, format: Format = "int4", *,
                options: ExportOptions | None = None, check: bool = True, check_new_tokens: int = 16,
                reference_model=None, overwrite: bool = False, progress: bool = False,
                trt_max_batch: int = 1, trt_max_context: int = 4096) -> dict:
    """Export `src` (a prepared/trained qosora directory, a Hugging Face directory, or a WeightSource) to `out_dir`.

    `options` carries every format option (block size, int4 scheme, --keep-principal, ...); `format` is a shortcut
    when the defaults suffice. `reference_model` is the PyTorch model to check against; by default it is loaded from
    `src` (qosora.load for a qosora directory, transformers for a HF directory). Returns the report dict.
    """
    from qosora.files import SIDE_FILES, atomic_directory, copy_side_files
    from qosora.config import CONFIG_NAME

    t0 = time.perf_counter()
    opts = (options or ExportOptions(format=format)).validate()
    source = open_source(src) if isinstance(src, (str, Path)) else src
    src_dir = source.directory
    bar = _progress_bar(progress)

    calibration, hessians = None, None
    if opts.calibrate is not None:
        if reference_model is None:
            reference_model = load_reference_model(src_dir)
        calibration, hessians = _calibration(opts, src_dir, reference_model)
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[src_dir] if src_dir else []) as tmp:
        built = build_decoder_graph(source, opts, tmp, progress=bar, hessians=hessians)
        t_build = time.perf_counter() - t0
        if src_dir is not None:
            copy_side_files(src_dir, tmp, SIDE_FILES + (CONFIG_NAME,))
            make_portable(tmp)
        if not (tmp / "config.json").is_file():
            (tmp / "config.json").write_text(json.dumps(source.hf_config, indent=2, default=str))
        gen_cfg = json.loads((tmp / "generation_config.json").read_text()) if (tmp / "generation_config.json").is_file() else {}
        context = min(built.spec.max_position_embeddings, trt_max_context)
        (tmp / "genai_config.json").write_text(json.dumps(
            genai_config(built.spec, source.hf_config, gen_cfg, built.spec.max_position_embeddings, opts.attention,
                         opts.device), indent=2))

        errors = [e["rel_error"] for k, e in built.layer_errors.items() if k not in ("model.embed_tokens", "lm_head")]
        report = {
            "format": opts.format,
            "options": opts.to_json(),
            "source": str(src_dir) if src_dir else None,
            "source_kind": type(source).__name__,
            "model_type": built.spec.model_type,
            "graph": {
                "file": built.model_path.name,
                "domains": built.domains,
                "op_counts": built.op_counts,
                "initializer_bytes": built.bytes_by_kind,
                "onnx_bytes": built.model_path.stat().st_size + (tmp / DATA_FILE).stat().st_size,
                "dtype": opts.dtype,
            },
            "requantization": {
                "mean_rel_error": float(np.mean(errors)) if errors else 0.0,
                "max_rel_error": float(np.max(errors)) if errors else 0.0,
                "layers": built.layer_errors,
            },
            "timing_s": {"build": round(t_build, 3)},
        }
        if calibration is not None:  # the StreamStats of the run, complete once the graph is built
            report["calibration"] = {
                "file": calibration.file, "samples": opts.calibration_samples, "seq_len": opts.calibration_seq_len,
                "seed": opts.calibration_seed, "tokens": calibration.tokens, "method": "gptq",
                "peak_held_layers": calibration.peak_held_layers, "layers": calibration.layers}
        if opts.format == "trt-int4":
            report["tensorrt"] = tensorrt_shape_profile(built.spec, trt_max_batch, context)
        if check:
            from qosora.export.check import failed_parity, parity_check, prompt_token_ids

            t1 = time.perf_counter()
            model = reference_model if reference_model is not None else load_reference_model(src_dir)
            ids = prompt_token_ids(src_dir, vocab_size=built.spec.vocab_size)
            report["parity"] = parity_check(tmp, model, ids, new_tokens=check_new_tokens)
            reason = failed_parity(report["parity"]["summary"], opts.format)
            if reason is not None:
                raise QosoraError(f"the exported {opts.format} graph does not compute the model: {reason}; nothing was "
                                  "written (--no-check keeps the graph anyway, for debugging)")
            report["timing_s"]["check"] = round(time.perf_counter() - t1, 3)
        report["timing_s"]["total"] = round(time.perf_counter() - t0, 3)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    report["out_dir"] = str(Path(out_dir))
    return report


def _calibration(opts: ExportOptions, src_dir: Path | None, model):
    """The calibration windows and the streamed per-layer input Hessians of `model` on them (GPTQ's statistics),
    consumed in layer order by the graph builder."""
    if src_dir is None:
        raise QosoraError("--calibrate needs a source directory with a tokenizer (pass a directory, not a WeightSource)")
    from qosora.export.calibration import (LayerHessians, StreamStats, calibration_file, load_calibration_tokens,
                                           stream_hessians)
    from qosora.loading import load_tokenizer

    path = calibration_file(opts.calibrate, src_dir)
    tokens = load_calibration_tokens(path, load_tokenizer(src_dir), opts.calibration_samples,
                                     opts.calibration_seq_len, opts.calibration_seed)
    stats = StreamStats(file=str(path))  # filled in as the graph builder pulls the stream
    return stats, LayerHessians(stream_hessians(model, tokens, stats=stats))


def load_reference_model(src_dir: Path | None):
    """The PyTorch model an export is checked against: the trained function (qosora.load) or the HF model."""
    if src_dir is None:
        raise QosoraError("the parity check needs a reference model: pass reference_model= or check=False")
    import torch

    if (src_dir / "qosora_config.json").is_file():
        import qosora

        # fp32 compute: the exact stored function (bf16 factors upcast), so parity measures the export alone.
        return qosora.load(src_dir, dtype=torch.float32, compute_dtype=torch.float32).eval()
    from qosora.loading import load_hf

    return load_hf(src_dir, dtype=torch.float32).eval()


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    state = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc="export layers", unit="layer", file=sys.stderr)
        state["bar"].update(done - state["bar"].n)
        if done == total:
            state["bar"].close()

    return update
