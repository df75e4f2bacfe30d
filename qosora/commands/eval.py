"""qosora eval DIR --data test.jsonl --metric loss|ppl|exact-match"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json

EXAMPLE = """qosora eval run/ --data test.jsonl --metric ppl
  qosora eval run/ --data gsm8k_test.jsonl --metric exact-match --limit 200
DIR: a trained/prepared qosora directory, or a Hugging Face model directory (e.g. from `qosora merge`)."""


def add_parser(sub) -> None:
    p = add_verb(sub, "eval", "Held-out loss, perplexity or GSM8K-style exact match of a model.", EXAMPLE, run)
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--data", required=True, help="JSONL in any `qosora train` format")
    p.add_argument("--metric", choices=["loss", "ppl", "exact-match"], default="loss")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=256, help="exact-match generation length")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from qosora.evaluation import evaluate

    report = evaluate(args.model_dir, args.data, args.metric, seq_len=args.seq_len, batch_size=args.batch_size,
                      limit=args.limit, max_new_tokens=args.max_new_tokens, device=args.device,
                      progress=not args.json)
    if args.json:
        print_json(report.to_dict())
    elif args.metric == "exact-match":
        print(f"exact match {report.value:.4f} on {report.examples} examples")
    else:
        print(f"loss {report.loss:.4f}   ppl {report.ppl:.3f}   ({report.examples} examples, {report.tokens} tokens)")
    return 0
