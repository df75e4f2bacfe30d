"""qosora demo: the whole pipeline on the bundled default (SmolLM2-135M fixture + the bundled arithmetic data)."""

from __future__ import annotations

import time
from pathlib import Path

from qosora.commands._common import add_verb, print_json


def add_parser(sub) -> None:
    p = add_verb(
        sub, "demo",
        "Prepare -> train -> export int4 ONNX -> generate, on SmolLM2-135M and the bundled arithmetic data (CPU: minutes).",
        "qosora demo --out demo-run/", run,
    )
    p.add_argument("--out", default="qosora-demo", help="directory for the prepared/trained model and the ONNX export")
    p.add_argument("--method", default="sorsa", choices=["sorsa", "osora", "pissa", "qlora"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompt", default="What is 12 plus 30?\n")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    import shutil
    from importlib.resources import files

    from qosora.config import PrepareConfig
    from qosora.errors import QosoraError
    from qosora.export.api import export_onnx
    from qosora.fixtures import smollm2_dir
    from qosora.run.generate import generate
    from qosora.train.loop import TrainConfig, finetune

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise QosoraError(f"{out} already exists: pass --overwrite or another --out")
        shutil.rmtree(out)
    timings = {}
    t = time.perf_counter()
    model = smollm2_dir()
    data = str(files("qosora.data") / "demo.jsonl")
    print(f"[1/3] prepare {args.method} r={args.rank} on {model} and train {args.steps} steps on {data}")
    result = finetune(
        model,
        TrainConfig(data=data, out=str(out / "run"), steps=args.steps, batch_size=4, seq_len=64, eval_fraction=0.1),
        PrepareConfig(method=args.method, rank=args.rank),
        progress=not args.json,
    )
    timings["prepare_and_train_s"] = time.perf_counter() - t
    print(f"      eval loss {result.initial_eval_loss:.3f} -> {result.final_eval_loss:.3f}")
    t = time.perf_counter()
    print("[2/3] export int4 ONNX (merge into the dequantized residual, requantize once, parity check)")
    report = export_onnx(out / "run", out / "onnx", "int4", progress=not args.json)
    timings["export_s"] = time.perf_counter() - t
    print("[3/3] generate with onnxruntime (no torch on this path)")
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
