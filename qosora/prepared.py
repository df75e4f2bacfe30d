"""The prepared / trained directory (layout in docs/CONTRACTS.md): read it without building a model, write it back.

    qosora_config.json   QosoraConfig: method, rank, targets, NF4 and SVD settings, source model
    base*.safetensors    every tensor that is not adapted (embeddings, norms, lm_head, adapted biases)
    residual*.safetensors  per adapted module: `{module}.nf4.*` (NF4 parts) or `{module}.residual` (dense)
    adapter.safetensors  per adapted module: `{module}.{factor}` for the method's stored factors
    stats.json           per-module SVD spectrum and quantization error, written by prepare

`PreparedReader` hands out one `AdaptedWeight` per module (merge and export stream through it); `save_trained`
writes a model's current factors next to hard links of the unchanged residual and base files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qosora.adapted import AdaptedWeight
from qosora.config import CONFIG_NAME, QosoraConfig
from qosora.errors import QosoraError
from qosora.files import atomic_directory, link_or_copy
from qosora.layer import SVDAdapterLinear, adapter_layers
from qosora.methods import METHOD_SPECS
from qosora.nf4 import DTYPES, NF4Weight
from qosora.shards import ShardedWriter, ShardReader

STATS_NAME = "stats.json"
_NF4_FIELDS = ("data", "shape", "absmax", "absmax_scale", "absmax_code", "absmax_offset")
_ONE_SHARD = 1 << 40  # the adapter is small: always one file


def is_prepared(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()


class PreparedReader:
    """Lazy, model-free access to a prepared or trained directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise QosoraError(f"{self.directory} is not a directory: pass a directory written by `qosora prepare` "
                              "or `qosora train`")
        self.config = QosoraConfig.read(self.directory)
        try:
            self.hf_config = json.loads((self.directory / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise QosoraError(f"{self.directory}/config.json is missing or corrupt ({e}): re-run `qosora prepare`") from None
        self.modules = list(self.config.modules)
        self.spec = METHOD_SPECS[self.config.prepare.method]
        self._base = ShardReader(self.directory, "base")
        self._residual = ShardReader(self.directory, "residual")
        self._adapter = ShardReader(self.directory, "adapter")

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

    def residual(self, module: str) -> NF4Weight | torch.Tensor:
        if not self.is_quantized():
            return self._get(self._residual, f"{module}.residual")
        q = self.config.prepare.quant
        tensors = {f"{module}.nf4.{f}": self._residual.get(f"{module}.nf4.{f}")
                   for f in _NF4_FIELDS if f"{module}.nf4.{f}" in self._residual}
        for required in ("data", "shape", "absmax"):
            if f"{module}.nf4.{required}" not in tensors:
                raise QosoraError(f"{self.directory}: {module}.nf4.{required} is missing from the residual: "
                                  "corrupt directory, re-run `qosora prepare`")
        return NF4Weight.from_tensors(tensors, f"{module}.nf4", q.blocksize, q.compute_dtype)

    def factors(self, module: str) -> dict[str, torch.Tensor]:
        return {n: self._get(self._adapter, f"{module}.{n}") for n in self.spec.factors}

    def adapted(self, module: str) -> AdaptedWeight:
        """The module's stored function: residual, factors, method spec and bias."""
        return AdaptedWeight(self.spec, self.residual(module), self.factors(module), self.bias(module))

    def layer(self, module: str) -> SVDAdapterLinear:
        return SVDAdapterLinear(self.adapted(module), compute_dtype=self.config.prepare.quant.compute_dtype)

    def stats(self) -> dict:
        path = self.directory / STATS_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def _get(self, reader: ShardReader, name: str) -> torch.Tensor:
        if name not in reader:
            raise QosoraError(f"{self.directory}: tensor {name} is missing: corrupt directory, re-run `qosora prepare`")
        return reader.get(name)


def write_adapter(layers: dict[str, SVDAdapterLinear], out_dir: Path, adapter_dtype: str) -> None:
    writer = ShardedWriter(out_dir, "adapter", max_shard_bytes=_ONE_SHARD)
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
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[src]) as tmp:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("adapter") and f.name != CONFIG_NAME:
                link_or_copy(f, tmp / f.name)
        write_adapter(layers, tmp, cfg.prepare.adapter_dtype)
        cfg.trained_steps = trained_steps
        (tmp / CONFIG_NAME).write_text(cfg.to_json())
    return Path(out_dir)
