"""Tiny models and an adapted weight source for the export tests (seeded random weights, built in code)."""

from __future__ import annotations

import numpy as np
import torch

from conftest import build_tiny_model
from qosora.export.source import HFSource
from qosora.nf4 import NF4Parts

EXPORT_MODEL = dict(intermediate_size=128, rms_norm_eps=1e-5)  # the export tests' thresholds were set on this shape
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_model(arch: str = "llama", tied: bool = False, seed: int = 0, **overrides):
    """conftest's tiny model (hidden 64, 4 heads, 2 kv heads, 2 layers, vocab 128) at the export tests' shape,
    intermediate 128 and eps 1e-5, every weight redrawn N(0, 0.15^2): larger than the 0.02 init, so attention and
    norms are exercised, not near-uniform."""
    return build_tiny_model(None, arch, tied, seed, weight_std=0.15, **{**EXPORT_MODEL, **overrides})


def linear_modules(model) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(model.config.num_hidden_layers) for n in LINEARS]


class AdaptedSource(HFSource):
    """A stand-in for a prepared directory: each linear W is split like `qosora prepare` does (PiSSA form),
    B = U_r sqrt(S_r), A = sqrt(S_r) Vh_r, W_res = W - B A stored NF4, then B is nudged as training would.

    Real weights have a few large singular values; random ones do not, so a rank-r spike is added to W first
    (`spike`), otherwise keeping the principal part would have nothing to keep. The model's weights are replaced
    in place by deq(NF4(W_res)) + B A, so the model *is* the trained function the export must reproduce.
    """

    def __init__(self, model, rank: int = 4, seed: int = 0, spike: float = 3.0):
        import bitsandbytes.functional as bnbf

        super().__init__(model.config.to_dict(), dict(model.state_dict()))
        g = torch.Generator().manual_seed(seed)
        self.parts: dict[str, tuple] = {}
        mods = dict(model.named_modules())
        for m in linear_modules(model):
            w = mods[m].weight.detach().double()
            d_out, d_in = w.shape
            w = w + spike * torch.randn(d_out, rank, generator=g).double() @ torch.randn(rank, d_in, generator=g).double() / (d_in * d_out) ** 0.25
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            b = (u[:, :rank] * s[:rank].sqrt()).float()
            a = (s[:rank].sqrt()[:, None] * vh[:rank]).float()
            res = (w - b.double() @ a.double()).float()
            b = b * (1 + 0.05 * torch.randn(b.shape, generator=g))  # "training"
            packed, st = bnbf.quantize_4bit(res, blocksize=64, quant_type="nf4", compress_statistics=False)
            deq = bnbf.dequantize_4bit(packed, st).float()
            self.parts[m] = (packed.reshape(-1).numpy(), st.absmax.float().numpy(), deq.numpy(), b.numpy(), a.numpy())
            with torch.no_grad():
                mods[m].weight.copy_(deq + b @ a)

    def is_adapted(self, module: str) -> bool:
        return module in self.parts

    def dense(self, module: str) -> np.ndarray:
        if module not in self.parts:
            return super().dense(module)
        _, _, deq, b, a = self.parts[module]
        return deq + b @ a

    def residual_dense(self, module: str) -> np.ndarray:
        return self.parts[module][2]

    def nf4(self, module: str) -> NF4Parts:
        data, absmax, deq, _, _ = self.parts[module]
        return NF4Parts(data, absmax, tuple(deq.shape), 64)

    def lowrank(self, module: str):
        return self.parts[module][3], self.parts[module][4]


def feed(model_cfg, ids: np.ndarray, dtype=np.float32, past: dict | None = None, past_len: int = 0,
         attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None) -> dict:
    b, s = ids.shape
    kv = model_cfg.num_key_value_heads
    d = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    f = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": attention_mask if attention_mask is not None else np.ones((b, past_len + s), np.int64),
        "position_ids": position_ids if position_ids is not None else np.tile(np.arange(past_len, past_len + s), (b, 1)),
    }
    for i in range(model_cfg.num_hidden_layers):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            f[name] = past[name] if past else np.zeros((b, kv, 0, d), dtype)
    return f
