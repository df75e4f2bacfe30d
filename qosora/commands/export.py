"""qosora export DIR --onnx OUT [--format int4|nf4|fp16|fp32|trt-int4] [--no-check] [--json]"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json

FORMATS = ("int4", "nf4", "fp16", "fp32", "trt-int4")  # qosora.export.FORMATS, without importing onnx for --help


def add_parser(sub) -> None:
    p = add_verb(
        sub, "export",
        "Merge, requantize and build an ONNX decoder with a KV cache; check it against PyTorch.",
        "qosora export run/ --onnx out/ --format int4 --block-size 32", run,
    )
    p.add_argument("directory", help="trained/prepared qosora directory, or a plain Hugging Face model directory")
    p.add_argument("--onnx", required=True, metavar="OUT", help="output directory (written atomically)")
    p.add_argument("--format", default="int4", choices=FORMATS,
                   help="int4: MatMulNBits (ORT CPU/CUDA); nf4: the trained NF4 residual + rank-r branch; "
                        "fp16/fp32: dense; trt-int4: standard ONNX only, for TensorRT (default: int4)")
    p.add_argument("--block-size", type=int, default=32, help="int4 block along K (16..256, default 32)")
    p.add_argument("--int4-scheme", default=None, choices=["hqq", "asym", "asym-ls", "asym-ls-float", "sym", "sym-search"],
                   help="hqq: min/max scale, float zero point fitted by half-quadratic optimisation (run as uint8 zero "
                        "point + block offset); asym: min/max + integer zero point (fastest decode); asym-ls / "
                        "asym-ls-float: least-squares scale, integer / float zero point; sym: scale absmax/7; "
                        "sym-search: MSE-searched scale (default: hqq for int4, sym for trt-int4)")
    p.add_argument("--accuracy-level", type=int, default=0,
                   help="MatMulNBits accuracy level: 0 keeps activations float, 4 quantizes them to int8 (faster CPU)")
    p.add_argument("--attention", default=None, choices=["gqa", "standard"],
                   help="gqa: onnxruntime's fused GroupQueryAttention; standard: default-domain ops only "
                        "(default: gqa for int4 and nf4, standard for fp16/fp32/trt-int4)")
    p.add_argument("--io-dtype", default=None, choices=["float32", "float16"],
                   help="activations, KV cache and logits of int4/nf4/trt-int4 graphs (default float32); use float16 "
                        "for onnxruntime-gpu, whose GroupQueryAttention needs it")
    p.add_argument("--keep-principal", action="store_true",
                   help="int4/trt-int4: requantize only the residual, keep the adapter as a float low-rank branch")
    p.add_argument("--no-quantize-lm-head", action="store_true", help="keep lm_head dense in int4 formats")
    p.add_argument("--no-quantize-embedding", action="store_true", help="keep the embedding dense in int4")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--check-tokens", type=int, default=16, help="greedy tokens compared per prompt (default 16)")
    p.add_argument("--trt-max-batch", type=int, default=1)
    p.add_argument("--trt-max-context", type=int, default=4096)
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")


def run(args) -> int:
    from qosora.export import ExportOptions, export_onnx
    from qosora.export.check import format_table

    opts = ExportOptions(
        format=args.format, block_size=args.block_size, int4_scheme=args.int4_scheme,
        accuracy_level=args.accuracy_level, keep_principal=args.keep_principal, attention=args.attention,
        io_dtype=args.io_dtype,
        quantize_lm_head=not args.no_quantize_lm_head, quantize_embedding=not args.no_quantize_embedding,
    )
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
    return 0
