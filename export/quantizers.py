"""Blockwise int4 quantizers for deployment, written for NF4-derived weights.

A weight W [N, K] (nn.Linear layout, N = d_out, K = d_in) is cut into blocks of `block_size` along K; each block
b gets a scale s_b (and, asymmetric, a zero point z_b) and 4-bit codes u in [0, 15]:

    deq(W)[n, k] = (u[n, k] - z_b) * s_b            z_b = 8 when symmetric

Why our own: onnxruntime's symmetric quantizer uses s = absmax / 8 on the grid [-8, 7], so the largest positive
weight of a block is clipped to 7/8 of itself. An NF4 block always holds +absmax or -absmax exactly (the NF4 code
book ends at +-1), and after a merge W_merged = deq(NF4(W_res)) + B A those outliers stay; on SmolLM2 that clipping
sent perplexity from 13.7 to 6e8. Schemes here:

    "sym"         s = absmax / 7: the grid [-7, 7] holds +-absmax exactly, code -8 unused.
    "sym-search"  s = absmax / c, c searched per block over a small grid around 7 (c = 7 included, so never worse
                  than "sym" in squared error), codes clipped to [-8, 7]; uses -8 where it helps.
    "asym"        s = (max - min) / 15, z = round(-min / s): min and max of the block are on the grid.
    "asym-ls"     asym start, then alternate: codes given (s, z); (s, z) by least squares given the codes
                  (w ~ s (u - z) per block, z rounded to an integer), 10 rounds. Lowest weight error of the
                  integer-zero-point schemes; finds a grid the weights already sit on.
    "asym-ls-float"  the same with a float zero point: the grid's offset is free, so blocks that already sit on
                  an offset grid (weights that came from GGUF Q4_1, or an NF4 block's asymmetric range) keep it.
    "hqq"         (default) half-quadratic quantization (Badri & Shaji, 2023): min/max scale, float zero point
                  fitted to an l_p error with p < 1. On SmolLM2 it ties onnxruntime's HQQ quantizer in perplexity;
                  the least-squares schemes have lower weight error but clip block extremes and measured worse.

Float zero points ("hqq", "asym-ls-float") run on MatMulNBits' fast uint8-zero-point kernel plus a block-offset
term (see `split_float_zero_points`); onnxruntime's own CPU kernel for float zero points is ~10x slower.

All functions are numpy, float32 in and out; no framework import.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

Int4Scheme = Literal["sym", "sym-search", "asym", "asym-ls", "asym-ls-float", "hqq"]
INT4_SCHEMES: tuple[str, ...] = ("sym", "sym-search", "asym", "asym-ls", "asym-ls-float", "hqq")

# Row chunks of weights this large are quantized in parallel threads.
_WORKERS = min(4, os.cpu_count() or 1)
_PARALLEL_MIN_ELEMENTS = 1 << 18

# Divisors c searched by "sym-search" (s = absmax / c). 7.0 is on the grid.
_SEARCH_DIVISORS = np.concatenate([np.linspace(5.6, 7.0, 8), np.linspace(7.1, 8.0, 7)]).astype(np.float32)


@dataclass
class Int4Blocks:
    """int4 codes of a weight [N, K], K padded with zeros up to a multiple of block_size.

    codes        uint8 [N, K_pad], values 0..15
    scales       float32 [N, K_pad / block_size]
    zero_points  uint8 [N, K_pad / block_size] (asymmetric schemes; float32 for "asym-ls-float"), or None (8)
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int
    k: int  # K before padding

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] -> [N, nb, block_size], zero-padded."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = np.pad(w, ((0, 0), (0, nb * block_size - k)))
    return w.reshape(n, nb, block_size)


