"""qosora plan --config llama-2-7b --method sorsa --rank 128 --seq-len 2048"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json
from qosora.config import METHODS

EXAMPLE = """qosora plan --config llama-2-7b --method sorsa --rank 128 --seq-len 2048 --batch-size 1 \\
      --optim adamw8bit --gradient-checkpointing --gpu-memory 24
  qosora plan --config ./Meta-Llama-3-8B/config.json --method osora --rank 64 --json
known configs: llama-2-7b, llama-3-8b, qwen2.5-7b (or any Llama-shaped config.json / model directory)"""


def add_parser(sub) -> None:
    p = add_verb(sub, "plan", "Predict the peak memory of a training step, by component.", EXAMPLE, run)
    p.add_argument("--config", required=True, help="llama-2-7b | llama-3-8b | qwen2.5-7b | CONFIG.json | MODEL_DIR")
    p.add_argument("--method", choices=METHODS, default="sorsa")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw8bit"], default="adamw")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--full-logits", action="store_true", help="plan without the chunked cross-entropy")
    p.add_argument("--targets", default=None, help="comma list: q,k,v,o,gate,up,down (default: all)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: peak RSS of a CPU run")
    p.add_argument("--gpu-memory", type=float, help="GiB available: say whether it fits")
    p.add_argument("--json", action="store_true", help="one JSON object: total_bytes, components, fits")


def run(args) -> int:
    from qosora.config import ALL_TARGETS, PrepareConfig
    from qosora.planning import GiB, plan

    targets = PrepareConfig.normalize_targets(args.targets) if args.targets else ALL_TARGETS
    report = plan(args.config, args.method, args.rank, args.seq_len, args.batch_size, args.optim,
                  args.gradient_checkpointing, not args.full_logits, targets, args.device,
                  gpu_memory=args.gpu_memory)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(f"{args.config}: {report.method} r={report.rank}, seq {report.seq_len} x batch {report.batch_size}, "
          f"{report.optim}{', grad ckpt' if report.gradient_checkpointing else ''}, "
          f"{'chunked' if report.chunked_loss else 'full'} loss on {report.device}")
    print(f"  trainable parameters {report.trainable_params:,}")
    for name, value in report.components.items():
        print(f"  {name:<17} {value / GiB:7.2f} GiB")
    print(f"  {'total':<17} {report.total_bytes / GiB:7.2f} GiB", end="")
    if report.fits is not None:
        print(f"   {'fits in' if report.fits else 'does NOT fit in'} {args.gpu_memory:g} GiB")
    else:
        print()
    return 0
