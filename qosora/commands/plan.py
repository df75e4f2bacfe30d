"""qosora plan --config llama-2-7b --method sorsa --rank 128 --seq-len 2048"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json

EXAMPLE = """qosora plan --config llama-2-7b --method sorsa --rank 128 --seq-len 2048 --batch-size 1 \\
      --optim adamw8bit --gradient-checkpointing --gpu-memory 24
  qosora plan --config ./Meta-Llama-3-8B/config.json --method osora --rank 64 --json
known configs: llama-2-7b, llama-3-8b, qwen2.5-7b (or any Llama-shaped config.json / model directory)"""


def add_parser(sub) -> None:
    from qosora.options import add_arguments
    from qosora.planning import PlanOptions

    p = add_verb(sub, "plan", "Predict the peak memory of a training step, by component.", EXAMPLE, run)
    add_arguments(p, PlanOptions)
    p.add_argument("--json", action="store_true", help="one JSON object: total_bytes, components, fits")


def run(args) -> int:
    from qosora.options import from_args
    from qosora.planning import GiB, PlanOptions, run_plan

    report = run_plan(from_args(PlanOptions, args))
    if args.json:
        print_json(report.to_dict())
        return 0
    print(f"{report.model}: {report.method} r={report.rank}, seq {report.seq_len} x batch {report.batch_size}, "
          f"{report.optim}{', grad ckpt' if report.gradient_checkpointing else ''}, "
          f"{'chunked' if report.chunked_loss else 'full'} loss on {report.device}")
    print(f"  trainable parameters {report.trainable_params:,}")
    for name, value in report.components.items():
        print(f"  {name:<17} {value / GiB:7.2f} GiB")
    print(f"  {'total':<17} {report.total_bytes / GiB:7.2f} GiB", end="")
    if report.fits is not None:
        print(f"   {'fits in' if report.fits else 'does NOT fit in'} {report.gpu_memory / GiB:g} GiB")
    else:
        print()
    return 0