def quantize_int4(w: np.ndarray, block_size: int, scheme: Int4Scheme = "sym", chunk_elements: int = 1 << 20) -> Int4Blocks:
    """Quantize W [N, K] float32 blockwise along K. See the module docstring for the schemes.

    Rows are processed `chunk_elements` at a time: the schemes keep several weight-sized temporaries, and an
    lm_head (vocab x hidden) would otherwise multiply the export's peak memory.
    """
    if scheme not in INT4_SCHEMES:
        raise ValueError(f"unknown int4 scheme {scheme!r}; choose one of {INT4_SCHEMES}")
    w = np.asarray(w, dtype=np.float32)
    rows = max(1, chunk_elements // max(1, w.shape[1]))
    if w.size >= _PARALLEL_MIN_ELEMENTS and _WORKERS > 1:
        rows = min(rows, -(-w.shape[0] // _WORKERS))
    if w.shape[0] <= rows:
        return _quantize_rows(w, block_size, scheme)
    starts = range(0, w.shape[0], rows)
    work = lambda i: _quantize_rows(w[i:i + rows], block_size, scheme)  # noqa: E731
    if _WORKERS > 1:  # numpy releases the GIL in its loops; rows are independent, so the result is the same
        with ThreadPoolExecutor(_WORKERS) as pool:
            return concat_rows(list(pool.map(work, starts)))
    return concat_rows([work(i) for i in starts])


def concat_rows(parts: list[Int4Blocks]) -> Int4Blocks:
    """Stack quantized weights along N (blocks run along K, so each row's codes are unchanged): the int4 form of
    torch.cat([W_1, W_2, ...]) for a fused q/k/v or gate/up projection."""
    first = parts[0]
    if any(p.k != first.k or p.block_size != first.block_size or (p.zero_points is None) != first.symmetric
           for p in parts):
        raise ValueError("concat_rows: parts differ in K, block size or zero points")
    zps = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    return Int4Blocks(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]), zps,
                      first.block_size, first.k)


def _quantize_rows(w: np.ndarray, block_size: int, scheme: Int4Scheme) -> Int4Blocks:
    n, k = w.shape
    wb = _blocks(w, block_size)  # [N, nb, bs]
    if scheme in ("asym-ls", "asym-ls-float"):
        return _asym_least_squares(wb, n, k, block_size, integer_zero_point=scheme == "asym-ls")
    if scheme == "hqq":
        return _half_quadratic(wb, n, k, block_size)
    if scheme == "asym":
        lo = np.minimum(wb.min(axis=-1, keepdims=True), 0.0)
        hi = np.maximum(wb.max(axis=-1, keepdims=True), 0.0)
        scale = (hi - lo) / 15.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, 15)
        codes = np.clip(np.rint(wb / scale) + zp, 0, 15).astype(np.uint8)
        return Int4Blocks(codes.reshape(n, -1), scale[..., 0], zp[..., 0].astype(np.uint8), block_size, k)

    absmax = np.abs(wb).max(axis=-1, keepdims=True)
    absmax = np.where(absmax == 0, 1.0, absmax).astype(np.float32)
    if scheme == "sym":
        scale = absmax / np.float32(7.0)
    else:
        scale = absmax / np.float32(7.0)
        best = _sq_error(wb, scale)
        for c in _SEARCH_DIVISORS:  # one candidate at a time: memory stays ~ one copy of the weight
            cand = absmax / c
            err = _sq_error(wb, cand)
            better = err < best
            scale = np.where(better, cand, scale)
            best = np.where(better, err, best)
    codes = (np.clip(np.rint(wb / scale), -8, 7) + 8).astype(np.uint8)
    return Int4Blocks(codes.reshape(n, -1), scale[..., 0].astype(np.float32), None, block_size, k)


