"""qosora eval DIR --data test.jsonl --metric loss|ppl|exact-match"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json

EXAMPLE = """qosora eval run/ --data test.jsonl --metric ppl
  qosora eval run/ --data gsm8k_test.jsonl --metric exact-match --limit 200
DIR: a trained/prepared qosora directory, or a Hugging Face model directory (e.g. from `qosora merge`)."""


def add_parser(sub) -> None:
    from qosora.evaluation import EvalOptions
    from qosora.options import add_arguments

    p = add_verb(sub, "eval", "Held-out loss, perplexity or GSM8K-style exact match of a model.", EXAMPLE, run)
    p.add_argument("model_dir", metavar="DIR")
    add_arguments(p, EvalOptions)
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from qosora.evaluation import EvalOptions, run_eval
    from qosora.options import from_args

    report = run_eval(args.model_dir, from_args(EvalOptions, args), progress=not args.json)
    if args.json:
        print_json(report.to_dict())
    elif report.metric == "exact-match":
        print(f"exact match {report.value:.4f} on {report.examples} examples")
    else:
        print(f"loss {report.loss:.4f}   ppl {report.ppl:.3f}   ({report.examples} examples, {report.tokens} tokens)")
    return 0
