"""The options of a training run (`TrainConfig`), its result, and the defaults that depend on the method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from qosora.errors import QosoraError
from qosora.options import check, option

Optim = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
OPTIMS: tuple[str, ...] = get_args(Optim)

TRAIN_CONFIG = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; written to OUT/train_config.json and checked again on --resume."""

    data: str = option(help="training JSONL")
    out: str = option(help="run directory (checkpoints, metrics, the final trained model)")
    eval_data: str | None = option(None, "held-out JSONL (evaluated at start, end and every --eval-every steps)")
    eval_fraction: float = option(0.0, "hold out this fraction of --data instead", min=0.0, max=0.5)
    steps: int | None = option(None, "optimizer steps (default: one epoch)", min=1)
    epochs: float | None = option(None, "epochs instead of --steps", gt=0.0)
    lr: float | None = option(None, "peak learning rate (default: the method's, listed at the end of --help)", gt=0.0)
    warmup_steps: int | None = option(None, "linear warmup steps, then cosine (default: 3%% of the steps)", min=0)
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of --lr", min=0.0, max=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping, before the SORSA regularizer", gt=0.0)
    batch_size: int = option(4, "examples per micro-batch per process", min=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    seq_len: int = option(512, "truncate examples to this many tokens", min=2)
    packing: bool = option(False, "concatenate examples into full --seq-len rows")
    gamma: float | None = option(None, "SORSA orthonormal regularizer, scaled by 1/lr (default 4e-4; 0 = off)",
                                 min=0.0)
    seed: int = option(0, "data order, init and dropout seed")
    gradient_checkpointing: bool = option(False, "recompute each layer in backward (less activation memory)")
    optim: Optim = option("adamw", "8-bit variants need CUDA (bitsandbytes); on CPU torch AdamW is used")
    chunked_loss: bool = option(True, "disable the chunked cross-entropy (for comparison)", flag="--full-logits")
    save_every: int = option(0, "checkpoint every N steps (0: final model only)", min=0)
    keep_checkpoints: int = option(2, "checkpoints kept on disk", min=1)
    eval_every: int = option(0, "evaluate every N steps (0: at start and end only)", min=0)
    eval_batches: int | None = option(None, "cap on eval examples / batch size during training", min=1)
    log_every: int = option(1, "write a metrics.jsonl row every N steps", min=1)
    bf16: bool | None = option(None, "bf16 autocast (default: where the processor computes bf16 natively)")

    def validate(self) -> "TrainConfig":
        check(self)
        if self.steps is not None and self.epochs is not None:
            raise QosoraError("pass either --steps or --epochs, not both")
        if self.eval_data is not None and self.eval_fraction:
            raise QosoraError("pass either --eval-data or --eval-fraction, not both")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    out_dir: str
    method: str
    steps: int
    first_loss: float | None
    final_loss: float | None
    initial_eval_loss: float | None
    final_eval_loss: float | None
    orthonormality: float | None
    tokens_per_s: float
    seconds: float
    resumed_from: int

    def to_dict(self) -> dict:
        return asdict(self)
