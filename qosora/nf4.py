"""The frozen NF4 residual (QLoRA's 4-bit NormalFloat, bitsandbytes). The only module that imports bitsandbytes.

Storage of one (d_out, d_in) residual with blocksize 64 and double quantization:

    data          uint8 (d_out*d_in/2,)      two 4-bit NF4 codes a byte, bitsandbytes order
    absmax        uint8 (n_blocks,)          per-64-weight scale, itself 8-bit quantized (double quant); bitsandbytes
                                             calls it absmax; it is the block absmax unless the scale was searched
    absmax_scale  fp32  (ceil(n_blocks/256),)  absmax of the absmax, one per 256 blocks
    absmax_code   fp32  (256,)               the 8-bit dynamic map absmax was quantized with
    absmax_offset fp32  ()                   mean subtracted from absmax before quantizing it
    shape         int64 (2,)

Without double quantization `absmax` is fp32 and the three absmax_* tensors are absent.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@functools.lru_cache(maxsize=None)
def _bnb():
    import logging

    # bitsandbytes logs a warning about an optional CPU kernel package on import; it does not affect results.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional as F

    return bitsandbytes, F


@dataclass
class NF4Parts:
    """What a 4-bit kernel (MatMulBnb4, bitsandbytes) reads of an NF4 weight [N, K], as numpy arrays.

    data    uint8   [N*K/2]           two codes a byte, the first weight in the high nibble
    absmax  float32 [N*K/blocksize]   per-block scales, double quantization undone
    """

    data: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, int]
    blocksize: int


@dataclass
class NF4Weight:
    """A quantized (d_out, d_in) weight: the packed codes and bitsandbytes' QuantState."""

    data: torch.Tensor
    state: object  # bitsandbytes.functional.QuantState

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.state.shape)

    def dequantize(self) -> torch.Tensor:
        """deq(NF4(W)) in the compute dtype."""
        _, F = _bnb()
        return F.dequantize_4bit(self.data, self.state)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax (scale) as the kernel uses it (double quantization undone)."""
        return _stored_scales(self.state)

    def parts(self) -> NF4Parts:
        return NF4Parts(self.data.reshape(-1).cpu().numpy(), self.absmax_fp32().cpu().numpy().reshape(-1),
                        tuple(int(s) for s in self.shape), int(self.state.blocksize))

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        st = self.state
        out = {f"{prefix}.data": self.data.reshape(-1), f"{prefix}.shape": torch.tensor(self.shape, dtype=torch.int64)}
        if st.nested:
            out[f"{prefix}.absmax"] = st.absmax
            out[f"{prefix}.absmax_scale"] = st.state2.absmax.float()
            out[f"{prefix}.absmax_code"] = st.state2.code.float()
            out[f"{prefix}.absmax_offset"] = st.offset.float().reshape(())
        else:
            out[f"{prefix}.absmax"] = st.absmax.float()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, blocksize: int, compute_dtype: str) -> "NF4Weight":
        _, F = _bnb()
        shape = torch.Size(tensors[f"{prefix}.shape"].tolist())
        code = F.get_4bit_type("nf4", device="cpu")
        if f"{prefix}.absmax_scale" in tensors:
            state2 = F.QuantState(
                absmax=tensors[f"{prefix}.absmax_scale"], code=tensors[f"{prefix}.absmax_code"],
                blocksize=256, dtype=torch.float32,
            )
            state = F.QuantState(
                absmax=tensors[f"{prefix}.absmax"], shape=shape, code=code, blocksize=blocksize, quant_type="nf4",
                dtype=DTYPES[compute_dtype], offset=tensors[f"{prefix}.absmax_offset"], state2=state2,
            )
        else:
            state = F.QuantState(
                absmax=tensors[f"{prefix}.absmax"], shape=shape, code=code, blocksize=blocksize, quant_type="nf4",
                dtype=DTYPES[compute_dtype],
            )
        return cls(tensors[f"{prefix}.data"].reshape(-1, 1), state)

    def to(self, device: torch.device | str) -> "NF4Weight":
        self.state.to(torch.device(device))
        return NF4Weight(self.data.to(device), self.state)


# scale="search": per block, the best of these fractions of the block's absmax, then one least-squares refit of the
# scale to the levels it picked (never worse). Clipping a block's largest weight lets the other 63 use the 16 levels
# more finely; on SmolLM2's rank-64 residuals this lowers the NF4 error by 5.8 %, about what a 26-point grid gives
# (BENCHMARKS.md "Quantization fidelity"), for three more rounding passes.
SCALE_FRACTIONS = (1.0, 0.9, 0.8)
_CHUNK_BLOCKS = 4096  # blocks per search step: 1 MB temporaries, cache-sized, whatever the matrix size


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True, compute_dtype: str = "bfloat16",
                 scale: str = "absmax") -> NF4Weight:
    """NF4(W) in bitsandbytes' format. W is rounded to the compute dtype first, as bitsandbytes' Linear4bit does.

    scale="absmax" is bitsandbytes' quantizer, bit for bit (every block scaled by its absmax; tested against
    `bitsandbytes.functional.quantize_4bit`). scale="search" stores, per block, a scale with less squared error
    (`_search_scales`) and rounds each weight to the nearest NF4 level under that scale as stored (after double
    quantization). Same format, same kernels: only the numbers in `absmax` and the codes differ.
    """
    if scale not in ("absmax", "search"):
        raise ValueError(f"unknown NF4 scale {scale!r}: use 'absmax' or 'search'")
    _, F = _bnb()
    dtype = DTYPES[compute_dtype]
    W = W.to(dtype)
    code = F.get_4bit_type("nf4", device=W.device)
    blocks = _blocks(W.float(), blocksize)
    scales = blocks.abs().amax(1) if scale == "absmax" else _search_scales(blocks, code)
    stored, offset, state2 = scales, None, None
    if double_quant:  # the per-block scales themselves to 8 bits, 256 at a time, around their mean
        offset = scales.mean()
        stored, state2 = F.quantize_blockwise(scales - offset, blocksize=256)
    state = F.QuantState(absmax=stored, shape=W.shape, code=code, blocksize=blocksize, quant_type="nf4", dtype=dtype,
                         offset=offset, state2=state2)
    # bitsandbytes rounds under the exact absmax; a searched scale may as well be used as stored
    rounding_scales = _stored_scales(state) if scale == "search" else scales
    codes = _nearest_codes(blocks, rounding_scales[:, None], code).reshape(-1)[: W.numel()]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]  # bitsandbytes' order: the first weight in the high nibble
    return NF4Weight(packed.reshape(-1, 1), state)


def _stored_scales(state) -> torch.Tensor:
    """The per-block scales a QuantState holds, fp32, double quantization undone."""
    _, F = _bnb()
    if state.nested:
        return F.dequantize_blockwise(state.absmax, state.state2).float() + state.offset.float()
    return state.absmax.float()


def _blocks(W: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = W.reshape(-1)
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)


def _nearest_codes(blocks: torch.Tensor, scales: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of every weight / its block's scale (uint8, 0..15): the number of level
    midpoints below it, as bitsandbytes' bucketize gives (and its [-1, 1] clamp cannot change). Fifteen vectorized
    compares run 3x faster on CPU than torch.bucketize's binary search."""
    x = blocks * (1.0 / scales.clamp(min=1e-38))
    index = torch.zeros_like(x, dtype=torch.uint8)
    for mid in ((code[1:] + code[:-1]) / 2).tolist():
        index += x > mid
    return index


