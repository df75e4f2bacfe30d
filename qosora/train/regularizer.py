"""SORSA's orthonormal regularizer (arXiv 2409.00055), applied the way the reference implementation does.

    L_reg = mean over adapted layers of ||U^T U - I||_F + ||Vh Vh^T - I||_F

It is not added to the task loss. After the task gradients were clipped, each U, Vh gets

    grad += (gamma / lr0) * dL_reg/dparam

and then the optimizer steps. Scaling by the *initial* learning rate keeps the regularizer's pull independent of
the lr schedule's value at init (gamma = 4e-4 with lr0 = 3e-5 in the paper's Llama-2-7B run). gamma = 0 turns it
off. Only methods whose spec says `orthonormal_regularizer` (SORSA) have it; OSoRA and PiSSA train without it.

All layers go through one autograd call (one small graph of r x r Gram matrices per layer): a call per layer
cost ~1 ms each, 0.2 s a step on SmolLM2's 210 adapted linears.
"""

from __future__ import annotations

import torch

from qosora.layer import SVDAdapterLinear


def regularized_layers(layers: dict[str, SVDAdapterLinear]) -> list[SVDAdapterLinear]:
    return [l for l in layers.values() if l.spec.orthonormal_regularizer]


@torch.no_grad()
def orthonormality(layers: dict[str, SVDAdapterLinear]) -> float:
    """L_reg, the value logged as `orthonormality` (0 for methods without U, Vh)."""
    regs = regularized_layers(layers)
    return float(sum(l.orthonormality() for l in regs) / len(regs)) if regs else 0.0


def add_regularizer_grad(layers: dict[str, SVDAdapterLinear], gamma: float, lr0: float) -> float:
    """Add (gamma / lr0) * grad(L_reg) to U.grad and Vh.grad of every SORSA layer; return L_reg."""
    regs = regularized_layers(layers)
    if not regs:
        return 0.0
    if gamma == 0:
        return orthonormality(layers)
    factors = [p for l in regs for p in (l.U, l.Vh)]
    with torch.enable_grad():
        value = torch.stack([l.orthonormality() for l in regs]).mean()
        grads = torch.autograd.grad(value, factors)
    scale = gamma / lr0
    for p, g in zip(factors, grads):
        g = g.to(p.dtype) * scale
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
    return float(value.detach())
