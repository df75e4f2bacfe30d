"""Top-r SVD split of a weight into a principal part and a residual (PiSSA / SORSA / OSoRA initialisation).

    W = U diag(S) Vh                       W: (d_out, d_in), fp32 math whatever the checkpoint dtype
    principal = U_r diag(S_r) Vh_r         the top-r singular triplets
    W_res = W - principal                  frozen, stored NF4

The residual is computed from the principal part *as stored* (after rounding the factors to their storage dtype),
so `W_res + principal == W` holds exactly in fp32 arithmetic, whatever SVD produced the factors. An approximate
(randomized) SVD therefore never changes the function at init; it only decides how much error NF4 then adds.

QPiSSA-style refinement (T rounds): the quantization error of the residual is folded back into the principal part,

    round 1:     P = svd_r(W)
    round t>1:   P = svd_r(W - deq(Q(W - P_prev)))
    W_res = W - P

which makes deq(Q(W_res)) + P closer to W than deq(Q(W)) alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qosora.config import SVDConfig
from qosora.errors import QosoraError


@dataclass
class Principal:
    """Top-r triplets. U: (d_out, r), S: (r,), Vh: (r, d_in)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def dense(self) -> torch.Tensor:
        return (self.U.float() * self.S.float()) @ self.Vh.float()

    def to(self, dtype: torch.dtype) -> "Principal":
        return Principal(self.U.to(dtype), self.S.to(dtype), self.Vh.to(dtype))


def check_rank(rank: int, shape: tuple[int, int], name: str = "weight") -> None:
    if len(shape) != 2 or min(shape) < 1:
        raise QosoraError(f"{name} has shape {tuple(shape)}, not a (d_out, d_in) matrix: corrupt checkpoint")
    if not 1 <= rank <= min(shape):
        raise QosoraError(
            f"rank {rank} is too large for {name} of shape {tuple(shape)}: use --rank <= {min(shape)}"
        )


def randomized_svd(W: torch.Tensor, q: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko, Martinsson, Tropp 2011) with q columns and `niter` power iterations, O(d_out d_in q).

    The same algorithm as `torch.svd_lowrank`, but seeded through its own generator: it touches no global RNG
    state, so prepare can decompose two weights at once in threads and stay deterministic.
    """
    g = torch.Generator(device=W.device).manual_seed(seed)
    Q = torch.linalg.qr(W @ torch.randn(W.shape[1], q, generator=g, device=W.device, dtype=W.dtype)).Q  # (d_out, q)
    for _ in range(niter):  # re-orthonormalise every half step: fp32 loses the small directions otherwise
        Q = torch.linalg.qr(W.mT @ Q).Q  # (d_in, q)
        Q = torch.linalg.qr(W @ Q).Q     # (d_out, q)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)  # (q, d_in) is small
    return Q @ Ub, S, Vh


def top_r_svd(W: torch.Tensor, rank: int, svd: SVDConfig = SVDConfig()) -> Principal:
    """Top-`rank` singular triplets of W (fp32), by exact or randomized SVD (q = rank + oversample columns)."""
    check_rank(rank, tuple(W.shape))
    W = W.float()
    q = min(rank + svd.oversample, *W.shape)
    if svd.solver == "exact" or q >= min(W.shape) // 2:
        # Small matrices (or a q close to full rank): the exact SVD is both faster and exact.
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    else:
        U, S, Vh = randomized_svd(W, q, svd.niter, svd.seed)
    return Principal(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous())


def principal_split(
    W: torch.Tensor,
    rank: int,
    svd: SVDConfig = SVDConfig(),
    *,
    store_dtype: torch.dtype = torch.float32,
    quant_roundtrip: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Principal, torch.Tensor]:
    """Split W into (principal factors in `store_dtype`, fp32 residual) with `refine_rounds` QPiSSA rounds.

    `quant_roundtrip(R) -> deq(Q(R))` is the residual's quantizer; it is needed only when refine_rounds > 1.
    """
    W = W.float()
    principal = top_r_svd(W, rank, svd).to(store_dtype)
    residual = W - principal.dense()
    for _ in range(svd.refine_rounds - 1):
        if quant_roundtrip is None:
            raise ValueError("refine_rounds > 1 needs quant_roundtrip")
        principal = top_r_svd(W - quant_roundtrip(residual), rank, svd).to(store_dtype)
        residual = W - principal.dense()
    return principal, residual


def relative_error(approx: torch.Tensor, W: torch.Tensor) -> float:
    """||approx - W||_F / ||W||_F, in fp32."""
    W = W.float()
    return float(torch.linalg.matrix_norm(approx.float() - W) / torch.linalg.matrix_norm(W).clamp_min(1e-30))
