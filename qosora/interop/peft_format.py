"""A PEFT LoRA adapter directory, as `PeftModel.save_pretrained` writes it and `PeftModel.from_pretrained` reads it.

    adapter_config.json        LoraConfig: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, ...
    adapter_model.safetensors  per adapted linear {m} (e.g. model.layers.0.self_attn.q_proj):
        base_model.model.{m}.lora_A.weight   (r, d_in)
        base_model.model.{m}.lora_B.weight   (d_out, r)

PEFT computes y = W x + s B (A x) with s = lora_alpha / r (lora_alpha / sqrt(r) under use_rslora). `write_lora` sets
lora_alpha = r, so s = 1 and B A is the adapter itself; `read_lora` folds sqrt(s) into each factor. PEFT is not
imported here (it is a test dependency only): the format is plain JSON and safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from qosora.architectures import parse_linear, read_json_object
from qosora.errors import QosoraError
from qosora.precision import all_finite
from qosora.shards import ShardReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEYS = {"A": ".lora_A.weight", "B": ".lora_B.weight"}
# adapter_config.json entries that change what the adapter computes, at their plain values: written as they are here,
# anything else is refused on reading (qosora does not model DoRA, trained biases, extra modules, per-module ranks)
_PLAIN = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}}


def lora_key(module: str, factor: str) -> str:
    """`model.layers.0.self_attn.q_proj`, "A" -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return f"{_PREFIX}{module}{_KEYS[factor]}"


def target_modules(modules: list[str], num_layers: int) -> list[str]:
    """PEFT's `target_modules`: the projection names (q_proj, ...) when every layer adapts the same ones, else the full
    module names (PEFT matches a name exactly or as a dotted suffix, so each names one linear)."""
    projections = sorted({parse_linear(m)[1] for m in modules})
    return projections if len(set(modules)) == num_layers * len(projections) else sorted(modules)


def write_lora(out: Path, lowrank: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, *,
               num_layers: int, base_model: str, metadata: dict[str, str]) -> int:
    """Write `{module: (B (d_out, r), A (r, d_in))}` as a PEFT LoRA with scale 1 into the directory `out`; returns r.

    Every module must have the same r (pad with zeros first). `metadata` goes into the safetensors header.
    """
    (rank,) = {A.shape[0] for _, A in lowrank.values()}
    tensors = {}
    for module, (B, A) in lowrank.items():
        for factor, t in (("A", A), ("B", B)):
            t = t.to(dtype).contiguous()
            if not all_finite(t):
                raise QosoraError(f"module {module}: the LoRA factor {factor} overflows {dtype} (NaN/Inf after the "
                                  "cast): use --dtype bfloat16 or float32")
            tensors[lora_key(module, factor)] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", **metadata})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": target_modules(list(lowrank), num_layers), "init_lora_weights": True,
        "inference_mode": True, "use_rslora": False, "base_model_name_or_path": base_model, **_PLAIN,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return rank


@dataclass
class PeftLora:
    """A PEFT LoRA adapter as read from its directory."""

    directory: Path
    init: str | bool      # init_lora_weights as saved: True, "gaussian", "pissa", ...
    rank: int
    scale: float          # s = lora_alpha / r (or / sqrt(r) with use_rslora), already folded into `factors`
    # module -> (B fp32 (d_out, r), A fp32 (r, d_in)) with sqrt(s) in each: B A = s B_peft A_peft
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_lora(directory: str | Path) -> PeftLora:
    """Read a PEFT LoRA directory, refusing what qosora cannot represent (DoRA, per-module ranks, trained biases,
    modules_to_save, pickled weights), each with a one-line error."""
    directory = Path(directory)
    where = f"--from-peft {directory}"
    if not (directory / ADAPTER_CONFIG).is_file():
        raise QosoraError(f"{where}: no {ADAPTER_CONFIG}: pass a directory written by PEFT's save_pretrained")
    config = read_json_object(directory / ADAPTER_CONFIG, "re-save the adapter with PEFT's save_pretrained")
    if config.get("peft_type") != "LORA":
        raise QosoraError(f"{where}: peft_type is {config.get('peft_type')!r}: only LoRA (and PiSSA) adapters can be "
                          "imported")
    for key, plain in _PLAIN.items():
        if config.get(key, plain) not in (plain, [], None):
            raise QosoraError(f"{where}: {key} = {config[key]!r} is not supported: qosora imports plain LoRA/PiSSA "
                              f"adapters ({key} = {plain!r})")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or isinstance(alpha, bool)
            or not isinstance(alpha, (int, float)) or not alpha > 0):
        raise QosoraError(f"{where}: r = {rank!r}, lora_alpha = {alpha!r} in {ADAPTER_CONFIG}: both must be positive")
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise QosoraError(f"{where}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is never loaded): re-save the "
                          "adapter with save_pretrained(..., safe_serialization=True)")
    return PeftLora(directory, config.get("init_lora_weights", True), rank, scale,
                    _read_factors(ShardReader(directory, ADAPTER_WEIGHTS.removesuffix(".safetensors")), rank, scale,
                                  where))


def _read_factors(reader: ShardReader, rank: int, scale: float, where: str) -> dict:
    root = math.sqrt(scale)
    modules = {}
    for name in reader.names():
        module = next((name[len(_PREFIX):-len(k)] for k in _KEYS.values() if name.startswith(_PREFIX)
                       and name.endswith(k)), None)
        if module is None or parse_linear(module) is None:
            raise QosoraError(f"{where}: tensor {name} is not a LoRA factor of a Llama-shaped linear: qosora imports "
                              "LoRA on q/k/v/o/gate/up/down projections only")
        modules[module] = None
    factors = {}
    for module in modules:
        keys = {f: lora_key(module, f) for f in _KEYS}
        if not all(k in reader for k in keys.values()):
            raise QosoraError(f"{where}: {module} has lora_A or lora_B but not both: incomplete adapter")
        A, B = reader.get(keys["A"]).float(), reader.get(keys["B"]).float()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise QosoraError(f"{where}: {module}: lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)} do not have rank "
                              f"r = {rank}: per-module ranks are not supported")
        if not (all_finite(A) and all_finite(B)):
            raise QosoraError(f"{where}: {module}: the adapter holds NaN/Inf values: a diverged or corrupt adapter")
        factors[module] = (B * root, A * root)
    if not factors:
        raise QosoraError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA factors")
    return factors
