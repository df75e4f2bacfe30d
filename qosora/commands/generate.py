"""qosora generate OUT (--prompt TEXT | --chat TEXT | --input FILE.jsonl) (onnxruntime + tokenizers; no torch)"""

from __future__ import annotations

import sys

from qosora.commands._common import add_verb

EXAMPLE = """qosora generate out/ --prompt "The capital of France is" --max-new-tokens 32
  qosora generate out/ --chat "Name three colours" --system "Be brief" --temperature 0.7 --top-p 0.9
  qosora generate out/ --input prompts.jsonl --batch-size 4 --json
prompts.jsonl: one object a line, {"prompt": ...} (raw), {"chat": ..., "system": ...} or {"messages": [...]}."""


def add_parser(sub) -> None:
    from qosora.options import add_arguments
    from qosora.run.options import STOP_HELP, GenerationOptions, RuntimeOptions

    p = add_verb(sub, "generate", "Generate text with an exported ONNX directory (onnxruntime only, no PyTorch).",
                 EXAMPLE, run)
    p.add_argument("directory", help="directory written by `qosora export --onnx`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue (printed with its continuation)")
    what.add_argument("--chat", help="a user message, rendered with the model's chat template")
    what.add_argument("--input", metavar="FILE.jsonl", help="one prompt per line (see below)")
    p.add_argument("--system", help="system message before --chat")
    add_arguments(p, GenerationOptions)
    p.add_argument("--stop", action="append", default=[], metavar="S", help=STOP_HELP)
    add_arguments(p, RuntimeOptions)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (JSON lines)")


def run(args) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    from qosora.commands._common import _finite
    from qosora.errors import QosoraError
    from qosora.options import from_args
    from qosora.run.generator import Generator
    from qosora.run.options import GenerationOptions, RuntimeOptions
    from qosora.run.prompts import chat_messages, read_prompts

    options = replace(from_args(GenerationOptions, args), stop=tuple(args.stop)).validate()
    runtime = from_args(RuntimeOptions, args).validate()
    if args.system is not None and args.chat is None:
        raise QosoraError("--system goes with --chat: pass the user message with --chat")
    if args.prompt is not None and not args.prompt:
        raise QosoraError("--prompt is empty: pass the text to continue")
    if not (Path(args.directory) / "model.onnx").is_file():
        raise QosoraError(f"{args.directory} has no model.onnx: pass a directory written by `qosora export --onnx`")
    if args.input is not None:
        labelled = read_prompts(args.input)
    else:
        labelled = [("--prompt", args.prompt) if args.prompt is not None
                    else ("--chat", chat_messages(args.chat, args.system))]
    g = Generator(args.directory, runtime.provider, runtime.threads, runtime.spinning)
    ids = [g.encode(prompt, where) for where, prompt in labelled]
    if args.json or args.input is not None:
        for r in g.generate(ids, options, batch_size=runtime.batch_size):
            if args.json:
                print(json.dumps(_finite(r.to_dict()), allow_nan=False), flush=True)
            else:
                print(r.text, flush=True)
        return 0
    if args.prompt is not None:
        sys.stdout.write(args.prompt)
    for piece in g.stream(ids[0], options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
