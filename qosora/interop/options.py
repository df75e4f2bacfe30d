"""The options of `qosora convert` (`ConvertOptions`), declared once; the CLI flags and the checks come from them.

This module imports no torch, so `qosora convert --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from qosora.config import Dtype
from qosora.errors import QosoraError
from qosora.options import check, option

Target = Literal["peft", "lora"]
TARGETS: tuple[str, ...] = get_args(Target)


@dataclass(frozen=True)
class ConvertOptions:
    """What `qosora convert` writes; validated once in `validate`."""

    to: Target = option(help="peft: OUT/base (the NF4 residual as a transformers bitsandbytes 4-bit model) + "
                             "OUT/adapter (PEFT LoRA, rank r), exact; lora: a PEFT LoRA for the original model "
                             "(--base)")
    base: str | None = option(None, "--to lora: the original unquantized model directory DIR was prepared from")
    dtype: Dtype = option("bfloat16", "dtype of the LoRA factors and of the tensors left unquantized "
                                      "(float32: no rounding)")
    rank: int | None = option(None, "--to lora: truncate each delta to this rank by SVD, reporting the dropped "
                                    "energy (default: exact, 2r; r for OSoRA and QLoRA)", min=1)

    def validate(self) -> "ConvertOptions":
        check(self)
        if self.to == "lora" and self.base is None:
            raise QosoraError("--to lora needs --base ORIGINAL_MODEL_DIR: the unquantized model DIR was prepared from")
        if self.to == "peft" and (self.base is not None or self.rank is not None):
            raise QosoraError("--base and --rank belong to --to lora: drop them (--to peft is exact at rank r)")
        return self
