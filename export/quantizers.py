"""Blockwise int4 quantizers for deployment, written for NF4-derived weights.

A weight W [N, K] is cut into blocks of `block_size` along K; each block b gets a scale s_b (and, asymmetric, a
zero point z_b) and 4-bit codes u in [0, 15], deq(W)[n, k] = (u[n, k] - z_b) * s_b (z_b = 8 when symmetric; the
format is `int4.Int4Blocks`). Each scheme is one function registered under its name (`register_int4_scheme`).

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
term (`int4.split_float_zero_points`); onnxruntime's own CPU kernel for float zero points is ~10x slower.

All functions are numpy, float32 in and out; no framework import.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from qosora.export.int4 import Int4Blocks, concat_rows
from qosora.export.options import INT4_SCHEMES, Int4Scheme

# Weights are quantized in row chunks of about _CHUNK_ELEMENTS (4 MiB of float32); those of _PARALLEL_MIN_ELEMENTS
# or more in parallel threads.
_CHUNK_ELEMENTS = 1 << 20
_WORKERS = min(4, os.cpu_count() or 1)
_PARALLEL_MIN_ELEMENTS = 1 << 18

# Divisors c searched by "sym-search" (s = absmax / c). 7.0 is on the grid.
_SEARCH_DIVISORS = np.concatenate([np.linspace(5.6, 7.0, 8), np.linspace(7.1, 8.0, 7)]).astype(np.float32)


# A scheme: blocks of one row chunk, float32 [N, nb, block_size] (zero-padded along K), and K -> Int4Blocks.
Quantizer = Callable[[np.ndarray, int], Int4Blocks]
QUANTIZERS: dict[str, Quantizer] = {}


def register_int4_scheme(name: str) -> Callable[[Quantizer], Quantizer]:
    """`@register_int4_scheme("name")` on a `Quantizer` makes it `quantize_int4(w, bs, "name")`. A new scheme is that
    function plus its name in `options.Int4Scheme` (the CLI's choices and the validation read the Literal; the
    registry is checked against it at import)."""
    def register(fn: Quantizer) -> Quantizer:
        QUANTIZERS[name] = fn
        return fn

    return register


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[N, K] -> [N, nb, block_size], zero-padded."""
    n, k = w.shape
    nb = -(-k // block_size)
    if nb * block_size != k:
        w = np.pad(w, ((0, 0), (0, nb * block_size - k)))
    return w.reshape(n, nb, block_size)


def quantize_int4(w: np.ndarray, block_size: int, scheme: Int4Scheme = "sym",
                  chunk_elements: int = _CHUNK_ELEMENTS) -> Int4Blocks:
    """Quantize W [N, K] float32 blockwise along K. See the module docstring for the schemes.

    Rows are processed `chunk_elements` at a time: the schemes keep several weight-sized temporaries, and an
    lm_head (vocab x hidden) would otherwise multiply the export's peak memory.
    """
    if scheme not in QUANTIZERS:
        raise ValueError(f"unknown int4 scheme {scheme!r}; choose one of {', '.join(QUANTIZERS)}")
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


def _quantize_rows(w: np.ndarray, block_size: int, scheme: Int4Scheme) -> Int4Blocks:
    return QUANTIZERS[scheme](_blocks(w, block_size), w.shape[1])


# -- the schemes (see the module docstring) ---------------------------------------------------------------------

@register_int4_scheme("sym")
def _sym(wb: np.ndarray, k: int) -> Int4Blocks:
    return _symmetric(wb, k, _absmax(wb) / np.float32(7.0))


@register_int4_scheme("sym-search")
def _sym_search(wb: np.ndarray, k: int) -> Int4Blocks:
    absmax = _absmax(wb)
    scale = absmax / np.float32(7.0)
    best = _sq_error(wb, scale)
    for c in _SEARCH_DIVISORS:  # one candidate at a time: memory stays ~ one copy of the weight
        cand = absmax / c
        err = _sq_error(wb, cand)
        better = err < best
        scale = np.where(better, cand, scale)
        best = np.where(better, err, best)
    return _symmetric(wb, k, scale)


@register_int4_scheme("asym")
def _asym_min_max(wb: np.ndarray, k: int) -> Int4Blocks:
    n, _, block_size = wb.shape
    lo = np.minimum(wb.min(axis=-1, keepdims=True), 0.0)
    hi = np.maximum(wb.max(axis=-1, keepdims=True), 0.0)
    scale = (hi - lo) / 15.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15)
    codes = np.clip(np.rint(wb / scale) + zp, 0, 15).astype(np.uint8)
    return Int4Blocks(codes.reshape(n, -1), scale[..., 0], zp[..., 0].astype(np.uint8), block_size, k)


