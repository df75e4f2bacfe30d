"""qosora prepare MODEL_DIR --method sorsa --rank 64 --out prepared/   (or --from-peft ADAPTER_DIR)"""

from __future__ import annotations

from qosora.commands._common import add_output_flags, add_verb, print_json
from qosora.config import ALL_TARGETS, PrepareConfig, QuantConfig, SVDConfig
from qosora.options import add_arguments, from_args


def add_parser(sub) -> None:
    p = add_verb(
        sub, "prepare", "Split every targeted linear by SVD into a rank-r adapter and an NF4 residual.",
        "qosora prepare ./SmolLM2-135M --method sorsa --rank 64 --out prepared/", run,
    )
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json + safetensors)")
    add_arguments(p, PrepareConfig)
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list: q,k,v,o,gate,up,down (default: all)")
    add_arguments(p.add_argument_group("NF4 residual"), QuantConfig)
    p.add_argument("--no-quant", action="store_true", help="keep the residual dense (ablation / tests)")
    add_arguments(p.add_argument_group("SVD"), SVDConfig)
    p.add_argument("--device", default=None, help="where the SVD runs (default: cuda if present, else cpu)")
    p.add_argument("--from-peft", metavar="ADAPTER_DIR", default=None,
                   help="import a PEFT LoRA (-> qlora) or PiSSA (-> pissa) adapter on MODEL_DIR instead of "
                        "decomposing; the method, rank and targets come from the adapter")
    add_output_flags(p, what="prepared directory")


def run(args) -> int:
    from qosora.preparation import prepare

    config = from_args(
        PrepareConfig, args, targets=PrepareConfig.normalize_targets(args.targets),
        quant=from_args(QuantConfig, args, quant_type="none" if args.no_quant else "nf4"),
        svd=from_args(SVDConfig, args),
    )
    if args.from_peft is not None:
        from qosora.errors import QosoraError
        from qosora.interop.peft_in import prepare_from_peft

        default = PrepareConfig()
        if (config.method, config.rank, config.targets) != (default.method, default.rank, default.targets):
            raise QosoraError("--from-peft takes the method, rank and targets from ADAPTER_DIR: drop --method, --rank "
                              "and --targets")
        report = prepare_from_peft(args.model_dir, args.from_peft, args.out, quant=config.quant,
                                   adapter_dtype=config.adapter_dtype, device=args.device, overwrite=args.overwrite,
                                   progress=not args.json)
    else:
        report = prepare(args.model_dir, args.out, config, device=args.device, overwrite=args.overwrite,
                         progress=not args.json)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"prepared {report.layers} linears ({report.method}, rank {report.rank}) -> {report.out_dir} "
              f"in {report.seconds:.1f} s")
        print(f"  trainable params {report.trainable_params:,}   frozen params {report.frozen_params:,}")
        plain = report.mean_rel_error_plain_nf4
        print(f"  mean relative error {report.mean_rel_error:.4f}   plain NF4 "
              f"{'-' if plain is None else format(plain, '.4f')}")
    return 0
