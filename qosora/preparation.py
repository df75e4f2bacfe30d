"""`qosora prepare`: stream a Hugging Face checkpoint, split every targeted linear by SVD, quantize the residual.

    for each tensor, in layer order (one resident at a time, read by positioned reads):
        targeted linear W  ->  principal (U, S, Vh in bf16)  +  NF4(W - principal)   [+ stats]
        anything else      ->  copied as is into base.safetensors

Peak memory is one weight in fp32 plus its SVD workspace plus one output shard, never the whole model.
The output directory is written atomically (temporary directory + rename). Before anything is written, config.json
is checked against the weights' names and shapes; a NaN/Inf weight stops the run, naming the tensor.
"""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from qosora import __version__
from qosora.architectures import check_config_matches_weights, check_supported, layer_index, parse_linear, read_hf_config
from qosora.config import CONFIG_NAME, PrepareConfig, QosoraConfig, QuantConfig
from qosora.decompose import check_rank, principal_split, relative_error
from qosora.errors import QosoraError
from qosora.files import atomic_directory, copy_side_files
from qosora.methods import METHOD_SPECS, Factors
from qosora.nf4 import DTYPES, NF4Weight, nf4_roundtrip, quantize_nf4
from qosora.precision import all_finite, resolve_device
from qosora.prepared import STATS_NAME
from qosora.shards import ShardedWriter, ShardReader

# (module name, weight shape) -> adapt it?
FilterFn = Callable[[str, tuple[int, int]], bool]


class ImportedFactors(Protocol):
    """Factors brought from elsewhere instead of the method's initialisation (qosora.interop.peft_in)."""

    source: dict  # merged into qosora_config.json's `source`: where the factors came from

    def split(self, module: str, W: torch.Tensor) -> tuple[Factors, torch.Tensor]:
        """(the method's factors, the principal the residual is W minus) of one module."""


@dataclass
class PrepareReport:
    method: str
    rank: int
    layers: int
    trainable_params: int
    frozen_params: int
    mean_rel_error: float
    mean_rel_error_plain_nf4: float | None  # None under quant_type="none": nothing was quantized
    seconds: float
    out_dir: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """A NaN or Inf in a weight would become a NaN layer (QLoRA) or an SVD failure: refuse it, naming the tensor."""
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise QosoraError(f"{where}: tensor {name} has {bad} NaN/Inf values: the checkpoint is corrupt; "
                          "re-download or re-save the model")


def select_modules(reader: ShardReader, config: PrepareConfig, filter_fn: FilterFn | None) -> list[str]:
    modules = []
    for name in reader.names():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        parsed = parse_linear(module)
        if parsed is None or parsed[1] not in config.targets:
            continue
        shape = reader.shape(name)  # 2-D with the config's sizes: check_config_matches_weights ran first
        if reader.dtype(name) not in ("F32", "F16", "BF16", "F64"):
            raise QosoraError(f"{reader.directory}: {name} is stored as {reader.dtype(name)}: qosora prepares 16/32-bit "
                              "float checkpoints, not already-quantized ones")
        if filter_fn is not None and not filter_fn(module, shape):
            continue
        check_rank(config.rank, shape, module)
        modules.append(module)
    if not modules:
        raise QosoraError(f"no linear layer matched targets {','.join(config.targets)}: check --targets (and the filter)")
    return sorted(modules, key=lambda m: (layer_index(m), m))


def module_seeds(seed: int, modules: list[str]) -> dict[str, int]:
    """Each module's seed (its randomized SVD, QLoRA's A init): `seed` plus its index in layer order."""
    return {m: seed + i for i, m in enumerate(modules)}


