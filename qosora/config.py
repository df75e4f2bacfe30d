"""Typed options, validated once at the edge and written as JSON with every artifact.

`QosoraConfig` is the contract of a prepared directory (`qosora_config.json`): what was decomposed, how it was
quantized, with which SVD, from which source model. Everything downstream (load, train, merge, export) reads it
instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

from qosora.errors import QosoraError
from qosora.options import check, option

Method = Literal["sorsa", "osora", "pissa", "qlora"]
METHODS: tuple[str, ...] = get_args(Method)
Dtype = Literal["bfloat16", "float16", "float32"]

# Short names accepted on the command line -> the module names used by Llama, Mistral and Qwen2.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
ALL_TARGETS: tuple[str, ...] = tuple(TARGET_ALIASES.values())

CONFIG_NAME = "qosora_config.json"
FORMAT_VERSION = 1
NF4_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen residual is stored. `quant_type="none"` keeps it dense (for tests and ablations)."""

    quant_type: Literal["nf4", "none"] = option("nf4", "nf4, or none to keep the residual dense", cli=False)
    blocksize: int = option(64, "NF4 block size", cli=False)
    double_quant: bool = option(True, "8-bit quantize the block scales (QLoRA's double quantization)", cli=False)
    compute_dtype: Dtype = option("bfloat16", "dtype the NF4 residual dequantizes to in the forward")
    scale: Literal["search", "absmax"] = option(
        "search", "NF4 block scales: error-minimising, or bitsandbytes' absmax; same format either way",
        flag="--nf4-scale")

    def validate(self) -> "QuantConfig":
        check(self)
        if self.blocksize not in NF4_BLOCKSIZES:
            raise QosoraError(f"NF4 blocksize {self.blocksize} is not supported: use 64 (default), 128, 256, ...")
        return self


@dataclass(frozen=True)
class SVDConfig:
    """Top-r SVD settings. Randomized SVD costs O(d^2 q) with q = rank + oversample instead of O(d^3).

    `refine_rounds` = T of the QPiSSA-style refinement; T = 1 is plain residual quantization.
    An inexact SVD never changes the function at init (the residual is W minus the stored principal part);
    it only changes how much error NF4 adds.
    """

    solver: Literal["randomized", "exact"] = option("randomized", "top-r SVD solver", flag="--svd")
    oversample: int = option(8, "randomized SVD oversampling", flag="--svd-oversample", min=0)
    niter: int = option(4, "randomized SVD power iterations", flag="--svd-niter", min=0)
    refine_rounds: int = option(1, "QPiSSA-style residual refinement rounds (1 = plain residual quantization)", min=1)
    seed: int = option(0, "seed of the randomized SVD and of QLoRA's A init")

    def validate(self) -> "SVDConfig":
        check(self)
        return self


@dataclass(frozen=True)
class PrepareConfig:
    """What `qosora prepare` does to every targeted linear layer."""

    method: Method = option("sorsa", "adapter method")
    rank: int = option(64, "adapter rank r", min=1)
    targets: tuple[str, ...] = option(ALL_TARGETS, "linear layers to adapt", cli=False)
    adapter_dtype: Dtype = option("bfloat16", "dtype the adapter factors are stored and trained in")
    quant: QuantConfig = option(default_factory=QuantConfig)
    svd: SVDConfig = option(default_factory=SVDConfig)

    def validate(self) -> "PrepareConfig":
        check(self)
        self.quant.validate()
        self.svd.validate()
        return self

    @staticmethod
    def normalize_targets(names: "list[str] | tuple[str, ...] | str") -> tuple[str, ...]:
        """Accept `q,k,v` or `q_proj,...`; reject names no supported architecture has."""
        if isinstance(names, str):
            names = [n for n in names.split(",") if n.strip()]
        out = []
        for raw in names:
            name = TARGET_ALIASES.get(raw.strip(), raw.strip())
            if name not in ALL_TARGETS:
                raise QosoraError(
                    f"unknown target {raw!r}: choose from {', '.join(TARGET_ALIASES)} (or their *_proj names)"
                )
            if name not in out:
                out.append(name)
        if not out:
            raise QosoraError("no targets given: pass e.g. --targets q,k,v,o,gate,up,down")
        return tuple(out)


@dataclass
class QosoraConfig:
    """`qosora_config.json`: the self-description of a prepared or trained directory."""

    prepare: PrepareConfig
    model_type: str
    modules: list[str]
    source: dict
    qosora_version: str
    trained_steps: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "QosoraConfig":
        p = dict(d["prepare"])
        prepare = PrepareConfig(
            method=p["method"], rank=p["rank"], targets=tuple(p["targets"]), adapter_dtype=p["adapter_dtype"],
            quant=QuantConfig(**{"scale": "absmax", **p["quant"]}),  # written before the search existed: absmax
            svd=SVDConfig(**p["svd"]),
        )
        prepare.validate()
        if not isinstance(d["modules"], list) or not all(isinstance(m, str) for m in d["modules"]):
            raise TypeError("modules is not a list of names")
        return cls(
            prepare=prepare, model_type=d["model_type"], modules=list(d["modules"]), source=d["source"],
            qosora_version=d["qosora_version"], trained_steps=d.get("trained_steps", 0),
            format_version=d.get("format_version", FORMAT_VERSION),
        )

    @classmethod
    def read(cls, directory: str | Path) -> "QosoraConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise QosoraError(f"{directory} is not a qosora directory ({CONFIG_NAME} missing): run `qosora prepare` first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except QosoraError as e:
            raise QosoraError(f"{path} is corrupt ({e}): re-run `qosora prepare`") from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise QosoraError(f"{path} is corrupt ({type(e).__name__}: {e}): re-run `qosora prepare`") from None
