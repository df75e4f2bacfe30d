"""Typed options, validated once at the edge and written as JSON with every artifact.

`QosoraConfig` is the contract of a prepared directory (`qosora_config.json`): what was decomposed, how it was
quantized, with which SVD, from which source model. Everything downstream (load, train, merge, export) reads it
instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from qosora.errors import QosoraError

Method = Literal["sorsa", "osora", "pissa", "qlora"]
METHODS: tuple[str, ...] = ("sorsa", "osora", "pissa", "qlora")

# Short names accepted on the command line -> the module names used by Llama, Mistral and Qwen2.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
ALL_TARGETS: tuple[str, ...] = tuple(TARGET_ALIASES.values())

CONFIG_NAME = "qosora_config.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """How the frozen residual is stored. `quant_type="none"` keeps it dense (for tests and ablations)."""

    quant_type: Literal["nf4", "none"] = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # "search": per block, the error-minimising scale (same NF4 format and kernels); "absmax": bitsandbytes' own.
    scale: Literal["search", "absmax"] = "search"

    def validate(self) -> None:
        if self.quant_type not in ("nf4", "none"):
            raise QosoraError(f"unknown quant_type {self.quant_type!r}: use 'nf4' or 'none'")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise QosoraError(f"NF4 blocksize {self.blocksize} is not supported: use 64 (default), 128, 256, ...")
        if self.compute_dtype not in ("bfloat16", "float16", "float32"):
            raise QosoraError(f"unknown compute dtype {self.compute_dtype!r}: use bfloat16, float16 or float32")
        if self.scale not in ("search", "absmax"):
            raise QosoraError(f"unknown NF4 scale {self.scale!r}: use 'search' (default) or 'absmax'")


@dataclass(frozen=True)
class SVDConfig:
    """Top-r SVD settings. Randomized SVD costs O(d^2 q) with q = rank + oversample instead of O(d^3).

    `refine_rounds` = T of the QPiSSA-style refinement; T = 1 is plain residual quantization.
    An inexact SVD never changes the function at init (the residual is W minus the stored principal part);
    it only changes how much error NF4 adds.
    """

    solver: Literal["randomized", "exact"] = "randomized"
    oversample: int = 8
    niter: int = 4
    refine_rounds: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.solver not in ("randomized", "exact"):
            raise QosoraError(f"unknown SVD solver {self.solver!r}: use 'randomized' or 'exact'")
        if self.oversample < 0 or self.niter < 0:
            raise QosoraError("--svd-oversample and --svd-niter must be >= 0")
        if self.refine_rounds < 1:
            raise QosoraError(f"--refine-rounds must be >= 1 (1 = plain residual quantization), got {self.refine_rounds}")


@dataclass(frozen=True)
class PrepareConfig:
    """What `qosora prepare` does to every targeted linear layer."""

    method: Method = "sorsa"
    rank: int = 64
    targets: tuple[str, ...] = ALL_TARGETS
    adapter_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    quant: QuantConfig = field(default_factory=QuantConfig)
    svd: SVDConfig = field(default_factory=SVDConfig)

    def validate(self) -> "PrepareConfig":
        if self.method not in METHODS:
            raise QosoraError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise QosoraError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.adapter_dtype not in ("bfloat16", "float16", "float32"):
            raise QosoraError(f"unknown adapter dtype {self.adapter_dtype!r}")
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
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QosoraError(f"{path} is corrupt ({e}): re-run `qosora prepare`") from None
