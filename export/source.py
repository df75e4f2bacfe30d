"""Where the exporter's tensors come from: a small weight-source interface and its two implementations.

The graph builder asks a source for one module's tensors at the moment it builds that module's node, so at most
one layer's weights are in memory in float32 (plus the embedding, which is needed first and last).

    HFSource        a plain Hugging Face checkpoint (directory of safetensors, or an in-memory state dict):
                    every linear is dense, nothing is adapted.
    PreparedSource  a qosora prepared/trained directory, read through qosora.artifact.PreparedReader: adapted
                    linears have an NF4 residual and a low-rank adapter (docs/CONTRACTS.md).

All arrays returned are numpy float32 (the NF4 packed data uint8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from qosora.errors import QosoraError


@dataclass
class NF4Parts:
    """bitsandbytes NF4 of a weight [N, K]: data uint8 [N*K/2] (first weight in the high nibble),
    absmax float32 [N*K/blocksize] (double quantization already undone)."""

    data: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, int]
    blocksize: int


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

    def nf4(self, module: str) -> NF4Parts:
        """The NF4 residual as the kernel reads it (adapted modules only)."""

    def lowrank(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(B [d_out, r], A [r, d_in]) with adapter(x) = B (A x) (adapted modules only)."""

    def bias(self, module: str) -> np.ndarray | None: ...


def _f32(t) -> np.ndarray:
    """torch tensor (any float dtype, bf16 included) or array -> float32 numpy."""
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()  # .float() is a no-op on float32
    return np.asarray(t, dtype=np.float32)


class HFSource:
    """A Hugging Face checkpoint: `HFSource.from_dir(path)` (lazy, safetensors) or `HFSource(config, state_dict)`."""

    def __init__(self, hf_config: dict, tensors, directory: Path | None = None):
        self.hf_config = hf_config
        self._tensors = tensors  # mapping name -> tensor, or a lazy _SafetensorsIndex
        self.directory = directory

    @classmethod
    def from_dir(cls, directory: str | Path) -> "HFSource":
        directory = Path(directory)
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise QosoraError(f"{directory} has no config.json: pass a Hugging Face model directory")
        return cls(json.loads(cfg_path.read_text()), _SafetensorsIndex(directory), directory)

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
        return _f32(self._tensors[name])

    def is_adapted(self, module: str) -> bool:
        return False

    def dense(self, module: str) -> np.ndarray:
        return self.tensor(module + ".weight")

    def bias(self, module: str) -> np.ndarray | None:
        name = module + ".bias"
        return self.tensor(name) if name in self._tensors else None

    def residual_dense(self, module: str) -> np.ndarray:
        raise QosoraError(f"{module} is not adapted: a plain checkpoint has no NF4 residual")

    def nf4(self, module: str) -> NF4Parts:
        raise QosoraError(f"{module} is not adapted: a plain checkpoint has no NF4 residual")

    def lowrank(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        raise QosoraError(f"{module} is not adapted: a plain checkpoint has no adapter")


class _SafetensorsIndex:
    """name -> tensor, read on demand from the directory's safetensors files (sharded or not)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise QosoraError(f"{directory} has no *.safetensors files (pickled .bin checkpoints are not read)")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str):
        return self._where[name].get_tensor(name)


class PreparedSource:
    """A qosora prepared/trained directory through `qosora.artifact.PreparedReader` (docs/CONTRACTS.md)."""

    def __init__(self, directory: str | Path):
        from qosora.artifact import PreparedReader

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
        return _f32(self._reader.base_tensor(name))

    def is_adapted(self, module: str) -> bool:
        return module in self._adapted

    def dense(self, module: str) -> np.ndarray:
        if module in self._adapted:
            return _f32(self._reader.merged_weight(module))
        return self.tensor(module + ".weight")

    def residual_dense(self, module: str) -> np.ndarray:
        return _f32(self._reader.residual_dense(module))

    def nf4(self, module: str) -> NF4Parts:
        p = self._reader.nf4_parts(module)
        return NF4Parts(
            data=np.asarray(p.data.cpu().numpy() if hasattr(p.data, "cpu") else p.data, dtype=np.uint8).reshape(-1),
            absmax=_f32(p.absmax).reshape(-1),
            shape=tuple(int(s) for s in p.shape),
            blocksize=int(p.blocksize),
        )

    def lowrank(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        b, a = self._reader.lowrank(module)
        return _f32(b), _f32(a)

    def bias(self, module: str) -> np.ndarray | None:
        if module in self._adapted:
            b = self._reader.bias(module)
            return None if b is None else _f32(b)
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
