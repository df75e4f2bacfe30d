"""qosora generate OUT --prompt "..." (onnxruntime + tokenizers; no torch)"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json


def add_parser(sub) -> None:
    p = add_verb(
        sub, "generate", "Generate text with an exported ONNX directory (onnxruntime only, no PyTorch).",
        'qosora generate out/ --prompt "The capital of France is" --max-new-tokens 32', run,
    )
    p.add_argument("directory", help="directory written by `qosora export --onnx`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    p.add_argument("--no-spinning", action="store_true",
                   help="let onnxruntime's idle threads sleep (slower decode; for machines shared with other work)")
    p.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")


def run(args) -> int:
    from pathlib import Path

    from qosora.errors import QosoraError

    if not (Path(args.directory) / "model.onnx").is_file():
        raise QosoraError(f"{args.directory} has no model.onnx: pass a directory written by `qosora export --onnx`")
    from qosora.run import generate

    r = generate(args.directory, args.prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                 threads=args.threads, spinning=not args.no_spinning)
    if args.json:
        print_json({"text": r.text, "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens,
                    "prefill_ms": r.prefill_ms, "decode_tokens_per_s": r.decode_tokens_per_s})
    else:
        print(args.prompt + r.text)
    return 0