def _asym_least_squares(wb: np.ndarray, n: int, k: int, block_size: int, integer_zero_point: bool = True,
                        rounds: int = 10) -> Int4Blocks:
    """Per block, alternate u = clip(round(w / s + z), 0, 15) and a least-squares fit of w ~ s (u - z).

    Each round fits (s, m) of w ~ s u + m by least squares. With `integer_zero_point` (the default, "asym-ls") z =
    round(-m / s) and s is refitted with z fixed: uint8 zero points keep MatMulNBits on its fast kernels. Without
    ("asym-ls-float") z = -m / s stays a float: lower error; the exporter splits it into an integer zero point and a
    block offset (`split_float_zero_points`) to stay on the fast kernel.
    """
    bs = wb.shape[-1]
    lo, hi = wb.min(axis=-1, keepdims=True), wb.max(axis=-1, keepdims=True)
    if integer_zero_point:  # an integer z in [0, 15] needs 0 inside [lo, hi]
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = np.maximum((hi - lo) / 15.0, 1e-12).astype(np.float32)
    z = -lo / s
    z = (np.clip(np.rint(z), 0, 15) if integer_zero_point else z).astype(np.float32)
    sw = wb.sum(axis=-1, keepdims=True)
    u = np.empty_like(wb)  # the codes, as float, rewritten in place each round

    def assign_codes() -> None:  # u = clip(round(w / s + z), 0, 15)
        np.divide(wb, s, out=u)
        np.add(u, z, out=u)
        np.rint(u, out=u)
        np.clip(u, 0, 15, out=u)

    for _ in range(rounds):
        assign_codes()
        # Least squares of w ~ s u + m over each block from three sums (no block-sized temporaries).
        su = u.sum(axis=-1, keepdims=True)
        suu = np.einsum("...k,...k->...", u, u)[..., None]
        suw = np.einsum("...k,...k->...", u, wb)[..., None]
        var = suu - su * su / bs
        s_ls = (suw - su * sw / bs) / np.maximum(var, 1e-12)
        ok = (var > 1e-9) & (s_ls > 1e-12)  # constant blocks keep their start
        s_ls = np.where(ok, s_ls, 1.0)
        z_new = (su - sw / s_ls) / bs  # = -m / s
        if integer_zero_point:  # round z, then refit s alone: s = sum w (u - z) / sum (u - z)^2
            z_new = np.clip(np.rint(z_new), 0, 15)
            s_ls = (suw - z_new * sw) / np.maximum(suu - 2 * z_new * su + bs * z_new * z_new, 1e-12)
            ok &= s_ls > 1e-12
        s = np.where(ok, s_ls, s).astype(np.float32)
        z = np.where(ok, z_new, z).astype(np.float32)
    assign_codes()
    codes = u.astype(np.uint8)
    zero_points = z[..., 0].astype(np.uint8) if integer_zero_point else z[..., 0].astype(np.float32)
    return Int4Blocks(codes.reshape(n, -1), s[..., 0], zero_points, block_size, k)


def _half_quadratic(wb: np.ndarray, n: int, k: int, block_size: int, beta: float = 10.0, kappa: float = 1.01,
                    iters: int = 12) -> Int4Blocks:
    """HQQ (Badri & Shaji, 2023): the scale stays at (max - min) / 15, so the block's range fits the grid, and the
    float zero point, started at round(-min / s) (0 on the grid), minimises an l_p error (p = 2/3 here, 0.7 in the
    paper; p < 1: a few large errors cost less than many medium ones) by half-quadratic splitting: alternate the
    codes u, a sparse error e = shrink_p(w - deq, beta) and z = mean(u - (w - e) / s), beta growing by kappa. Each
    block keeps the z of its lowest mean absolute error (on SmolLM2 the error stops falling after ~12 rounds)."""
    lo, hi = wb.min(axis=-1, keepdims=True), wb.max(axis=-1, keepdims=True)
    s = np.maximum((hi - lo) / 15.0, 1e-12).astype(np.float32)
    inv_s = (1.0 / s).astype(np.float32)
    z = np.rint(-lo * inv_s).astype(np.float32)
    best_err, best_z = np.full_like(z, np.inf), z
    w_mean = wb.mean(axis=-1, keepdims=True)
    u, r = np.empty_like(wb), np.empty_like(wb)
    for _ in range(iters):
        np.multiply(wb, inv_s, out=u)
        np.add(u, z, out=u)
        np.clip(np.rint(u, out=u), 0, 15, out=u)
        np.subtract(u, z, out=r)
        np.multiply(r, s, out=r)
        np.subtract(wb, r, out=r)  # r = w - deq(w)
        a = np.abs(r)
        err = a.mean(axis=-1, keepdims=True)
        better = err < best_err
        best_err, best_z = np.where(better, err, best_err), np.where(better, z, best_z)
        # |e| = max(|r| - |r|^(p - 1) / beta, 0) with p = 2/3: |r|^(-1/3) is a cube root, ~5x cheaper than power
        shrink = np.maximum(a - 1.0 / (beta * np.cbrt(np.maximum(a, 1e-12))), 0)
        e_mean = np.copysign(shrink, r).mean(axis=-1, keepdims=True)
        z = (u.mean(axis=-1, keepdims=True) - (w_mean - e_mean) * inv_s).astype(np.float32)  # mean(u - (w - e) / s)
        beta *= kappa
    codes = np.clip(np.rint(wb * inv_s + best_z), 0, 15).astype(np.uint8)
    return Int4Blocks(codes.reshape(n, -1), s[..., 0], best_z[..., 0].astype(np.float32), block_size, k)


