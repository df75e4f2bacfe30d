"""qosora train MODEL_OR_PREPARED_DIR --data train.jsonl --out run/"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json
from qosora.config import PrepareConfig
from qosora.methods import METHOD_SPECS
from qosora.options import add_arguments, from_args
from qosora.train.config import TrainConfig

GROUPS = {
    "schedule": ["steps", "epochs", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "max_grad_norm", "gamma",
                 "seed"],
    "batches": ["batch_size", "grad_accum", "seq_len", "packing", "eval_data", "eval_fraction", "eval_every",
                "eval_batches"],
    "memory and precision": ["gradient_checkpointing", "optim", "chunked_loss", "bf16"],
    "checkpoints and logs": ["save_every", "keep_checkpoints", "log_every"],
}

EXAMPLE = """qosora train prepared/ --data train.jsonl --out run/ --steps 500 --lr 1e-4 --batch-size 4 --grad-accum 4 \\
      --seq-len 512 --gamma 4e-4 --gradient-checkpointing --optim adamw8bit --save-every 100 --eval-fraction 0.05
  qosora train ./SmolLM2-135M-Instruct --method sorsa --rank 16 --data qosora/data/demo.jsonl --out run/ --steps 100
  torchrun --nproc_per_node 2 -m qosora train prepared/ --data train.jsonl --out run/   # data parallel
  qosora train prepared/ --data train.jsonl --out run/ --resume                          # continue a killed run

data formats (JSONL, one object a line): {"text"} | {"prompt","completion"} | {"messages":[{"role","content"}]}
  (chat template) | {"question","answer"} (GSM8K). The loss counts completion / assistant tokens only.
OUT ends as a prepared-format directory (qosora merge/export/eval take it) plus metrics.jsonl, loss.png and
checkpoints/.
default learning rates: """ + ", ".join(f"{m} {s.default_lr:g}" for m, s in METHOD_SPECS.items())


def add_parser(sub) -> None:
    p = add_verb(sub, "train", "Fine-tune the adapter factors of a prepared model (NF4 residual frozen).", EXAMPLE, run)
    p.add_argument("model_dir", metavar="MODEL_OR_PREPARED_DIR",
                   help="directory from `qosora prepare`, or a Hugging Face model directory with --method/--rank")
    add_arguments(p, TrainConfig, only=["data", "out"])
    g = p.add_argument_group("preparing on the fly (Hugging Face directory only; prepares into OUT/prepared)")
    add_arguments(g, PrepareConfig, only=["method", "rank"], defaults={"method": None, "rank": None})
    for title, names in GROUPS.items():
        add_arguments(p.add_argument_group(title), TrainConfig, only=names)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (no progress bar)")


def run(args) -> int:
    from qosora.errors import QosoraError
    from qosora.train.loop import finetune

    method, rank = getattr(args, "PrepareConfig.method"), getattr(args, "PrepareConfig.rank")
    if (method is None) != (rank is None):
        raise QosoraError("--method and --rank go together (they prepare a Hugging Face directory on the fly)")
    prepare_config = from_args(PrepareConfig, args) if method else None
    config = from_args(TrainConfig, args)
    result = finetune(args.model_dir, config, prepare_config, resume=args.resume, progress=not args.json)
    if args.json:
        print_json(result.to_dict())
        return 0
    msg = f"trained {result.method} for {result.steps} steps -> {result.out_dir} in {result.seconds:.0f} s"
    print(msg + f" ({result.tokens_per_s:.0f} tokens/s)")
    if result.first_loss is not None:
        print(f"  train loss {result.first_loss:.4f} (first step) -> {result.final_loss:.4f} (last step)")
    if result.final_eval_loss is not None:
        start = f"{result.initial_eval_loss:.4f} -> " if result.initial_eval_loss is not None else ""
        print(f"  eval loss  {start}{result.final_eval_loss:.4f}")
    if result.orthonormality is not None:
        print(f"  orthonormality {result.orthonormality:.2e}")
    return 0