@register_int4_scheme("asym-ls")
def _asym_ls(wb: np.ndarray, k: int) -> Int4Blocks:
    return _asym_least_squares(wb, k, integer_zero_point=True)


@register_int4_scheme("asym-ls-float")
def _asym_ls_float(wb: np.ndarray, k: int) -> Int4Blocks:
    return _asym_least_squares(wb, k, integer_zero_point=False)


def _absmax(wb: np.ndarray) -> np.ndarray:
    """Per-block max |w| [N, nb, 1], 1 for all-zero blocks (their codes are 8 whatever the scale)."""
    absmax = np.abs(wb).max(axis=-1, keepdims=True)
    return np.where(absmax == 0, 1.0, absmax).astype(np.float32)


def _symmetric(wb: np.ndarray, k: int, scale: np.ndarray) -> Int4Blocks:
    """Codes u = clip(round(w / s), -8, 7) + 8 for scales s [N, nb, 1]."""
    n, _, block_size = wb.shape
    codes = (np.clip(np.rint(wb / scale), -8, 7) + 8).astype(np.uint8)
    return Int4Blocks(codes.reshape(n, -1), scale[..., 0].astype(np.float32), None, block_size, k)


def _sq_error(wb: np.ndarray, scale: np.ndarray) -> np.ndarray:
    q = np.clip(np.rint(wb / scale), -8, 7)
    return np.square(q * scale - wb).sum(axis=-1, keepdims=True)


def _asym_least_squares(wb: np.ndarray, k: int, integer_zero_point: bool, rounds: int = 10) -> Int4Blocks:
    """Per block, alternate u = clip(round(w / s + z), 0, 15) and a least-squares fit of w ~ s (u - z).

    Each round fits (s, m) of w ~ s u + m by least squares. With `integer_zero_point` (the default, "asym-ls") z =
    round(-m / s) and s is refitted with z fixed: uint8 zero points keep MatMulNBits on its fast kernels. Without
    ("asym-ls-float") z = -m / s stays a float: lower error; the exporter splits it into an integer zero point and a
    block offset (`split_float_zero_points`) to stay on the fast kernel.
    """
    n, _, bs = wb.shape
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
    return Int4Blocks(codes.reshape(n, -1), s[..., 0], zero_points, bs, k)


@register_int4_scheme("hqq")
def _half_quadratic(wb: np.ndarray, k: int, beta: float = 10.0, kappa: float = 1.01, iters: int = 12) -> Int4Blocks:
    """HQQ (Badri & Shaji, 2023): the scale stays at (max - min) / 15, so the block's range fits the grid, and the
    float zero point, started at round(-min / s) (0 on the grid), minimises an l_p error (p = 2/3 here, 0.7 in the
    paper; p < 1: a few large errors cost less than many medium ones) by half-quadratic splitting: alternate the
    codes u, a sparse error e = shrink_p(w - deq, beta) and z = mean(u - (w - e) / s), beta growing by kappa. Each
    block keeps the z of its lowest mean absolute error (on SmolLM2 the error stops falling after ~12 rounds)."""
    n, _, block_size = wb.shape
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


assert set(QUANTIZERS) == set(INT4_SCHEMES), f"int4 schemes registered {sorted(QUANTIZERS)} != Int4Scheme"
