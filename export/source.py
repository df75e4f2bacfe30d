"""Where the exporter's tensors come from: a small weight-source interface and its two implementations.

The graph builder asks a source for one module's tensors at the moment it builds that module's node, so at most
one layer's weights are in memory in float32 (plus the embedding, which is needed first and last).

    HFSource        a plain Hugging Face checkpoint (directory of safetensors, or an in-memory state dict):
                    every linear is dense, nothing is adapted.
    PreparedSource  a qosora prepared/trained directory, read through qosora.prepared.PreparedReader: every adapted
                    linear is an AdaptedWeight (NF4 residual + low-rank adapter, docs/CONTRACTS.md).

All arrays returned are numpy float32 (the NF4 packed data uint8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from qosora.errors import QosoraError
from qosora.precision import all_finite

if TYPE_CHECKING:
    from qosora.nf4 import NF4Parts


class WeightSource(Protocol):
    hf_config: dict
    directory: Path | None

    def tensor(self, name: str) -> np.ndarray:
        """A non-linear tensor by its HF name (embed_tokens, norms, lm_head), float32."""

    def has_tensor(self, name: str) -> bool: ...

    def is_adapted(self, module: str) -> bool:
        """True when `module` (e.g. model.layers.0.mlp.up_proj) has an NF4 residual and a low-rank adapter."""

    def dense(self, module: str) -> np.ndarray:
        """The merged weight [d_out, d_in]: the function the PyTorch model computes."""

    def residual_dense(self, module: str) -> np.ndarray:
        """deq(NF4(W_res)) [d_out, d_in] (adapted modules only)."""

    def nf4(self, module: str) -> "NF4Parts":
        """The NF4 residual as the kernel reads it (adapted modules only)."""

    def lowrank(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(B [d_out, r], A [r, d_in]) with adapter(x) = B (A x) (adapted modules only)."""

    def bias(self, module: str) -> np.ndarray | None: ...


def _f32(t, name: str) -> np.ndarray:
    """torch tensor (any float dtype, bf16 included) or array -> float32 numpy; NaN / inf is refused, naming `name`
    (a NaN weight would export, pass an unguarded check, and generate garbage)."""
    a = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
    if not all_finite(a):
        raise QosoraError(f"{name} holds NaN or inf values: the checkpoint is corrupt or the run diverged "
                          "(retrain with a lower --lr); nothing was exported")
    return a


class HFSource:
    """A Hugging Face checkpoint: `HFSource.from_dir(path)` (lazy, safetensors) or `HFSource(config, state_dict)`."""

    def __init__(self, hf_config: dict, tensors, directory: Path | None = None):
        self.hf_config = hf_config
        self._tensors = tensors  # mapping name -> tensor, or a lazy _SafetensorsIndex
        self.directory = directory

    @classmethod
    def from_dir(cls, directory: str | Path) -> "HFSource":
        from qosora.shards import ShardReader

        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise QosoraError(f"{directory} has no config.json: pass a Hugging Face model directory")
        return cls(json.loads(cfg_path.read_text()), _Tensors(ShardReader(directory)), directory)

    @classmethod
    def from_model(cls, model) -> "HFSource":
        """From an in-memory transformers model (tests)."""
        return cls(model.config.to_dict(), dict(model.state_dict()))

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> np.ndarray:
        if name == "lm_head.weight" and name not in self._tensors:
            name = "model.embed_tokens.weight"  # tied embeddings are stored once
        if name not in self._tensors:
            raise QosoraError(f"tensor {name} is missing from the checkpoint")
        return _f32(self._tensors[name], name)

    def is_adapted(self, module: str) -> bool:
        return False

    def dense(self, module: str) -> np.ndarray:
        return self.tensor(module + ".weight")

    def bias(self, module: str) -> np.ndarray | None:
        name = module + ".bias"
        return self.tensor(name) if name in self._tensors else None

    def residual_dense(self, module: str) -> np.ndarray:
        raise QosoraError(f"{module} is not adapted: a plain checkpoint has no NF4 residual")

    def nf4(self, module: str) -> "NF4Parts":
        raise QosoraError(f"{module} is not adapted: a plain checkpoint has no NF4 residual")

    def lowrank(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        raise QosoraError(f"{module} is not adapted: a plain checkpoint has no adapter")


class _Tensors:
    """A ShardReader as the name -> tensor mapping HFSource reads (an in-memory state dict is the other one)."""

    def __init__(self, reader):
        self._reader = reader

    def __contains__(self, name: str) -> bool:
        return name in self._reader

    def __getitem__(self, name: str):
        return self._reader.get(name)


class PreparedSource:
    """A qosora prepared/trained directory through `qosora.prepared.PreparedReader` (docs/CONTRACTS.md)."""

    def __init__(self, directory: str | Path):
        from qosora.prepared import PreparedReader

        self.directory = Path(directory)
        self._reader = PreparedReader(self.directory)
        self.hf_config = dict(self._reader.hf_config)
        self._adapted = set(self._reader.modules)
        self._base = set(self._reader.base_names())

    def has_tensor(self, name: str) -> bool:
        return name in self._base

    def tensor(self, name: str) -> np.ndarray:
        if name == "lm_head.weight" and name not in self._base:
            name = "model.embed_tokens.weight"
        if name not in self._base:
            raise QosoraError(f"tensor {name} is missing from {self.directory}")
        return _f32(self._reader.base_tensor(name), name)

    def is_adapted(self, module: str) -> bool:
        return module in self._adapted

    def dense(self, module: str) -> np.ndarray:
        if module in self._adapted:
            return _f32(self._reader.adapted(module).merged(), module)
        return self.tensor(module + ".weight")

    def residual_dense(self, module: str) -> np.ndarray:
        return _f32(self._reader.adapted(module).residual_dense(), module + " residual")

    def nf4(self, module: str) -> "NF4Parts":
        weight = self._reader.adapted(module)
        if not weight.is_quantized:
            raise QosoraError(f"{self.directory} keeps its residual unquantized (quant_type=none): export it as int4, "
                              "fp16 or fp32, not nf4")
        return weight.nf4_parts()

    def lowrank(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        b, a = self._reader.adapted(module).lowrank()
        return _f32(b, module + " adapter"), _f32(a, module + " adapter")

    def bias(self, module: str) -> np.ndarray | None:
        if module in self._adapted:
            b = self._reader.bias(module)
            return None if b is None else _f32(b, module + ".bias")
        name = module + ".bias"
        return self.tensor(name) if name in self._base else None


def open_source(directory: str | Path) -> WeightSource:
    """A prepared/trained qosora directory (has qosora_config.json) or a plain Hugging Face directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QosoraError(f"{directory} is not a directory: pass a qosora run/prepared directory or a HF model")
    if (directory / "qosora_config.json").is_file():
        return PreparedSource(directory)
    return HFSource.from_dir(directory)
