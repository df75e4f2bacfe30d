"""GPTQ (Frantar et al., 2022): int4 codes of one linear that minimise its output error on calibration inputs,
written onto our blockwise int4 format (`int4.Int4Blocks`) and our data-free schemes' grids (`quantizers`).

For a linear W [N, K] and calibration inputs X [K, T] the loss is the output error

    L(Q) = ||(W - Q) X||_F^2 = tr((W - Q) H (W - Q)^T),      H = X X^T  [K, K]  (`calibration.collect_hessians`)

Round-to-nearest (RTN) minimises it only when H is diagonal. GPTQ quantizes the columns left to right and, after
each, moves the error it made onto the columns not yet quantized (optimal brain surgeon, OBS):

    column j:  u_j = nearest grid code of w_j,   q_j = deq(u_j),   e_j = (w_j - q_j) / [H_F^-1]_jj
               w_F -= e_j [H_F^-1]_{j,F}               F = the columns after j,  H_F^-1 their inverse Hessian

Rows of the upper Cholesky factor U of H^-1 (H^-1 = U^T U) give every [H_F^-1]_{j,F} / [H_F^-1]_jj at once
(U_{j,F} / U_jj), so nothing is re-inverted; updates to columns beyond the current batch of `lazy_batch` columns
are deferred and applied as one matrix product per batch (the paper's "lazy batch" updates).

The grid: each (row, K-block) group gets its scale and zero point once, by the same registered scheme the
data-free export uses ("sym": absmax / 7, "asym": min/max, "hqq": ..., `quantizers.QUANTIZERS`): GPTQ with groups,
with our NF4-aware grid rules as its starting points. `grid="dynamic"` fits it when the sweep reaches the group's
first column, to the group's *current* (already error-updated) weights; `grid="static"` fits it to the original
weights before the sweep (GPTQ's "static groups"), so the grid is the data-free export's and only the rounding is
compensated. Static keeps a grid the weights already lie near (a checkpoint that went through GGUF Q4_1 once) that
the error updates would move them off. The result is an `Int4Blocks` the MatMulNBits / DequantizeLinear
emitters write unchanged.

Dead inputs (H_jj = 0: the input is always 0) get H_jj = 1 and W[:, j] = 0, as in GPTQ. H is damped by
`damp * mean(diag H)` on its diagonal before the factorisation. Runs on W's device (CPU or CUDA) in float32
(float64 when W is float64); deterministic. Tested against a plain column-by-column OBS sweep with an explicitly
updated inverse Hessian in tests/test_export_gptq.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qosora.export.int4 import Int4Blocks, dequantize_int4
from qosora.export.options import CALIBRATION_GRIDS, CalibrationGrid, Int4Scheme
from qosora.export.quantizers import QUANTIZERS, quantize_int4

LAZY_BATCH = 128  # columns per deferred update (the GPTQ paper's B); rounded up to a multiple of the block size
_DAMP_RETRIES = 4  # a Hessian that is not positive definite after damping gets 10x the damping, this many times
_ERROR_ROWS = 4096  # rows per chunk of tr(A H A^T) (A H is chunk x K)


@dataclass
class GPTQResult:
    """One linear quantized by `gptq_quantize`.

    q                 the int4 weight, in the representation the scheme's data-free quantizer returns
    output_error      ||(W - deq(q)) X||_F / ||W X||_F = sqrt(tr(E H E^T) / tr(W H W^T)), E = W - deq(q)
    rtn_output_error  the same for the data-free scheme on W (`quantize_int4`: what export writes uncalibrated)
    damp              the absolute damping lambda added to diag(H)
    """

    q: Int4Blocks
    output_error: float
    rtn_output_error: float
    damp: float


@dataclass
class InverseHessian:
    """H prepared for the sweep, once per input: q/k/v (and gate/up) read the same x, so they share one.

    h     float [K, K]  H itself, for the error figures
    u     float [K, K]  upper, (H + damp I)^-1 = U^T U, rows and columns in sweep order (`perm`)
    perm  int64 [K]     sweep order: 0..K-1, or decreasing diag(H) with act_order
    dead  bool [K]      inputs that are always 0 (H_jj = 0); their weights are set to 0
    damp  float         the absolute damping lambda
    """

    h: torch.Tensor
    u: torch.Tensor
    perm: torch.Tensor
    dead: torch.Tensor
    damp: float


def inverse_hessian(h: torch.Tensor, *, damp: float = 0.01, act_order: bool = False,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> InverseHessian:
    """H = sum x x^T [K, K] -> `InverseHessian` on `device` (default: H's) in `dtype` (float32, or float64)."""
    hess = h.detach().to(device=device or h.device, dtype=dtype).clone()  # [K, K]
    dead = torch.diagonal(hess) == 0
    hess[dead, dead] = 1.0
    k = hess.shape[0]
    perm = (torch.argsort(torch.diagonal(hess), descending=True, stable=True) if act_order
            else torch.arange(k, device=hess.device))
    permuted = hess[perm][:, perm] if act_order else hess.clone()
    u, lam = _inverse_cholesky(permuted, damp)
    hess[dead, dead] = 0.0
    return InverseHessian(hess, u, perm, dead, lam)


def gptq_quantize(w: torch.Tensor, h: torch.Tensor | InverseHessian, block_size: int, scheme: Int4Scheme = "sym",
                  *, damp: float = 0.01, act_order: bool = False, lazy_batch: int = LAZY_BATCH,
                  errors: bool = True, grid: CalibrationGrid = "dynamic") -> GPTQResult:
    """Quantize W [N, K] (float32 or float64, any device) to blockwise int4, given H = sum x x^T [K, K] or its
    `inverse_hessian` (then `damp` and `act_order` are the ones it was made with).

    act_order: quantize columns in order of decreasing H_jj (GPTQ's "desc_act"); the blocks stay contiguous along
    the original K, each block's grid is chosen when its first column in that order is reached. The GPTQ error is
    free (below); errors=False skips the two traces tr(W H W^T) and RTN's (each N K^2, like the sweep): NaN then.
    grid: "dynamic" or "static" (the module docstring).
    """
    if grid not in CALIBRATION_GRIDS:
        raise ValueError(f"unknown GPTQ grid {grid!r}; choose one of {', '.join(CALIBRATION_GRIDS)}")
    if scheme not in QUANTIZERS:
        raise ValueError(f"unknown int4 scheme {scheme!r}; choose one of {', '.join(QUANTIZERS)}")
    n, k = w.shape
    if tuple(h.h.shape if isinstance(h, InverseHessian) else h.shape) != (k, k):
        raise ValueError(f"gptq_quantize: H is not [{k}, {k}] as W [{n}, {k}] needs")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    inv = h if isinstance(h, InverseHessian) else inverse_hessian(h, damp=damp, act_order=act_order,
                                                                   device=w.device, dtype=dt)
    weight = w.detach().to(dt).clone()  # [N, K]
    dead = inv.dead.to(w.device)
    weight[:, dead] = 0.0
    perm = inv.perm.to(w.device)
    q, err_sq = _sweep(weight[:, perm], inv.u.to(device=w.device, dtype=dt), perm, block_size, scheme,
                       -(-lazy_batch // block_size) * block_size, static=grid == "static")
    if not errors:
        return GPTQResult(q, float("nan"), float("nan"), inv.damp)
    # The sweep leaves W - Q = Err U, so ||Err||^2 = tr(E H' E^T), H' = H + lambda I + (1 on dead inputs' diagonal)
    # the matrix factored, E from the dead-zeroed W (H ignores dead columns): tr(E H E^T) for free.
    hess = inv.h.to(device=w.device, dtype=dt)
    e = weight - _dequantized(q, weight)
    gptq_sq = err_sq - inv.damp * float(e.double().square().sum()) - float(e[:, dead].double().square().sum())
    w_ref = w.detach().to(dt)
    rtn = quantize_int4(w_ref.float().cpu().numpy(), block_size, scheme)
    ref = h_trace(w_ref, hess)
    rtn_sq = h_trace(w_ref - _dequantized(rtn, w_ref), hess)
    ratio = lambda sq: (max(sq, 0.0) / ref) ** 0.5 if ref > 0 else 0.0  # noqa: E731
    return GPTQResult(q, ratio(gptq_sq), ratio(rtn_sq), inv.damp)


def _inverse_cholesky(hess: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The upper U with (H + lambda I)^-1 = U^T U, lambda = damp * mean(diag H) (x10 while H is not positive
    definite; H is damped in place), from one Cholesky factorisation. With J the exchange matrix,
    J H J = M M^T (M lower) gives H = R R^T with R = J M J upper, so H^-1 = R^-T R^-1 and U = R^-1 = J M^-1 J:
    half the work of GPTQ's cholesky -> cholesky_inverse -> cholesky."""
    diag = torch.diagonal(hess)
    undamped = diag.clone()
    lam = damp * float(undamped.mean())
    for _ in range(_DAMP_RETRIES):
        diag.copy_(undamped + lam)  # in place: H is K x K, a copy per try would add up on an 11008-wide input
        m, info = torch.linalg.cholesky_ex(torch.flip(hess, (0, 1)))
        if int(info) == 0:
            eye = torch.eye(hess.shape[0], dtype=hess.dtype, device=hess.device)
            return torch.flip(torch.linalg.solve_triangular(m, eye, upper=False), (0, 1)), lam
        lam *= 10.0
    raise ValueError(f"gptq_quantize: the Hessian is not positive definite even with damping {lam / 10:g} "
                     "(calibration inputs with NaN/inf?)")


def _sweep(weight: torch.Tensor, u_inv: torch.Tensor, perm: torch.Tensor, block_size: int, scheme: Int4Scheme,
           lazy_batch: int, static: bool = False) -> tuple[Int4Blocks, float]:
    """The OBS sweep over the (permuted) columns of weight [N, K], updated in place; u_inv [K, K] upper. Returns
    the codes, scales and zero points in the original column order, and ||Err||_F^2 (the damped loss). static:
    each group's grid from the weights as they were before the sweep."""
    n, k = weight.shape
    original = weight.clone() if static else None
    nb = -(-k // block_size)
    perm_cpu = perm.cpu()
    group = (perm_cpu // block_size).tolist()  # group of each processed column
    position = torch.empty(k, dtype=torch.long)
    position[perm_cpu] = torch.arange(k)  # processing index of each original column
    members = [position[g * block_size: min(k, (g + 1) * block_size)].to(weight.device) for g in range(nb)]
    codes = np.empty((n, nb * block_size), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zeros: np.ndarray | None = None  # allocated on the first group, with the scheme's zero-point dtype
    scale_t = torch.empty((n, nb), dtype=torch.float64, device=weight.device)
    zero_t = torch.full((n, nb), 8.0, dtype=torch.float64, device=weight.device)
    codes_t = torch.empty((n, k), dtype=torch.uint8, device=weight.device)  # processing order
    seen = [False] * nb
    err_sq = 0.0

    for i1 in range(0, k, lazy_batch):
        i2 = min(i1 + lazy_batch, k)
        w1 = weight[:, i1:i2].clone()  # [N, b], the batch's columns with every update so far
        err1 = torch.zeros_like(w1)  # [N, b], e_j of the batch's columns
        u1 = u_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group[i1 + i]
            if not seen[g]:  # the group's first column: its grid, from its current (or original) weights
                seen[g] = True
                cur = (original[:, members[g]] if original is not None
                       else _current_columns(members[g], weight, w1, err1, u_inv, i1, i2, i))
                qb = _group_grid(cur, block_size, scheme)
                zeros = _store_grid(qb, g, k, scales, codes, zeros, scale_t, zero_t)
            col = w1[:, i]
            s, z = scale_t[:, g], zero_t[:, g]
            u = torch.clamp(torch.round(col.double() / s + z), 0, 15)  # nearest grid point, in float64
            deq = ((u - z) * s).to(col.dtype)
            codes_t[:, i1 + i] = u.to(torch.uint8)
            e = (col - deq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        weight[:, i2:] -= err1 @ u_inv[i1:i2, i2:]  # the deferred updates of the later columns
        err_sq += float(err1.double().square().sum())

    codes[:, perm_cpu.numpy()] = codes_t.cpu().numpy()
    return Int4Blocks(codes, scales, zeros, block_size, k), err_sq


def _current_columns(cols: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor,
                     u_inv: torch.Tensor, i1: int, i2: int, i: int) -> torch.Tensor:
    """Current values [N, len(cols)] of not-yet-quantized processed columns `cols` while at column i1 + i: those in
    the batch are in w1; later ones still lack the batch's deferred updates from columns i1 .. i1 + i - 1."""
    if int(cols.max()) < i2:
        return w1[:, cols - i1]
    out = weight[:, cols].clone()
    inside = cols < i2
    out[:, inside] = w1[:, cols[inside] - i1]
    later = cols[~inside]
    out[:, ~inside] -= err1[:, :i] @ u_inv[i1:i1 + i][:, later]
    return out


def _group_grid(cur: torch.Tensor, block_size: int, scheme: Int4Scheme) -> Int4Blocks:
    """The scheme's grid of one block column [N, m <= block_size], zero-padded as `quantize_int4` pads K."""
    block = cur.float().cpu().numpy()
    if block.shape[1] < block_size:
        block = np.pad(block, ((0, 0), (0, block_size - block.shape[1])))
    return QUANTIZERS[scheme](block[:, None, :], block_size)


def _store_grid(qb: Int4Blocks, g: int, k: int, scales: np.ndarray, codes: np.ndarray, zeros: np.ndarray | None,
                scale_t: torch.Tensor, zero_t: torch.Tensor) -> np.ndarray | None:
    """Record group g's grid (and the scheme's codes for K's zero padding); returns the zero-point array."""
    bs = qb.block_size
    scales[:, g] = qb.scales[:, 0]
    scale_t[:, g] = torch.from_numpy(qb.scales[:, 0].astype(np.float64)).to(scale_t.device)
    pad = (g + 1) * bs - k
    if pad > 0:
        codes[:, k:] = qb.codes[:, bs - pad:]
    if qb.zero_points is None:
        return None
    if zeros is None:
        zeros = np.empty(scales.shape, qb.zero_points.dtype)
    zeros[:, g] = qb.zero_points[:, 0]
    zero_t[:, g] = torch.from_numpy(qb.zero_points[:, 0].astype(np.float64)).to(zero_t.device)
    return zeros


def _dequantized(q: Int4Blocks, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(dequantize_int4(q)).to(device=like.device, dtype=like.dtype)


def h_trace(a: torch.Tensor, h: torch.Tensor) -> float:
    """tr(A H A^T) = ||A X||_F^2 for H = X X^T, A [N, K], rows in chunks (A H is chunk x K)."""
    return sum(float(((a[r:r + _ERROR_ROWS] @ h) * a[r:r + _ERROR_ROWS]).sum())
               for r in range(0, a.shape[0], _ERROR_ROWS))
