"""The blockwise int4 weight format (`Int4Blocks`) and what reads it: dequantization, nibble packing, stacking, the
split of float zero points, and the relative error of a quantized weight.

A weight W [N, K] (nn.Linear layout, N = d_out, K = d_in) is cut into blocks of `block_size` along K; each block
b has a scale s_b (and, asymmetric, a zero point z_b) and 4-bit codes u in [0, 15]:

    deq(W)[n, k] = (u[n, k] - z_b) * s_b            z_b = 8 when symmetric

How the codes are chosen is `quantizers`; how they become ONNX initializers is `linear`. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Int4Blocks:
    """int4 codes of a weight [N, K], K padded with zeros up to a multiple of block_size.

    codes        uint8 [N, K_pad], values 0..15
    scales       float32 [N, K_pad / block_size]
    zero_points  uint8 [N, K_pad / block_size] (asymmetric schemes; float32 for "asym-ls-float" and "hqq"),
                 or None (8)
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    block_size: int
    k: int  # K before padding

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None


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
