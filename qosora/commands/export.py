"""qosora export DIR --onnx OUT [--format int4|nf4|fp16|fp32|trt-int4] [--no-check] [--json]

The export options (`--format`, `--block-size`, ...) are `qosora.export.options.ExportOptions`'s fields; importing
them loads no onnx, so `--help` stays fast."""

from __future__ import annotations

from qosora.commands._common import add_output_flags, add_verb, print_json
from qosora.export.options import ExportOptions
from qosora.options import add_arguments, from_args


def add_parser(sub) -> None:
    p = add_verb(
        sub, "export",
        "Merge, requantize and build an ONNX decoder with a KV cache; check it against PyTorch.",
        "qosora export run/ --onnx out/ --format int4 --block-size 32", run,
    )
    p.add_argument("directory", help="trained/prepared qosora directory, or a plain Hugging Face model directory")
    add_arguments(p.add_argument_group("export options"), ExportOptions)
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared per prompt (default 16)")
    p.add_argument("--trt-max-batch", type=int, default=1)
    p.add_argument("--trt-max-context", type=int, default=4096)
    add_output_flags(p, "--onnx", what="ONNX output directory")


def run(args) -> int:
    from qosora.export.api import export_onnx
    from qosora.errors import QosoraError
    from qosora.export.check import format_table

    for flag, value, low in (("--check-tokens", args.check_tokens, 0), ("--trt-max-batch", args.trt_max_batch, 1),
                             ("--trt-max-context", args.trt_max_context, 1)):
        if value < low:
            raise QosoraError(f"{flag} must be >= {low}, got {value}")
    opts = from_args(ExportOptions, args)
    report = export_onnx(args.directory, args.onnx, options=opts, check=not args.no_check,
                         check_new_tokens=args.check_tokens, overwrite=args.overwrite, progress=not args.json,
                         trt_max_batch=args.trt_max_batch, trt_max_context=args.trt_max_context)
    if args.json:
        print_json(report)
        return 0
    q = report["requantization"]
    print(f"exported {args.directory} -> {report['out_dir']} ({report['format']}, "
          f"{report['graph']['onnx_bytes'] / 2**20:.1f} MiB, {report['timing_s']['total']:.1f} s, "
          f"peak RSS {report['peak_rss_mb']:.0f} MB)")
    print(f"  requantization error (rel. Frobenius, linears): mean {q['mean_rel_error']:.4f}  max {q['max_rel_error']:.4f}")
    if "parity" in report:
        print("  parity vs PyTorch:")
        print(format_table(report["parity"]["summary"]))
    if "tensorrt" in report:
        print(f"  TensorRT shapes: trtexec --onnx={report['out_dir']}/model.onnx {report['tensorrt']['trtexec']}")
    if _calibration_would_help(args.directory, opts):
        print("  hint: this run directory records its training data; `--calibrate train` quantizes with it (GPTQ): "
              "on SmolLM2 ~10x the export time for a perplexity increase about a third of this one (BENCHMARKS.md)")
    return 0


def _calibration_would_help(directory: str, opts: ExportOptions) -> bool:
    """An uncalibrated int4 / trt-int4 export of a `qosora train` run directory whose recorded data is at hand."""
    from pathlib import Path

    from qosora.errors import QosoraError
    from qosora.export.calibration import TRAINING_DATA, calibration_file
    from qosora.export.options import INT4_FORMATS

    if opts.calibrate is not None or opts.format not in INT4_FORMATS:
        return False
    try:
        return calibration_file(TRAINING_DATA, Path(directory)).is_file()
    except QosoraError:  # no record, or the recorded file is gone
        return False
