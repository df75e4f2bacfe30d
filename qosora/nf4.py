"""The frozen NF4 residual (QLoRA's 4-bit NormalFloat, bitsandbytes). The only module that imports bitsandbytes.

Storage of one (d_out, d_in) residual with blocksize 64 and double quantization:

    data          uint8 (d_out*d_in/2,)      two 4-bit NF4 codes a byte, bitsandbytes order
    absmax        uint8 (n_blocks,)          per-64-weight absmax, itself 8-bit quantized (double quant)
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
        """Per-block absmax as the kernel uses it (double quantization undone)."""
        _, F = _bnb()
        st = self.state
        if st.nested:
            return F.dequantize_blockwise(st.absmax, st.state2).float() + st.offset.float()
        return st.absmax.float()

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


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True, compute_dtype: str = "bfloat16") -> NF4Weight:
    """NF4(W). W is rounded to the compute dtype first, as bitsandbytes' Linear4bit does when it quantizes."""
    _, F = _bnb()
    data, state = F.quantize_4bit(
        W.to(DTYPES[compute_dtype]).contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    return NF4Weight(data, state)


def nf4_roundtrip(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True, compute_dtype: str = "bfloat16") -> torch.Tensor:
    """deq(NF4(W)) in fp32."""
    return quantize_nf4(W, blocksize, double_quant, compute_dtype).dequantize().float()


def nf4_matmul(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """x @ deq(W).T with bitsandbytes' 4-bit matmul (autograd flows to x only; W is frozen)."""
    bnb, _ = _bnb()
    return bnb.matmul_4bit(x, weight.data.t(), bias=None, quant_state=weight.state)
