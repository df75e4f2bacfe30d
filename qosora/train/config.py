"""The options of a training run (`TrainConfig`), its result, and the defaults that depend on the method."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qosora.errors import QosoraError
from qosora.train.optim import OPTIMS

# Learning rates that work for short runs of each method (the paper values are for multi-epoch 7B runs:
# SORSA 3e-5, PiSSA 2e-5). OSoRA trains only S and O, a few thousand numbers a layer, and needs a larger one.
DEFAULT_LR = {"sorsa": 1e-4, "osora": 2e-3, "pissa": 1e-4, "qlora": 2e-4}
DEFAULT_GAMMA = 4e-4  # SORSA paper; ignored by the other methods
TRAIN_CONFIG = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; written to OUT/train_config.json and checked again on --resume."""

    data: str
    out: str
    eval_data: str | None = None
    eval_fraction: float = 0.0
    steps: int | None = None            # exactly one of steps / epochs (default: 1 epoch)
    epochs: float | None = None
    lr: float | None = None             # default: DEFAULT_LR[method]
    warmup_steps: int | None = None     # default: 3 % of steps
    min_lr_ratio: float = 0.0           # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = False
    gamma: float | None = None          # SORSA orthonormal regularizer; default DEFAULT_GAMMA, 0 = off
    seed: int = 0
    gradient_checkpointing: bool = False
    optim: str = "adamw"
    chunked_loss: bool = True
    save_every: int = 0                 # 0: only the final model
    keep_checkpoints: int = 2
    eval_every: int = 0                 # 0: evaluate at start and end only (when there is eval data)
    eval_batches: int | None = None     # cap on eval examples / batch_size during training
    log_every: int = 1
    bf16: bool | None = None            # None: where the hardware has it

    def validate(self) -> "TrainConfig":
        if self.steps is not None and self.epochs is not None:
            raise QosoraError("pass either --steps or --epochs, not both")
        for name in ("batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise QosoraError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise QosoraError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise QosoraError(f"--epochs must be > 0, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise QosoraError(f"--lr must be > 0, got {self.lr}")
        if self.gamma is not None and self.gamma < 0:
            raise QosoraError(f"--gamma must be >= 0, got {self.gamma}")
        if self.optim not in OPTIMS:
            raise QosoraError(f"unknown --optim {self.optim!r}: choose one of {', '.join(OPTIMS)}")
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


def check_resume_config(out: Path, config: TrainConfig) -> None:
    saved_path = out / TRAIN_CONFIG
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    ignore = {"save_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches"}
    changed = [k for k, v in asdict(config).items() if k not in ignore and saved.get(k) != v]
    if changed:
        raise QosoraError(f"--resume with different options than the run in {out} ({', '.join(changed)}): "
                          "use the original options or another --out")
