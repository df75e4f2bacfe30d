"""`SVDAdapterLinear`: a frozen NF4 residual plus a trainable rank-r principal adapter.

    y = NF4linear(W_res, x) + bias + adapter(x)

`adapter` is the method's function from `qosora.methods` (SORSA, OSoRA, PiSSA, QLoRA); the layer is built from, and
gives back, an `AdaptedWeight` (qosora.adapted), the one definition of the stored function. The factors live in the
adapter dtype (bf16 by default); the trainable ones are `nn.Parameter`s, the rest buffers, so an optimizer built
from `model.parameters()` with `requires_grad` sees exactly what the method declares. The forward never builds the
dense (d_out, d_in) delta: the adapter costs O(r (d_in + d_out)) a token.
"""

from __future__ import annotations

import torch
from torch import nn

from qosora.adapted import AdaptedWeight
from qosora.methods import Factors, orthonormality
from qosora.nf4 import DTYPES, NF4Weight, nf4_matmul


class SVDAdapterLinear(nn.Module):
    def __init__(self, weight: AdaptedWeight, compute_dtype: str = "bfloat16"):
        super().__init__()
        self.spec = weight.spec
        residual, factors, bias = weight.residual, weight.factors, weight.bias
        self.compute_dtype = DTYPES[compute_dtype]
        # Frozen residual: NF4 (not a Parameter, so optimizers and .parameters() never see it) or a dense buffer.
        if isinstance(residual, NF4Weight):
            self.residual_nf4 = residual
            self.register_buffer("residual", None, persistent=False)
            self.out_features, self.in_features = residual.shape
        else:
            self.residual_nf4 = None
            self.register_buffer("residual", residual.detach(), persistent=False)
            self.out_features, self.in_features = residual.shape
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        for name in self.spec.factors:
            t = factors[name].detach().clone()
            if name in self.spec.trainable:
                setattr(self, name, nn.Parameter(t))
            else:
                self.register_buffer(name, t, persistent=False)
        self.rank = factors["S"].shape[0] if "S" in factors else factors["A"].shape[0]

    @property
    def method(self) -> str:
        return self.spec.name

    def factors(self) -> Factors:
        return {n: getattr(self, n) for n in self.spec.factors}

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this method trains (SORSA: U, S, Vh; OSoRA: S, O; PiSSA/QLoRA: A, B)."""
        return {n: getattr(self, n) for n in self.spec.trainable}

    def orthonormality(self) -> torch.Tensor:
        """||U^T U - I||_F + ||Vh Vh^T - I||_F (SVD-factored methods only)."""
        return orthonormality(self.U, self.Vh)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual_nf4 is not None:
            y = nf4_matmul(x.to(self.compute_dtype), self.residual_nf4)
        else:
            y = x.to(self.compute_dtype) @ self.residual.to(self.compute_dtype).mT
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in) -> (..., d_out)
        # Both branches run in the compute dtype: bf16 factors and bf16 compute cast nothing; an fp32 compute dtype
        # (evaluation, export parity) upcasts the stored factors exactly and gives deq(W_res) x + B (A x) in fp32.
        factors = {n: t.to(self.compute_dtype) for n, t in self.factors().items()}
        y = self.base_forward(x) + self.spec.forward(factors, x.to(self.compute_dtype))
        return y.to(x.dtype)

    def adapted(self) -> AdaptedWeight:
        """The layer's current function as an `AdaptedWeight` (shares its tensors): `.merged()`, `.lowrank()`, ..."""
        residual = self.residual_nf4 if self.residual_nf4 is not None else self.residual
        return AdaptedWeight(self.spec, residual, self.factors(), self.bias)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        self.compute_dtype = dtype
        if self.residual_nf4 is not None:
            self.residual_nf4.state.dtype = dtype  # bitsandbytes dequantizes into the state's dtype

    def _apply(self, fn, recurse=True):
        # Keep the NF4 residual on the same device as the factors when the module is moved.
        super()._apply(fn, recurse)
        if self.residual_nf4 is not None:
            probe = fn(torch.empty(0))
            if probe.device != self.residual_nf4.data.device:
                self.residual_nf4 = self.residual_nf4.to(probe.device)
        return self

    def extra_repr(self) -> str:
        kind = "nf4" if self.residual_nf4 is not None else "dense"
        return f"{self.in_features} -> {self.out_features}, method={self.method}, rank={self.rank}, residual={kind}"


def adapter_layers(model: nn.Module) -> dict[str, SVDAdapterLinear]:
    """Every SVDAdapterLinear of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDAdapterLinear)}


def mark_only_adapters_trainable(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the declared adapter parameters; return those."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in adapter_layers(model).values():
        for p in layer.adapter_params().values():
            p.requires_grad_(True)
            params.append(p)
    return params
