"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends with the same factors as an uninterrupted
one (CPU, fixed seed); checkpoints are atomic and hold no pickles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qosora.errors import QosoraError
from qosora.train.loop import TrainConfig, finetune

from conftest import make_prepared, reversal_data

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp: Path, name: str, **kw) -> TrainConfig:
    base = dict(data=str(reversal_data(tmp / "data.jsonl")), out=str(tmp / name), steps=12, lr=3e-3, batch_size=4,
                seq_len=32, save_every=4, eval_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_in_process_equals_uninterrupted(tmp_path):
    prepared = make_prepared(tmp_path, "sorsa")
    full = finetune(prepared, config(tmp_path, "full"), progress=False)
    part = finetune(prepared, config(tmp_path, "part"), progress=False, stop_after=6)
    assert part.steps == 6
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert ckpts == ["step-000004"]
    files = {p.name for p in (tmp_path / "part" / "checkpoints" / "step-000004").iterdir()}
    assert files == {"trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                     "rng.safetensors", "state.json"}
    with pytest.raises(QosoraError, match="--resume"):
        finetune(prepared, config(tmp_path, "part"), progress=False)
    with pytest.raises(QosoraError, match="different options.*lr"):
        finetune(prepared, config(tmp_path, "part", lr=1e-3), progress=False, resume=True)
    resumed = finetune(prepared, config(tmp_path, "part"), progress=False, resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == 12
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "part" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl has each step once, with the same losses as the uninterrupted run.
    rows = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["step"], r.get("loss")) for r in rows("part")] == [(r["step"], r.get("loss")) for r in rows("full")]


def _train_cmd(prepared: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qosora", "train", str(prepared), "--data", str(data), "--out", str(out),
            "--steps", "150", "--save-every", "10", "--lr", "3e-3", "--batch-size", "4", "--seq-len", "32",
            "--keep-checkpoints", "1", "--json", *extra]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    prepared = make_prepared(tmp_path, "pissa")
    data = reversal_data(tmp_path / "data.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run(_train_cmd(prepared, data, tmp_path / "full"), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(prepared, data, tmp_path / "killed"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_root = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt_root.is_dir() and any(d.name >= "step-000030" for d in ckpt_root.iterdir() if not d.name.startswith(".")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()  # no final model from a killed run

    out = subprocess.run(_train_cmd(prepared, data, tmp_path / "killed", "--resume"), check=True, env=env,
                         capture_output=True, text=True)
    result = json.loads(out.stdout)
    assert 30 <= result["resumed_from"] < 150 and result["steps"] == 150
    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "killed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
