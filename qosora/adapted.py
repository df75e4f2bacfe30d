"""`AdaptedWeight`: one adapted linear as it is stored, and the three things everything downstream asks of it.

    y = deq(W_res) x + B (A x) + bias        W_res: NF4 (or dense) residual, frozen
                                             (B, A): the method's low-rank form of its factors (qosora.methods)

The layer (training), the prepared-directory reader, merge and the ONNX export source all hold one of these and
call the same three methods, so "the function that was trained" has one definition:

    residual_dense()  deq(W_res)              fp32 (d_out, d_in)
    lowrank()         (B, A)                  fp32 (d_out, r'), (r', d_in)
    merged()          deq(W_res) + B A        fp32 (d_out, d_in): what `qosora merge` writes and int4 requantizes
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qosora.methods import Factors, MethodSpec
from qosora.nf4 import NF4Parts, NF4Weight


@dataclass
class AdaptedWeight:
    spec: MethodSpec
    residual: NF4Weight | torch.Tensor   # NF4 residual, or a dense fp32/bf16 (d_out, d_in) one (quant_type="none")
    factors: Factors                     # the spec's stored factors, adapter dtype (bf16 by default)
    bias: torch.Tensor | None = None     # (d_out,)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.residual.shape)

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.residual, NF4Weight)

    def residual_dense(self) -> torch.Tensor:
        """deq(NF4(W_res)) (or the dense residual) in fp32."""
        r = self.residual
        return r.dequantize().float() if isinstance(r, NF4Weight) else r.float()

    @torch.no_grad()
    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B fp32 (d_out, r'), A fp32 (r', d_in)) with adapter(x) = B (A x)."""
        return self.spec.lowrank(self.factors)

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        """deq(W_res) + B A in fp32: the function that was trained, as one dense weight."""
        B, A = self.lowrank()
        return self.residual_dense() + B @ A

    def nf4_parts(self) -> NF4Parts:
        """The NF4 residual as a 4-bit kernel reads it (packed codes, fp32 scales)."""
        if not isinstance(self.residual, NF4Weight):
            raise ValueError("this weight keeps its residual unquantized (quant_type=none): there are no NF4 parts")
        return self.residual.parts()
