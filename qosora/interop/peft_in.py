"""`qosora prepare MODEL --from-peft ADAPTER`: a PEFT LoRA or PiSSA adapter on MODEL as a qosora directory.

PEFT computes y = W' x + s B (A x), W' the base weight as PEFT leaves it when it loads the adapter onto MODEL:

    init_lora_weights      W'                 qosora method   residual            factors
    True, "gaussian", ...  W                  qlora           NF4(W)              A, B, scaled
    "pissa"                W - s B0 A0        pissa           NF4(W - s B0 A0)    A, B, scaled

s B0 A0 is PiSSA's principal: the exact top-r SVD of W with sqrt(S / s) on each side, recomputed here as PEFT's
`pissa_init` does on load, so a trained PiSSA adapter keeps its function; for PEFT's untrained initialisation
B = B0, A = A0 and the residual is W - s B A. "Scaled": sqrt(s) is folded into A and into B (qosora's adapters have
no scale). "pissa_niter_K" (a randomized SVD drawn from torch's global RNG) and the inits that rewrite W in other ways
(OLoRA, CorDA, LoftQ) cannot be recomputed: refused, with PEFT's own conversion to a plain LoRA as the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qosora.architectures import parse_linear
from qosora.config import PrepareConfig, QuantConfig
from qosora.errors import QosoraError
from qosora.interop.peft_format import PeftLora, read_lora
from qosora.methods import Factors
from qosora.preparation import PrepareReport, prepare
from qosora.shards import ShardReader


def pissa_principal(W: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """s B0 A0 as PEFT's `LoraLayer.pissa_init` ("pissa") computes it, fp32 (d_out, d_in): V S Uh = svd(W),
    A0 = diag(sqrt(S_r / s)) Uh_r, B0 = V_r diag(sqrt(S_r / s))."""
    V, S, Uh = torch.linalg.svd(W.float(), full_matrices=False)
    root = torch.sqrt(S[:rank] / scale)
    A0 = torch.diag(root) @ Uh[:rank]
    B0 = V[:, :rank] @ torch.diag(root)
    return scale * B0 @ A0


def _no_principal(W: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    return torch.zeros(W.shape, dtype=torch.float32, device=W.device)


# init_lora_weights -> (qosora method, the principal PEFT takes out of W when it loads the adapter)
_IMPORTS = {"pissa": ("pissa", pissa_principal),
            **{init: ("qlora", _no_principal) for init in (True, False, "gaussian", "eva")}}


class PeftFactors:
    """A PEFT adapter as `qosora.preparation.ImportedFactors`: each module's (factors, principal)."""

    def __init__(self, lora: PeftLora):
        self.lora = lora
        if not isinstance(lora.init, (str, bool)) or lora.init not in _IMPORTS:
            raise QosoraError(
                f"--from-peft {lora.directory}: init_lora_weights = {lora.init!r} changes the base weights in a way "
                "qosora cannot recompute: convert the adapter to a plain LoRA with PEFT's save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...) and import that")
        self.method, self._principal = _IMPORTS[lora.init]
        self.source = {"peft_adapter": str(lora.directory.resolve())}

    @property
    def modules(self) -> list[str]:
        return list(self.lora.factors)

    def split(self, module: str, W: torch.Tensor) -> tuple[Factors, torch.Tensor]:
        B, A = self.lora.factors[module]
        return {"A": A, "B": B}, self._principal(W, self.lora.rank, self.lora.scale)

    def check_model(self, model: ShardReader) -> None:
        """Every adapted module must be a linear of MODEL with the adapter's shapes."""
        for module, (B, A) in self.lora.factors.items():
            name, shape = f"{module}.weight", (B.shape[0], A.shape[1])
            found = tuple(model.shape(name)) if name in model else None
            if found != shape:
                raise QosoraError(f"--from-peft {self.lora.directory}: {module} is {shape[0]} x {shape[1]} in the "
                                  f"adapter but {found or 'missing'} in {model.directory}: pass the model the adapter "
                                  "was trained on")


def prepare_from_peft(model_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *,
                      quant: QuantConfig = QuantConfig(), adapter_dtype: str = "bfloat16",
                      device: str | torch.device | None = None, overwrite: bool = False,
                      progress: bool = True) -> PrepareReport:
    """Write a `pissa` (PiSSA adapter) or `qlora` (plain LoRA) qosora directory computing the adapter on MODEL."""
    imported = PeftFactors(read_lora(adapter_dir))
    imported.check_model(ShardReader(model_dir))
    modules = set(imported.modules)
    config = PrepareConfig(method=imported.method, rank=imported.lora.rank, adapter_dtype=adapter_dtype, quant=quant,
                           targets=tuple(sorted({parse_linear(m)[1] for m in modules})))
    return prepare(model_dir, out_dir, config, filter_fn=lambda name, shape: name in modules, device=device,
                   overwrite=overwrite, progress=progress, imported=imported)
