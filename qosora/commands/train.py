"""qosora train MODEL_OR_PREPARED_DIR --data train.jsonl --out run/"""

from __future__ import annotations

from qosora.commands._common import add_verb, print_json
from qosora.config import METHODS

EXAMPLE = """qosora train prepared/ --data train.jsonl --out run/ --steps 500 --lr 1e-4 --batch-size 4 --grad-accum 4 \\
      --seq-len 512 --gamma 4e-4 --gradient-checkpointing --optim adamw8bit --save-every 100 --eval-fraction 0.05
  qosora train ./SmolLM2-135M-Instruct --method sorsa --rank 16 --data qosora/data/demo.jsonl --out run/ --steps 100
  torchrun --nproc_per_node 2 -m qosora train prepared/ --data train.jsonl --out run/   # data parallel
  qosora train prepared/ --data train.jsonl --out run/ --resume                          # continue a killed run

data formats (JSONL, one object a line): {"text"} | {"prompt","completion"} | {"messages":[{"role","content"}]}
  (chat template) | {"question","answer"} (GSM8K). The loss counts completion / assistant tokens only.
OUT ends as a prepared-format directory (qosora merge/export/eval take it) plus metrics.jsonl, loss.png and
checkpoints/."""


def add_parser(sub) -> None:
    p = add_verb(sub, "train", "Fine-tune the adapter factors of a prepared model (NF4 residual frozen).", EXAMPLE, run)
    p.add_argument("model_dir", metavar="MODEL_OR_PREPARED_DIR",
                   help="directory from `qosora prepare`, or a Hugging Face model directory with --method/--rank")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final trained model)")
    g = p.add_argument_group("preparing on the fly (Hugging Face directory only)")
    g.add_argument("--method", choices=METHODS, help="adapter method (prepares into OUT/prepared)")
    g.add_argument("--rank", type=int, help="adapter rank")
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    g.add_argument("--epochs", type=float, help="epochs instead of --steps")
    g.add_argument("--lr", type=float, help="peak learning rate (default: sorsa/pissa 1e-4, osora 2e-3, qlora 2e-4)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 3%% of the steps), then cosine")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (before the SORSA regularizer)")
    g.add_argument("--gamma", type=float, help="SORSA orthonormal regularizer, scaled by 1/lr (default 4e-4; 0 = off)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("batches")
    g.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=int, default=512, help="truncate examples to this many tokens")
    g.add_argument("--packing", action="store_true", help="concatenate examples into full --seq-len rows")
    g.add_argument("--eval-data", help="held-out JSONL (evaluated at start, end and every --eval-every steps)")
    g.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this fraction of --data instead")
    g.add_argument("--eval-every", type=int, default=0)
    g = p.add_argument_group("memory")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    g.add_argument("--optim", choices=["adamw", "adamw8bit", "paged_adamw8bit"], default="adamw",
                   help="8-bit variants need CUDA (bitsandbytes); on CPU torch AdamW is used")
    g.add_argument("--full-logits", action="store_true", help="disable the chunked cross-entropy (for comparison)")
    g.add_argument("--no-bf16", action="store_true", help="fp32 compute even where bf16 is available")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: final model only)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (no progress bar)")


def run(args) -> int:
    from qosora.config import PrepareConfig
    from qosora.errors import QosoraError
    from qosora.train.loop import TrainConfig, finetune

    if (args.method is None) != (args.rank is None):
        raise QosoraError("--method and --rank go together (they prepare a Hugging Face directory on the fly)")
    prepare_config = PrepareConfig(method=args.method, rank=args.rank) if args.method else None
    config = TrainConfig(
        data=args.data, out=args.out, eval_data=args.eval_data, eval_fraction=args.eval_fraction, steps=args.steps,
        epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, batch_size=args.batch_size,
        grad_accum=args.grad_accum, seq_len=args.seq_len, packing=args.packing, gamma=args.gamma, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, optim=args.optim, chunked_loss=not args.full_logits,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every,
        bf16=False if args.no_bf16 else None,
    )
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
