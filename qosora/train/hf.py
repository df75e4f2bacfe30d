"""Thin integration with Hugging Face `Trainer` and TRL's `SFTTrainer` (a `Trainer` subclass).

    model = qosora.train.hf.trainable_model("prepared/")          # only the declared factors train
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=1.0), train_dataset=...,
                      callbacks=[SORSARegularizer(gamma=4e-4)])
    trainer.train()
    qosora.save_trained(model, "prepared/", "run/")               # prepared-format output (merge, export)

`SORSARegularizer` hooks `on_pre_optimizer_step`, which Trainer calls after it clipped the gradients and before
`optimizer.step()`: exactly where SORSA adds gamma / lr0 * grad(L_reg) (qosora.train.regularizer). lr0 is
`args.learning_rate`. The value is logged as `orthonormality`. Trainer computes its loss from full logits; use
`qosora train` for the chunked cross-entropy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from qosora.loading import load
from qosora.layer import adapter_layers
from qosora.train.params import trainable_parameters
from qosora.train.regularizer import add_regularizer_grad


def trainable_model(directory: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a prepared directory with everything frozen except the method's factors (fp32, AdamW's master copy)."""

    model = load(directory, dtype=dtype, device=device)
    trainable_parameters(model, autocast=dtype in (torch.bfloat16, torch.float16))
    model.config.use_cache = False
    return model.train()


class SORSARegularizer(TrainerCallback):
    """Adds SORSA's orthonormal regularizer gradient after clipping; logs `orthonormality`."""

    def __init__(self, gamma: float = 4e-4):
        self.gamma = gamma
        self.last: float | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        layers = adapter_layers(model)
        self.last = add_regularizer_grad(layers, self.gamma, args.learning_rate)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.last is not None:
            logs["orthonormality"] = self.last
            if state.log_history and "orthonormality" not in state.log_history[-1]:
                state.log_history[-1]["orthonormality"] = self.last  # Trainer stored its copy before this hook
        return control