def _levels(index: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return torch.index_select(code, 0, index.reshape(-1).int()).reshape(index.shape)


def _search_scales(blocks: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Per block, a scale with less squared NF4 error than its absmax (never more). fp32 [n_blocks].

    The best of SCALE_FRACTIONS x absmax, then the least-squares scale for the levels that choice rounds to,
    sum(x c) / sum(c^2): for fixed levels it is optimal, and rounding again under it can only lower the error.
    """
    out = torch.empty(blocks.shape[0], dtype=torch.float32, device=blocks.device)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        b = blocks[start : start + _CHUNK_BLOCKS]
        absmax = b.abs().amax(1, keepdim=True)
        best_scale = best_err = best_levels = None
        for fraction in SCALE_FRACTIONS:
            s = absmax * fraction
            levels = _levels(_nearest_codes(b, s, code), code)
            err = ((levels * s - b) ** 2).sum(1, keepdim=True)
            if best_err is None:
                best_scale, best_err, best_levels = s, err, levels
                continue
            better = err < best_err
            best_scale, best_err = torch.where(better, s, best_scale), torch.where(better, err, best_err)
            best_levels = torch.where(better, levels, best_levels)
        norm = (best_levels * best_levels).sum(1, keepdim=True)
        refit = (b * best_levels).sum(1, keepdim=True) / norm.clamp_min(torch.finfo(torch.float32).tiny)
        out[start : start + _CHUNK_BLOCKS] = torch.where(norm > 0, refit, best_scale)[:, 0]
    return out


def nf4_roundtrip(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True, compute_dtype: str = "bfloat16",
                  scale: str = "absmax") -> torch.Tensor:
    """deq(NF4(W)) in fp32."""
    return quantize_nf4(W, blocksize, double_quant, compute_dtype, scale).dequantize().float()


def nf4_matmul(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """x @ deq(W).T with bitsandbytes' 4-bit matmul (autograd flows to x only; W is frozen)."""
    bnb, _ = _bnb()
    return bnb.matmul_4bit(x, weight.data.t(), bias=None, quant_state=weight.state)
