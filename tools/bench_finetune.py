"""Short real fine-tune: SmolLM2-135M-Instruct on a few hundred GSM8K examples, held-out loss before and after,
for SORSA, OSoRA and PiSSA at the same budget (same data, steps, batch, rank).

    OMP_WAIT_POLICY=PASSIVE flock /tmp/qosora-heavy.lock python tools/bench_finetune.py \\
        --gsm8k ../shared/data/gsm8k/train.jsonl --train 320 --eval 96 --steps 40 [--out bench_finetune.json]

GSM8K (MIT licence) is read from the given file and never copied into the project. The first --train records
train, the last --eval records of the file are held out. Each method runs `qosora train` (the library call) with
its default learning rate unless --lr METHOD=LR is given. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gsm8k", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"))
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--eval", type=int, default=96)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--methods", default="sorsa,osora,pissa")
    p.add_argument("--lr", action="append", default=[], help="METHOD=LR (repeatable)")
    p.add_argument("--work", default="/tmp/qosora-bench-finetune")
    p.add_argument("--out", default="bench_finetune.json")
    args = p.parse_args()

    from qosora.config import PrepareConfig
    from qosora.config import QosoraConfig
    from qosora.fixtures import smollm2_dir
    from qosora.preparation import prepare
    from qosora.methods import METHOD_SPECS
    from qosora.train.loop import TrainConfig, finetune

    lines = [l for l in Path(args.gsm8k).read_text().splitlines() if l.strip()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_text("\n".join(lines[: args.train]) + "\n")
    (work / "eval.jsonl").write_text("\n".join(lines[-args.eval:]) + "\n")
    lrs = {m: float(v) for m, v in (x.split("=") for x in args.lr)}
    rows = []
    for method in args.methods.split(","):
        prepared, wanted = work / f"smollm2-{method}-r{args.rank}", PrepareConfig(method=method, rank=args.rank)
        cached = prepared / "qosora_config.json"
        if not cached.is_file() or QosoraConfig.from_dict(json.loads(cached.read_text())).prepare != wanted:
            prepare(smollm2_dir(), prepared, wanted, overwrite=True, progress=False)
        run_dir = work / f"run-{method}-{int(time.time())}"
        config = TrainConfig(data=str(work / "train.jsonl"), eval_data=str(work / "eval.jsonl"), out=str(run_dir),
                             steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             lr=lrs.get(method, METHOD_SPECS[method].default_lr))
        res = finetune(prepared, config, progress=False)
        row = {"method": method, "lr": config.lr, **res.to_dict()}
        rows.append(row)
        print(f"{method:<6} lr {config.lr:g}: held-out loss {res.initial_eval_loss:.4f} -> {res.final_eval_loss:.4f} "
              f"({res.final_eval_loss / res.initial_eval_loss - 1:+.1%})  train {res.first_loss:.3f} -> "
              f"{res.final_loss:.3f}  {res.seconds:.0f} s", flush=True)
    summary = {"config": vars(args), "runs": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print("\n| method | lr | held-out loss before | after | change |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['initial_eval_loss']:.4f} | {r['final_eval_loss']:.4f} | "
              f"{r['final_eval_loss'] / r['initial_eval_loss'] - 1:+.1%} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
