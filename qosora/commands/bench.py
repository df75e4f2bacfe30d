"""qosora bench OUT [--prompt-len 64,512] [--gen-len 128] [--batch-size 1,4] [--against-genai]"""

from __future__ import annotations

import sys

from qosora.commands._common import add_verb, print_json

EXAMPLE = """qosora bench out/ --prompt-len 64,512 --gen-len 128 --batch-size 1,4 --threads 4 --against-genai
Synthetic prompts, EOS ignored; prefill ms and decode tokens/s are medians of --repeats runs."""


def _int_list(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(sub) -> None:
    import dataclasses

    from qosora.options import add_arguments, flag_of
    from qosora.run.options import BenchOptions, RuntimeOptions

    p = add_verb(sub, "bench", "Prefill and decode speed of an exported ONNX directory (optionally against "
                               "onnxruntime-genai).", EXAMPLE, run)
    p.add_argument("directory", help="directory written by `qosora export --onnx`")
    for f in dataclasses.fields(BenchOptions):  # the list options: comma-separated, declared on the fields
        if not f.metadata.get("cli", True):
            p.add_argument(flag_of(f), type=_int_list, default=f.default, dest=f"BenchOptions.{f.name}",
                           metavar="N[,N...]", help=f"{f.metadata['help']} (default: {','.join(map(str, f.default))})")
    add_arguments(p, BenchOptions)
    add_arguments(p, RuntimeOptions, only=("provider", "threads", "spinning"))
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from qosora.options import from_args
    from qosora.run.bench import run_bench, table
    from qosora.run.options import BenchOptions, RuntimeOptions

    say = (lambda m: print(m, file=sys.stderr)) if args.json else print  # noqa: E731
    report = run_bench(args.directory, from_args(BenchOptions, args), from_args(RuntimeOptions, args), say=say)
    if args.json:
        print_json(report)
    else:
        print(f"{report['model_dir']}: {report['contract']} graph on {report['device']}, "
              f"threads {report['threads'] or 'all'}, median of {report['repeats']}")
        print(table(report))
    return 0
