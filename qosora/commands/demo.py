"""qosora demo: the whole pipeline on the bundled default (SmolLM2-135M fixture + the bundled arithmetic data)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qosora.commands._common import add_verb, print_json
from qosora.config import PrepareConfig
from qosora.options import add_arguments, from_args
from qosora.train.config import TrainConfig

MARKER = ".qosora-demo"  # marks a directory as the demo's own: the next `qosora demo` may replace it


def add_parser(sub) -> None:
    p = add_verb(
        sub, "demo",
        "Prepare -> train -> export int4 ONNX -> generate, on SmolLM2-135M and the bundled arithmetic data (CPU: minutes).",
        "qosora demo --out demo-run/", run,
    )
    p.add_argument("--out", default="qosora-demo",
                   help="directory for the prepared/trained model and the ONNX export; an earlier demo's output "
                        "there is replaced (default: qosora-demo)")
    add_arguments(p, PrepareConfig, only=["method", "rank"], defaults={"rank": 16})
    add_arguments(p, TrainConfig, only=["steps"], defaults={"steps": 60})
    p.add_argument("--prompt", default="What is 12 plus 30?\n")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier demo's")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object (status lines to stderr)")


def _claim(out: Path, overwrite: bool) -> None:
    """Make `out` an empty directory of the demo's: an earlier (even interrupted) demo's is replaced."""
    import shutil

    from qosora.files import check_output_path

    ours = (out / MARKER).is_file()
    check_output_path(out, overwrite=overwrite or ours)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by `qosora demo`; the next `qosora demo --out` here replaces this directory\n")


def run(args) -> int:
    from importlib.resources import files

    from qosora.errors import QosoraError
    from qosora.export.api import export_onnx
    from qosora.fixtures import smollm2_dir
    from qosora.run.generator import generate
    from qosora.train.loop import finetune

    say = (lambda m: print(m, file=sys.stderr)) if args.json else print  # noqa: E731
    prepare_config = from_args(PrepareConfig, args).validate()
    if not args.prompt.strip():
        raise QosoraError("--prompt is empty: pass the text to complete")
    data = str(files("qosora.data") / "demo.jsonl")
    train_config = TrainConfig(data=data, out=str(Path(args.out) / "run"), steps=getattr(args, "TrainConfig.steps"),
                               batch_size=4, seq_len=64, eval_fraction=0.1).validate()
    model = smollm2_dir()
    out = Path(args.out)
    _claim(out, args.overwrite)
    timings = {}
    t = time.perf_counter()
    say(f"[1/3] prepare {prepare_config.method} r={prepare_config.rank} on {model} and train {train_config.steps} "
        f"steps on {data}")
    result = finetune(model, train_config, prepare_config, progress=not args.json)
    timings["prepare_and_train_s"] = time.perf_counter() - t
    say(f"      eval loss {result.initial_eval_loss:.3f} -> {result.final_eval_loss:.3f}")
    t = time.perf_counter()
    say("[2/3] export int4 ONNX (merge into the dequantized residual, requantize once, parity check)")
    report = export_onnx(out / "run", out / "onnx", "int4", progress=not args.json)
    timings["export_s"] = time.perf_counter() - t
    say("[3/3] generate with onnxruntime (no torch on this path)")
    gen = generate(out / "onnx", args.prompt, max_new_tokens=24)
    summary = {
        "out": str(out), "initial_eval_loss": result.initial_eval_loss, "final_eval_loss": result.final_eval_loss,
        "export_parity": report.get("parity"), "prompt": args.prompt, "completion": gen.text,
        "decode_tokens_per_s": gen.decode_tokens_per_s, **timings,
    }
    if args.json:
        print_json(summary)
    else:
        print(f"\n{args.prompt.strip()} -> {gen.text.strip()!r}   ({gen.decode_tokens_per_s:.0f} tokens/s decode)")
        print(f"trained model: {out / 'run'}   ONNX: {out / 'onnx'}   try: qosora generate {out / 'onnx'} --prompt '...'")
    return 0
