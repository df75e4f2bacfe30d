"""Read and write prepared / trained directories (layout in docs/CONTRACTS.md). Safetensors and JSON only.

`PreparedReader` reads tensors lazily without building a model (merge and export stream through it);
`load` builds the trainable transformers model; `save_trained` writes a model's current factors back out.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from qosora.checkpoint import CheckpointReader, ShardedWriter
from qosora.config import CONFIG_NAME, QosoraConfig
from qosora.errors import QosoraError
from qosora.layer import SVDAdapterLinear, adapter_layers
from qosora.methods import METHOD_SPECS
from qosora.nf4 import DTYPES, NF4Weight

STATS_NAME = "stats.json"
_NF4_FIELDS = ("data", "shape", "absmax", "absmax_scale", "absmax_code", "absmax_offset")


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir` and rename it into place only if the block succeeds.

    A failed or interrupted run leaves no directory that looks complete (only a hidden `.name.tmp-*`, removed
    on failure when Python gets the chance).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise QosoraError(f"output {out} already exists and is not empty: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link large unchanged files (the NF4 residual of a 7B model is ~4 GB); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class NF4Parts:
    """What a 4-bit kernel needs: packed codes, fp32 absmax (double quantization undone), shape, blocksize."""

    data: torch.Tensor      # uint8 (d_out * d_in / 2,)
    absmax: torch.Tensor    # fp32 (d_out * d_in / blocksize,)
    shape: tuple[int, int]  # (d_out, d_in)
    blocksize: int


class PreparedReader:
    """Lazy, model-free access to a prepared or trained directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise QosoraError(f"{self.directory} does not exist: pass a directory written by `qosora prepare` or `qosora train`")
        self.config = QosoraConfig.read(self.directory)
        self.hf_config = json.loads((self.directory / "config.json").read_text())
        self.modules = list(self.config.modules)
        self.spec = METHOD_SPECS[self.config.prepare.method]
        self._base = CheckpointReader(self.directory, "base")
        self._residual = CheckpointReader(self.directory, "residual")
        self._adapter = CheckpointReader(self.directory, "adapter")

    # --- non-adapted tensors -------------------------------------------------------------------------------
    def base_names(self) -> list[str]:
        return self._base.names()

    def base_tensor(self, name: str) -> torch.Tensor:
        return self._base.get(name)

    def bias(self, module: str) -> torch.Tensor | None:
        name = f"{module}.bias"
        return self._base.get(name) if name in self._base else None

    # --- adapted modules -----------------------------------------------------------------------------------
    def is_quantized(self) -> bool:
        return self.config.prepare.quant.quant_type == "nf4"

    def nf4_weight(self, module: str) -> NF4Weight:
        q = self.config.prepare.quant
        tensors = {f"{module}.nf4.{f}": self._residual.get(f"{module}.nf4.{f}")
                   for f in _NF4_FIELDS if f"{module}.nf4.{f}" in self._residual}
        return NF4Weight.from_tensors(tensors, f"{module}.nf4", q.blocksize, q.compute_dtype)

    def residual(self, module: str) -> NF4Weight | torch.Tensor:
        return self.nf4_weight(module) if self.is_quantized() else self._residual.get(f"{module}.residual")

    def residual_dense(self, module: str) -> torch.Tensor:
        r = self.residual(module)
        return r.dequantize().float() if isinstance(r, NF4Weight) else r.float()

    def nf4_parts(self, module: str) -> NF4Parts:
        if not self.is_quantized():
            raise QosoraError(f"{self.directory} keeps its residual unquantized (quant_type=none): there are no NF4 parts")
        w = self.nf4_weight(module)
        return NF4Parts(w.data.reshape(-1), w.absmax_fp32(), w.shape, self.config.prepare.quant.blocksize)

    def factors(self, module: str) -> dict[str, torch.Tensor]:
        return {n: self._adapter.get(f"{module}.{n}") for n in self.spec.factors}

    def lowrank(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B fp32 (d_out, r), A fp32 (r, d_in)) with adapter(x) = B (A x)."""
        return self.spec.lowrank(self.factors(module))

    def merged_weight(self, module: str) -> torch.Tensor:
        """deq(NF4(W_res)) + B A in fp32: the function that was trained."""
        B, A = self.lowrank(module)
        return self.residual_dense(module) + B @ A

    def layer(self, module: str) -> SVDAdapterLinear:
        return SVDAdapterLinear(
            self.config.prepare.method, self.residual(module), self.factors(module), self.bias(module),
            compute_dtype=self.config.prepare.quant.compute_dtype,
        )

    def stats(self) -> dict:
        path = self.directory / STATS_NAME
        return json.loads(path.read_text()) if path.is_file() else {}


def _rebuild_rotary(model: torch.nn.Module) -> None:
    # Rotary embeddings hold non-persistent buffers (inv_freq) that a meta-device model leaves empty.
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=model.config))


def load(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | str | None = None,
):
    """Build the transformers model of a prepared/trained directory, adapted linears replaced by SVDAdapterLinear.

    No SVD runs: the stored residual and factors are loaded as they are, so the model is bit-identical to the one
    that was saved. `dtype` casts the non-adapted weights (embeddings, norms); the factors keep their stored dtype.
    `compute_dtype` overrides the adapted layers' compute dtype (default: the prepared one, bf16); float32 evaluates
    the stored function exactly, deq(W_res) x + B (A x), as the ONNX export's parity check needs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = PreparedReader(directory)
    hf_config = AutoConfig.from_pretrained(reader.directory)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32)
    if isinstance(compute_dtype, str):
        compute_dtype = DTYPES[compute_dtype]
    for module in reader.modules:
        parent_name, _, child = module.rpartition(".")
        layer = reader.layer(module)
        if compute_dtype is not None:
            layer.set_compute_dtype(compute_dtype)
        setattr(model.get_submodule(parent_name), child, layer)
    state = {n: reader.base_tensor(n) for n in reader.base_names() if not _is_adapted_bias(n, reader.modules)}
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise QosoraError(f"{directory}: base.safetensors has tensors the model does not know ({unexpected[:3]}...): corrupt directory")
    _rebuild_rotary(model)
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise QosoraError(f"{directory}: tensors missing from base.safetensors ({still_meta[:3]}): corrupt directory")
    return model.to(device).eval()


