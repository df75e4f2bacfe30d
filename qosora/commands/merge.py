"""qosora merge DIR --out MERGED [--dtype float32|bfloat16|float16]"""

from __future__ import annotations

from typing import get_args

from qosora.commands._common import add_output_flags, add_verb, print_json
from qosora.config import Dtype


def add_parser(sub) -> None:
    p = add_verb(
        sub, "merge", "Merge the adapter into the dequantized residual and write a plain Hugging Face checkpoint.",
        "qosora merge run/ --out merged/ --dtype bfloat16", run,
    )
    p.add_argument("directory", help="prepared or trained directory")
    p.add_argument("--dtype", default="float32", choices=get_args(Dtype), help="dtype of the merged weights")
    add_output_flags(p, what="merged Hugging Face checkpoint directory")


def run(args) -> int:
    from qosora.merging import merge

    out = merge(args.directory, args.out, args.dtype, overwrite=args.overwrite, progress=not args.json)
    if args.json:
        print_json({"out_dir": str(out), "dtype": args.dtype})
    else:
        print(f"merged {args.directory} -> {out} ({args.dtype}); load it with AutoModelForCausalLM.from_pretrained")
    return 0
