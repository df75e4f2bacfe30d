"""Training checkpoints: everything a killed run needs to continue bit-for-bit, in safetensors + JSON (no pickle).

    OUT/checkpoints/step-000120/
        trainable.safetensors   fp32 trainable factors, by parameter name
        optimizer.safetensors   every tensor of optimizer.state_dict()["state"], as "{param index}.{key}"
        optimizer.json          param_groups and the non-tensor state entries
        scheduler.json          lr scheduler state_dict
        rng.safetensors         torch CPU (and CUDA) generator states
        state.json              step, tokens seen, the data position (= step: batch order is a function of it)

Each checkpoint directory is written atomically (temporary directory + rename), so the newest `step-*` directory
is always complete; older ones beyond `keep` are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qosora.files import atomic_directory

CHECKPOINTS = "checkpoints"


def step_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / "state.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def latest(out: Path) -> Path | None:
    dirs = step_dirs(out)
    return dirs[-1] if dirs else None


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(out: Path, step: int, named_params: dict[str, torch.nn.Parameter], optimizer, scheduler,
         extra_state: dict, keep: int = 2) -> Path:
    path = out / CHECKPOINTS / f"step-{step:06d}"
    with atomic_directory(path, overwrite=True) as tmp:
        save_file({n: p.detach().cpu().contiguous() for n, p in named_params.items()}, tmp / "trainable.safetensors")
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda_{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra_state}, indent=1))
    for old in step_dirs(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return path


def restore(path: Path, named_params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict:
    """Load a checkpoint into the live objects; return its state.json."""
    trained = load_file(path / "trainable.safetensors")
    if sorted(trained) != sorted(named_params):
        raise ValueError(f"{path}: trainable parameters differ from the model's")
    with torch.no_grad():
        for name, p in named_params.items():
            p.copy_(trained[name])
    device = next(iter(named_params.values())).device
    tensors = {k: v.to(device) for k, v in load_file(path / "optimizer.safetensors").items()}
    optimizer.load_state_dict(_optimizer_from_files(tensors, json.loads((path / "optimizer.json").read_text())))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return json.loads((path / "state.json").read_text())