def _is_adapted_bias(name: str, modules: list[str]) -> bool:
    return name.endswith(".bias") and name[: -len(".bias")] in set(modules)


def write_adapter(layers: dict[str, SVDAdapterLinear], out_dir: Path, adapter_dtype: str) -> None:
    writer = ShardedWriter(out_dir, "adapter", max_shard_bytes=1 << 40)
    for name, layer in layers.items():
        for fname, t in layer.factors().items():
            writer.add(f"{name}.{fname}", t.detach().to(DTYPES[adapter_dtype]))
    writer.close()


def save_trained(model, src_dir: str | Path, out_dir: str | Path, trained_steps: int = 0, overwrite: bool = False) -> Path:
    """Write a prepared-format directory whose adapter holds the model's current factors.

    The residual and base files are unchanged by training: they are hard-linked (or copied) from `src_dir`.
    """
    src = Path(src_dir)
    cfg = QosoraConfig.read(src)
    layers = adapter_layers(model)
    if sorted(layers) != sorted(cfg.modules):
        raise QosoraError(f"the model's adapted modules do not match {src}: was it loaded from that directory?")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("adapter") and f.name != CONFIG_NAME:
                link_or_copy(f, tmp / f.name)
        write_adapter(layers, tmp, cfg.prepare.adapter_dtype)
        cfg.trained_steps = trained_steps
        (tmp / CONFIG_NAME).write_text(cfg.to_json())
    return Path(out_dir)
