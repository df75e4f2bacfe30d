"""Optimizers: torch AdamW everywhere; bitsandbytes' 8-bit and paged 8-bit AdamW on CUDA (the one place the
training code imports `bitsandbytes.optim`). Trainable factors are fp32 during training, so AdamW's fp32 master
weights are the parameters themselves; 8-bit AdamW stores its two moments in blockwise 8-bit (2 bytes a
parameter instead of 8)."""

from __future__ import annotations

import math

import torch

from qosora.errors import QosoraError

from qosora.train.config import OPTIMS


def effective_optim(name: str, device: torch.device) -> str:
    """8-bit AdamW is a CUDA kernel in bitsandbytes: elsewhere fall back to torch AdamW."""
    if name not in OPTIMS:
        raise QosoraError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMS)}")
    return name if device.type == "cuda" or name == "adamw" else "adamw"


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    name = effective_optim(name, device)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    import bitsandbytes.optim as bnb_optim

    cls = bnb_optim.AdamW8bit if name == "adamw8bit" else bnb_optim.PagedAdamW8bit
    return cls(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def cosine_with_warmup(optimizer, warmup: int, total: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(step) = lr0 * step / warmup during warmup, then a cosine from lr0 down to lr0 * min_ratio at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
