"""The four adapter methods, as data plus one small function each.

With W = W_res + principal and (U, S, Vh) the top-r SVD factors of W:

| method | adapter(x)                       | trainable      | stored factors | paper          |
|--------|----------------------------------|----------------|----------------|----------------|
| sorsa  | U (S * (Vh x))                   | U, S, Vh       | U, S, Vh       | arXiv 2409.00055 |
| osora  | O * (U (S * (Vh x)))             | S, O           | U, S, Vh, O    | arXiv 2505.14350 |
| pissa  | B (A x), B = U sqrt(S), A = sqrt(S) Vh | A, B     | A, B           | arXiv 2404.02948 |
| qlora  | B (A x), B = 0, A ~ kaiming      | A, B           | A, B           | residual is all of W |

Every method also has a low-rank form adapter(x) = B (A x) (merge and export use it) and never builds the dense
(d_out, d_in) delta in the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the table below is read by the CLI's --help, which must not import torch
    import torch

    from qosora.decompose import Principal

Factors = dict[str, "torch.Tensor"]


def _init_sorsa(p: Principal, d_out: int, d_in: int, rank: int, g: torch.Generator) -> Factors:
    return {"U": p.U, "S": p.S, "Vh": p.Vh}


def _init_osora(p: Principal, d_out: int, d_in: int, rank: int, g: torch.Generator) -> Factors:
    import torch

    return {"U": p.U, "S": p.S, "Vh": p.Vh, "O": torch.ones(d_out, dtype=p.S.dtype)}


def _init_pissa(p: Principal, d_out: int, d_in: int, rank: int, g: torch.Generator) -> Factors:
    root = p.S.float().sqrt()
    return {"A": (root[:, None] * p.Vh.float()).to(p.S.dtype), "B": (p.U.float() * root).to(p.S.dtype)}


def _init_qlora(p: Principal | None, d_out: int, d_in: int, rank: int, g: torch.Generator) -> Factors:
    # LoRA's default: A ~ kaiming_uniform(a=sqrt(5)) i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0.
    import torch

    bound = 1.0 / math.sqrt(d_in)
    A = (torch.rand(rank, d_in, generator=g) * 2 - 1) * bound
    return {"A": A, "B": torch.zeros(d_out, rank)}


def _forward_svd(f: Factors, x: torch.Tensor) -> torch.Tensor:
    return ((x @ f["Vh"].mT) * f["S"]) @ f["U"].mT  # (..., d_in) -> (..., r) -> (..., d_out)


def _forward_osora(f: Factors, x: torch.Tensor) -> torch.Tensor:
    return _forward_svd(f, x) * f["O"]


def _forward_ab(f: Factors, x: torch.Tensor) -> torch.Tensor:
    return (x @ f["A"].mT) @ f["B"].mT


def _lowrank_svd(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    return f["U"].float() * f["S"].float(), f["Vh"].float()


def _lowrank_osora(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    return f["O"].float()[:, None] * f["U"].float() * f["S"].float(), f["Vh"].float()


def _lowrank_ab(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    return f["B"].float(), f["A"].float()


@dataclass(frozen=True)
class MethodSpec:
    name: str
    uses_svd: bool                   # False: the residual is W itself (QLoRA)
    factors: tuple[str, ...]         # stored, in this order
    trainable: tuple[str, ...]       # the rest are frozen buffers
    init: Callable[..., Factors]     # (principal, d_out, d_in, rank, generator) -> factors
    forward: Callable[[Factors, torch.Tensor], torch.Tensor]
    lowrank: Callable[[Factors], tuple[torch.Tensor, torch.Tensor]]  # -> (B fp32 (d_out, r'), A fp32 (r', d_in))
    # A learning rate that works for short runs (the papers' values are for multi-epoch 7B runs: SORSA 3e-5,
    # PiSSA 2e-5). OSoRA trains only S and O, a few thousand numbers a layer, and needs a larger one.
    default_lr: float
    # SORSA's orthonormal regularizer on U, Vh: its default gamma (paper: 4e-4); 0 = the method has none.
    default_gamma: float = 0.0

    @property
    def orthonormal_regularizer(self) -> bool:
        return self.default_gamma > 0

    def trainable_count(self, d_out: int, d_in: int, rank: int) -> int:
        shapes = factor_shapes(d_out, d_in, rank)
        return sum(math.prod(shapes[n]) for n in self.trainable)


def factor_shapes(d_out: int, d_in: int, rank: int) -> dict[str, tuple[int, ...]]:
    """The stored shape of every factor name a method uses."""
    return {"U": (d_out, rank), "S": (rank,), "Vh": (rank, d_in), "O": (d_out,), "A": (rank, d_in), "B": (d_out, rank)}


METHOD_SPECS: dict[str, MethodSpec] = {
    "sorsa": MethodSpec("sorsa", True, ("U", "S", "Vh"), ("U", "S", "Vh"), _init_sorsa, _forward_svd, _lowrank_svd,
                        default_lr=1e-4, default_gamma=4e-4),
    "osora": MethodSpec("osora", True, ("U", "S", "Vh", "O"), ("S", "O"), _init_osora, _forward_osora, _lowrank_osora,
                        default_lr=2e-3),
    "pissa": MethodSpec("pissa", True, ("A", "B"), ("A", "B"), _init_pissa, _forward_ab, _lowrank_ab, default_lr=1e-4),
    "qlora": MethodSpec("qlora", False, ("A", "B"), ("A", "B"), _init_qlora, _forward_ab, _lowrank_ab, default_lr=2e-4),
}


def orthonormality(U: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """SORSA's regularizer for one layer: ||U^T U - I||_F + ||Vh Vh^T - I||_F (Frobenius norms, not squared)."""
    import torch

    eye = torch.eye(U.shape[1], device=U.device, dtype=torch.float32)
    U, Vh = U.float(), Vh.float()
    return torch.linalg.matrix_norm(U.mT @ U - eye) + torch.linalg.matrix_norm(Vh @ Vh.mT - eye)