def _sq_error(wb: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(wb / scale), -8, 7)
    return np.square(q * scale - wb).sum(axis=-1, keepdims=True)


def split_float_zero_points(q: Int4Blocks) -> tuple[np.ndarray, np.ndarray]:
    """Float zero points z -> (integer zero points z_i uint8, block offsets c float32), both [N, nb], with

        s (u - z) = s (u - z_i) + c,     z_i = clip(round(z), 0, 15),  c = s (z_i - z)

    so a float-zero-point weight runs as MatMulNBits with uint8 zero points (its fast kernels) plus a small
    block-offset term: x W^T = MatMulNBits(x) + blocksum(x) c^T, blocksum(x)[b] = sum of x over block b.
    """
    z = q.zero_points.astype(np.float32)
    zi = np.clip(np.rint(z), 0, 15)
    return zi.astype(np.uint8), (q.scales * (zi - z)).astype(np.float32)


def dequantize_int4(q: Int4Blocks) -> np.ndarray:
    """Int4Blocks -> float32 [N, K]."""
    n = q.codes.shape[0]
    codes = q.codes.reshape(n, -1, q.block_size).astype(np.float32)
    zp = np.float32(8.0) if q.zero_points is None else q.zero_points[..., None].astype(np.float32)  # uint8 or float
    return ((codes - zp) * q.scales[..., None]).reshape(n, -1)[:, : q.k]


def pack_low_first(codes: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [..., 2m] -> uint8 [..., m]; element 2j in the low nibble, 2j+1 in the high nibble.

    This is the order of MatMulNBits, GatherBlockQuantized and ONNX's INT4 tensors.
    """
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    c = codes.astype(np.uint8)
    return (c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)


def relative_error(w: np.ndarray, w_hat: np.ndarray, chunk_rows: int = 4096) -> float:
    """||W - W_hat||_F / ||W||_F, accumulated in float64 a few thousand rows at a time (an lm_head in float64
    would be 8 bytes a parameter)."""
    num = den = 0.0
    for i in range(0, w.shape[0], chunk_rows):
        w64 = np.asarray(w[i:i + chunk_rows], dtype=np.float64)
        num += float(np.square(w64 - w_hat[i:i + chunk_rows]).sum())
        den += float(np.square(w64).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def int4_relative_error(w: np.ndarray, q: Int4Blocks, chunk_rows: int = 4096) -> float:
    """relative_error(w, dequantize_int4(q)) without materialising the whole dequantized weight."""
    num = den = 0.0
    for i in range(0, w.shape[0], chunk_rows):
        part = Int4Blocks(q.codes[i:i + chunk_rows], q.scales[i:i + chunk_rows],
                          None if q.zero_points is None else q.zero_points[i:i + chunk_rows], q.block_size, q.k)
        w64 = np.asarray(w[i:i + chunk_rows], dtype=np.float64)
        num += float(np.square(w64 - dequantize_int4(part)).sum())
        den += float(np.square(w64).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0
