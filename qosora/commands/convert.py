"""qosora convert DIR --to peft|lora --out OUT [--base ORIGINAL] [--dtype bfloat16|float16|float32] [--rank N]

The options are `qosora.interop.options.ConvertOptions`'s fields; importing them loads no torch, so `--help` stays
fast."""

from __future__ import annotations

from dataclasses import asdict

from qosora.commands._common import add_output_flags, add_verb, print_json
from qosora.interop.options import ConvertOptions
from qosora.options import add_arguments, from_args


def add_parser(sub) -> None:
    p = add_verb(
        sub, "convert",
        "Hand a trained directory to PEFT: a transformers bitsandbytes 4-bit base + LoRA (exact), or a LoRA for the "
        "original model.",
        "qosora convert run/ --to peft --out shared/    # or: --to lora --base ./SmolLM2-135M --out lora/", run,
    )
    p.add_argument("directory", help="trained or prepared qosora directory")
    add_arguments(p, ConvertOptions)
    add_output_flags(p, what="output directory")


def run(args) -> int:
    from qosora.interop.peft_out import convert

    report = convert(args.directory, args.out, **asdict(from_args(ConvertOptions, args)), overwrite=args.overwrite,
                     progress=not args.json)
    if args.json:
        print_json(report)
        return 0
    sizes = "   ".join(f"{part} {n / 2**20:.1f} MiB" for part, n in report["bytes"].items())
    print(f"converted {args.directory} -> {report['out_dir']} (--to {report['to']}, {report['method']}, LoRA rank "
          f"{report['rank']}, {report['dtype']}): {sizes}")
    if report.get("dropped_energy"):
        print(f"  truncated by SVD: dropped energy mean {report['dropped_energy']['mean']:.2%}, "
              f"max {report['dropped_energy']['max']:.2%}")
    print(f"  load it as {report['out_dir']}/README.md shows")
    return 0