def initial_factors(W: torch.Tensor, config: PrepareConfig, seed: int) -> tuple[Factors, list[float]]:
    """The method's initial factors of one weight (adapter dtype, on W's device) and its top-r singular values.

    `seed` drives this module's randomized SVD and (QLoRA) its A init; no global RNG state is used, so modules can
    be decomposed concurrently and the result does not depend on the order.
    """
    spec = METHOD_SPECS[config.method]
    generator = torch.Generator().manual_seed(seed)
    config = replace(config, svd=replace(config.svd, seed=seed))
    q = config.quant
    roundtrip = lambda R: nf4_roundtrip(R, q.blocksize, q.double_quant, q.compute_dtype, q.scale)  # noqa: E731
    adapter_dtype = DTYPES[config.adapter_dtype]
    d_out, d_in = W.shape
    if spec.uses_svd:
        principal, _ = principal_split(W, config.rank, config.svd, store_dtype=adapter_dtype,
                                       quant_roundtrip=roundtrip if q.quant_type == "nf4" else None)
        factors = spec.init(principal, d_out, d_in, config.rank, generator)
        singular_values = principal.S.float().tolist()
    else:
        factors = spec.init(None, d_out, d_in, config.rank, generator)
        singular_values = []
    return {n: t.to(device=W.device, dtype=adapter_dtype) for n, t in factors.items()}, singular_values


def store_residual(W: torch.Tensor, principal: torch.Tensor, quant: QuantConfig) -> NF4Weight | torch.Tensor:
    """W - principal as prepare stores it: NF4 under `quant` (blocks, double quantization, scale search), or dense
    fp32 with `quant_type="none"`. `qosora convert --to lora` re-runs it to check a base model bit for bit."""
    residual = W.float() - principal
    if quant.quant_type != "nf4":
        return residual
    return quantize_nf4(residual, quant.blocksize, quant.double_quant, quant.compute_dtype, quant.scale)


def decompose_module(W: torch.Tensor, config: PrepareConfig, seed: int,
                     imported: tuple[Factors, torch.Tensor] | None = None):
    """One weight -> (residual to store, factors, stats). All math in fp32 on W's device.

    `imported` = (factors, principal) brought from elsewhere (`qosora prepare --from-peft`, qosora.interop.peft_in)
    replaces the method's initialisation: the residual is then W - principal.
    """
    spec = METHOD_SPECS[config.method]
    q = config.quant
    d_out, d_in = W.shape
    if imported is None:
        factors, singular_values = initial_factors(W, config, seed)
        # The residual is W minus the adapter *as stored*, so residual + adapter == W exactly before quantization.
        B, A = spec.lowrank(factors)
        principal = B @ A
    else:
        (factors, principal), singular_values = imported, []
        factors = {n: t.to(device=W.device, dtype=DTYPES[config.adapter_dtype]) for n, t in factors.items()}
        principal = principal.to(device=W.device, dtype=torch.float32)
    stored = store_residual(W, principal, q)
    factors = {n: t.cpu() for n, t in factors.items()}
    if isinstance(stored, NF4Weight):
        deq = stored.dequantize().float()
        plain = nf4_roundtrip(W, q.blocksize, q.double_quant, q.compute_dtype)  # bitsandbytes' NF4(W), QLoRA's base
        stats = {"rel_error": relative_error(deq + principal, W), "rel_error_plain_nf4": relative_error(plain, W)}
        stored = stored.to("cpu")
    else:
        stats = {"rel_error": relative_error(stored + principal, W), "rel_error_plain_nf4": None}
        stored = stored.cpu()
    stats.update(shape=[d_out, d_in], rank=config.rank, singular_values=singular_values,
                 trainable=spec.trainable_count(d_out, d_in, config.rank))
    return stored, factors, stats


