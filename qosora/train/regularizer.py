"""SORSA's orthonormal regularizer (arXiv 2409.00055), applied the way the reference implementation does.

    L_reg = mean over adapted layers of ||U^T U - I||_F + ||Vh Vh^T - I||_F

It is not added to the task loss. After the task gradients were clipped, each U, Vh gets

    grad += (gamma / lr0) * dL_reg/dparam

and then the optimizer steps. Scaling by the *initial* learning rate keeps the regularizer's pull independent of
the lr schedule's value at init (gamma = 4e-4 with lr0 = 3e-5 in the paper's Llama-2-7B run). gamma = 0 turns it
off. Only methods whose spec says `orthonormal_regularizer` (SORSA) have it; OSoRA and PiSSA train without it.

The gradient has a closed form, so no autograd graph is built (a graph per layer cost 0.2 s a step on
SmolLM2's 210 adapted linears). With G = U^T U - I and H = Vh Vh^T - I (r x r):

    d||G||_F / dU = 2 U G / ||G||_F        d||H||_F / dVh = 2 H Vh / ||H||_F

(checked against autograd in tests/test_train_loop.py).
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


@torch.no_grad()
def orthonormality_grads(U: torch.Tensor, Vh: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(||U^T U - I||_F + ||Vh Vh^T - I||_F, its gradient w.r.t. U, w.r.t. Vh), in fp32."""
    U, Vh = U.float(), Vh.float()
    eye = torch.eye(U.shape[1], device=U.device)
    G, H = U.mT @ U - eye, Vh @ Vh.mT - eye
    g_norm, h_norm = torch.linalg.matrix_norm(G), torch.linalg.matrix_norm(H)
    gU = (2 / g_norm.clamp_min(1e-12)) * (U @ G)
    gVh = (2 / h_norm.clamp_min(1e-12)) * (H @ Vh)
    return float(g_norm + h_norm), gU, gVh


def add_regularizer_grad(layers: dict[str, SVDAdapterLinear], gamma: float, lr0: float) -> float:
    """Add (gamma / lr0) * grad(L_reg) to U.grad and Vh.grad of every SORSA layer; return L_reg."""
    regs = regularized_layers(layers)
    if not regs:
        return 0.0
    if gamma == 0:
        return orthonormality(layers)
    scale = gamma / lr0 / len(regs)  # L_reg is the mean over layers
    total = 0.0
    for layer in regs:
        value, gU, gVh = orthonormality_grads(layer.U, layer.Vh)
        total += value
        for p, g in ((layer.U, gU), (layer.Vh, gVh)):
            g = g.to(p.dtype).mul_(scale)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
    return total / len(regs)
