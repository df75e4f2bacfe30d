"""qosora prepare MODEL_DIR --method sorsa --rank 64 --out prepared/"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json
from qosora.config import ALL_TARGETS, METHODS


def add_parser(sub) -> None:
    p = add_verb(
        sub, "prepare", "Split every targeted linear by SVD into a rank-r adapter and an NF4 residual.",
        "qosora prepare ./SmolLM2-135M --method sorsa --rank 64 --out prepared/", run,
    )
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--method", default="sorsa", choices=METHODS)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list: q,k,v,o,gate,up,down (default: all)")
    p.add_argument("--refine-rounds", type=int, default=1, help="QPiSSA-style residual refinement rounds (1 = none)")
    p.add_argument("--svd", choices=["randomized", "exact"], default="randomized")
    p.add_argument("--svd-niter", type=int, default=4)
    p.add_argument("--svd-oversample", type=int, default=8)
    p.add_argument("--no-quant", action="store_true", help="keep the residual dense (ablation / tests)")
    p.add_argument("--nf4-scale", choices=["search", "absmax"], default="search",
                   help="NF4 block scales: error-minimising (default) or bitsandbytes' absmax; same format either way")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--adapter-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None, help="where the SVD runs (default: cuda if present, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from qosora.config import PrepareConfig, QuantConfig, SVDConfig
    from qosora.preparation import prepare

    config = PrepareConfig(
        method=args.method, rank=args.rank, targets=PrepareConfig.normalize_targets(args.targets),
        adapter_dtype=args.adapter_dtype,
        quant=QuantConfig(quant_type="none" if args.no_quant else "nf4", compute_dtype=args.compute_dtype,
                          scale=args.nf4_scale),
        svd=SVDConfig(solver=args.svd, oversample=args.svd_oversample, niter=args.svd_niter,
                      refine_rounds=args.refine_rounds, seed=args.seed),
    )
    report = prepare(args.model_dir, args.out, config, device=args.device, overwrite=args.overwrite,
                     progress=not args.json)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"prepared {report.layers} linears ({report.method}, rank {report.rank}) -> {report.out_dir} "
              f"in {report.seconds:.1f} s")
        print(f"  trainable params {report.trainable_params:,}   frozen params {report.frozen_params:,}")
        print(f"  mean relative error {report.mean_rel_error:.4f}   plain NF4 {report.mean_rel_error_plain_nf4:.4f}")
    return 0
