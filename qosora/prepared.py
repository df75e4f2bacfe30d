"""The prepared / trained directory (layout in docs/CONTRACTS.md): read it without building a model, write it back.

    qosora_config.json   QosoraConfig: method, rank, targets, NF4 and SVD settings, source model
    base*.safetensors    every tensor that is not adapted (embeddings, norms, lm_head, adapted biases)
    residual*.safetensors  per adapted module: `{module}.nf4.*` (NF4 parts) or `{module}.residual` (dense)
    adapter.safetensors  per adapted module: `{module}.{factor}` for the method's stored factors
    stats.json           per-module SVD spectrum and quantization error, written by prepare

`PreparedReader` hands out one `AdaptedWeight` per module (merge and export stream through it); `save_trained`
writes a model's current factors next to hard links of the unchanged residual and base files.

Every tensor handed out is checked first: its shape against what config.json and the rank imply (`factor_shapes`), and
that it holds no NaN/Inf, so a corrupt or diverged directory fails with its module's name instead of merging,
exporting or evaluating a wrong model. `check()` runs those checks for every module without reading the packed
NF4 codes (merge calls it before writing anything).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qosora.adapted import AdaptedWeight
from qosora.architectures import config_sizes, expected_linear_shapes, parse_linear, read_json_object
from qosora.config import CONFIG_NAME, QosoraConfig
from qosora.errors import QosoraError
from qosora.precision import all_finite
from qosora.files import atomic_directory, link_or_copy
from qosora.layer import SVDAdapterLinear, adapter_layers
from qosora.methods import METHOD_SPECS, factor_shapes
from qosora.nf4 import DTYPES, NF4Weight
from qosora.shards import ShardedWriter, ShardReader

STATS_NAME = "stats.json"
_ONE_SHARD = 1 << 40  # the adapter is small: always one file
_DOUBLE_QUANT_BLOCK = 256  # bitsandbytes' block of the 8-bit quantized scales (qosora.nf4)


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
        if not (self.directory / "config.json").is_file():
            raise QosoraError(f"{self.directory}/config.json is missing: re-run `qosora prepare`")
        self.hf_config = read_json_object(self.directory / "config.json", "re-run `qosora prepare`")
        self._linear_shapes = expected_linear_shapes(config_sizes(self.hf_config, f"{self.directory}/config.json"))
        self.modules = list(self.config.modules)
        for module in self.modules:
            if parse_linear(module) is None:
                raise QosoraError(f"{self.directory}/{CONFIG_NAME} lists {module!r}, which is not an adaptable linear: "
                                  "corrupt directory, re-run `qosora prepare`")
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
        return self._checked(self._base, name, module, self.module_shape(module)[:1]) if name in self._base else None

    # --- adapted modules -----------------------------------------------------------------------------------
    def is_quantized(self) -> bool:
        return self.config.prepare.quant.quant_type == "nf4"

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of an adapted linear, as config.json gives it."""
        return self._linear_shapes[parse_linear(module)[1]]

    def residual(self, module: str) -> NF4Weight | torch.Tensor:
        if not self.is_quantized():
            return self._checked(self._residual, f"{module}.residual", module, self.module_shape(module))
        q = self.config.prepare.quant
        tensors = self._nf4_tensors(module, with_codes=True)
        return NF4Weight.from_tensors(tensors, f"{module}.nf4", q.blocksize, q.compute_dtype)

    def factors(self, module: str) -> dict[str, torch.Tensor]:
        shapes = factor_shapes(*self.module_shape(module), self.config.prepare.rank)
        return {n: self._checked(self._adapter, f"{module}.{n}", module, shapes[n]) for n in self.spec.factors}

    def adapted(self, module: str) -> AdaptedWeight:
        """The module's stored function: residual, factors, method spec and bias (each checked, see module doc)."""
        return AdaptedWeight(self.spec, self.residual(module), self.factors(module), self.bias(module))

    def check(self) -> None:
        """Shape and NaN/Inf checks of every module's factors and residual, without reading the packed NF4 codes."""
        for module in self.modules:
            self.factors(module)
            if self.is_quantized():
                self._nf4_tensors(module, with_codes=False)
            else:
                self.residual(module)

    def layer(self, module: str) -> SVDAdapterLinear:
        return SVDAdapterLinear(self.adapted(module), compute_dtype=self.config.prepare.quant.compute_dtype)

    def stats(self) -> dict:
        path = self.directory / STATS_NAME
        return json.loads(path.read_text()) if path.is_file() else {}

    def _get(self, reader: ShardReader, name: str) -> torch.Tensor:
        if name not in reader:
            raise QosoraError(f"{self.directory}: tensor {name} is missing: corrupt directory, re-run `qosora prepare`")
        return reader.get(name)

    def _checked(self, reader: ShardReader, name: str, module: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name in reader and tuple(reader.shape(name)) != tuple(shape):
            raise QosoraError(f"{self.directory}: {name} has shape {tuple(reader.shape(name))}, but module {module} "
                              f"needs {tuple(shape)} (config.json, rank {self.config.prepare.rank}): corrupt directory, "
                              "re-run `qosora prepare` or restore the file")
        t = self._get(reader, name)
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise QosoraError(f"{self.directory}: module {module}: {name} holds {bad} NaN/Inf values (a diverged run "
                              "or a corrupt file): retrain with a lower --lr, or use an earlier checkpoint")
        return t

    def _nf4_tensors(self, module: str, with_codes: bool) -> dict[str, torch.Tensor]:
        """The NF4 parts of a module's residual (layout in qosora/nf4.py), each checked; `with_codes=False` skips the
        packed codes (`data`, half a byte a weight), which cannot hold a NaN."""
        d_out, d_in = self.module_shape(module)
        n = d_out * d_in
        blocks = -(-n // self.config.prepare.quant.blocksize)
        prefix = f"{module}.nf4"
        shapes = {"shape": (2,), "absmax": (blocks,)}
        if with_codes:
            shapes["data"] = ((n + 1) // 2,)  # two 4-bit codes a byte, stored flat
        if f"{prefix}.absmax_scale" in self._residual:  # double quantization
            shapes.update(absmax_scale=(-(-blocks // _DOUBLE_QUANT_BLOCK),), absmax_code=(256,), absmax_offset=())
        tensors = {f"{prefix}.{f}": self._checked(self._residual, f"{prefix}.{f}", module, shape)
                   for f, shape in shapes.items()}
        if tensors[f"{prefix}.shape"].tolist() != [d_out, d_in]:
            raise QosoraError(f"{self.directory}: {prefix}.shape is {tensors[f'{prefix}.shape'].tolist()}, but module "
                              f"{module} is {d_out} x {d_in} (config.json): corrupt directory, re-run `qosora prepare`")
        return tensors


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