def _in_order(fn, items: list, workers: int):
    """Yield (item, fn(item)) in order, computing up to `workers` items ahead in threads.

    On CPU two decompositions in two threads with one intra-op thread each beat one decomposition on two intra-op
    threads by ~1.6x on SmolLM2: the small QR / SVD calls of a randomized SVD do not scale across threads. At most
    `workers + 1` results are held at once, so memory stays a couple of weights.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            window: deque = deque()
            for item in items:
                window.append((item, pool.submit(fn, item)))
                if len(window) > workers:
                    done, future = window.popleft()
                    yield done, future.result()
            while window:
                done, future = window.popleft()
                yield done, future.result()
    finally:
        torch.set_num_threads(threads)


def prepare(
    model_dir: str | Path,
    out_dir: str | Path,
    config: PrepareConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 512 << 20,
    imported: ImportedFactors | None = None,
) -> PrepareReport:
    """Split every targeted linear of the checkpoint in `model_dir` and write a prepared directory to `out_dir`.

    `filter_fn(module_name, (d_out, d_in)) -> bool` narrows the targets further (Python API only). `imported`
    supplies each module's factors and principal instead of the SVD (`qosora prepare --from-peft`).
    """
    start = time.perf_counter()
    config = (config or PrepareConfig())
    config = replace(config, targets=PrepareConfig.normalize_targets(config.targets)).validate()
    model_dir = Path(model_dir)
    hf_config = read_hf_config(model_dir)
    model_type = check_supported(hf_config, str(model_dir))
    reader = ShardReader(model_dir)
    check_config_matches_weights(hf_config, reader.names(), reader.shape, str(model_dir))
    modules = select_modules(reader, config, filter_fn)
    adapted = {f"{m}.weight" for m in modules}
    device = resolve_device(device)

    stats: dict[str, dict] = {}
    frozen = 0
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[model_dir]) as tmp:
        base = ShardedWriter(tmp, "base", max_shard_bytes)
        residual_writer = ShardedWriter(tmp, "residual", max_shard_bytes)
        adapter_writer = ShardedWriter(tmp, "adapter", max_shard_bytes=1 << 40)
        names = sorted(reader.names(), key=lambda n: (layer_index(n), n))
        seeds = module_seeds(config.svd.seed, modules)

        def task(name: str):
            tensor = reader.get(name)
            check_finite(tensor, name, str(model_dir))
            if name not in adapted:
                return tensor, None
            module, W = name[: -len(".weight")], tensor.to(device)
            given = None if imported is None else imported.split(module, W)
            return tensor, decompose_module(W, config, seeds[module], given)

        bar = tqdm(total=len(modules), desc=f"prepare {config.method} r={config.rank}", unit="linear", disable=not progress)
        spec = METHOD_SPECS[config.method]
        for name, (tensor, result) in _in_order(task, names, workers=1 if device.type == "cuda" else 2):
            frozen += tensor.numel()
            if result is None:
                base.add(name, tensor)
                continue
            module = name[: -len(".weight")]
            stored, factors, module_stats = result
            if isinstance(stored, torch.Tensor):
                residual_writer.add(f"{module}.residual", stored)
            else:
                for k, t in stored.to_tensors(f"{module}.nf4").items():
                    residual_writer.add(k, t)
            for fname, t in factors.items():
                adapter_writer.add(f"{module}.{fname}", t)
                if fname not in spec.trainable:
                    frozen += t.numel()
            stats[module] = module_stats
            bar.update(1)
            bar.set_postfix(err=f"{module_stats['rel_error']:.4f}", refresh=False)
        bar.close()
        base.close()
        residual_writer.close()
        adapter_writer.close()
        copy_side_files(model_dir, tmp)
        qcfg = QosoraConfig(
            prepare=config, model_type=model_type, modules=modules,
            source={"path": str(model_dir.resolve()), "fingerprint": reader.fingerprint(),
                    **(imported.source if imported is not None else {})},
            qosora_version=__version__,
        )
        (tmp / CONFIG_NAME).write_text(qcfg.to_json())
        (tmp / STATS_NAME).write_text(json.dumps(stats, indent=1))

    errs = [s["rel_error"] for s in stats.values()]
    plain = [s["rel_error_plain_nf4"] for s in stats.values() if s["rel_error_plain_nf4"] is not None]
    return PrepareReport(
        method=config.method, rank=config.rank, layers=len(modules),
        trainable_params=sum(s["trainable"] for s in stats.values()), frozen_params=frozen,
        mean_rel_error=sum(errs) / len(errs), mean_rel_error_plain_nf4=sum(plain) / len(plain) if plain else None,
        seconds=time.perf_counter() - start, out_dir=str(out_dir),
    )
