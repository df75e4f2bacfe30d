"""`qosora train` and `qosora demo` against careless input: no stale reuse, nothing destroyed, nothing half-written,
no silent success that learned nothing, strict JSON on stdout (issue #10)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qosora.errors import QosoraError
from qosora.prepared import PreparedReader
from qosora.train.loop import TrainConfig, finetune

from conftest import (TRAIN_MODEL, assert_one_line_error, build_tiny_model, char_tokenizer, make_prepared,
                      reversal_data, run_cli, write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp")]


@pytest.fixture
def hf(tmp_path):
    build_tiny_model(tmp_path / "hf", tokenizer=char_tokenizer(), **TRAIN_MODEL)
    return tmp_path / "hf"


def train_args(model, data, out, *extra):
    return ["train", model, "--data", data, "--out", out, "--steps", "1", "--seq-len", "32", "--batch-size", "4",
            *extra]


def test_stale_prepared_from_another_method_is_not_reused(tmp_path, hf, capsys):
    data, out = reversal_data(tmp_path / "d.jsonl"), tmp_path / "R"
    # An earlier run with osora r4 that failed after preparing: OUT holds only prepared/.
    rc, _, _ = run_cli(capsys, *train_args(hf, data, out, "--method", "osora", "--rank", "4"))
    assert rc == 0
    (out / "train_config.json").unlink()
    for f in out.iterdir():
        if f.name != "prepared":
            (os.remove(f) if f.is_file() else __import__("shutil").rmtree(f))
    rc, _, err = run_cli(capsys, *train_args(hf, data, out, "--method", "sorsa", "--rank", "8"))
    assert rc == 0, err
    prepared = PreparedReader(out / "prepared").config.prepare
    assert (prepared.method, prepared.rank) == ("sorsa", 8)
    assert PreparedReader(out).config.prepare.method == "sorsa"


def test_failed_train_leaves_no_out_and_unrelated_dirs_are_refused(tmp_path, hf, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    rc, out, err = run_cli(capsys, *train_args(hf, bad, tmp_path / "R", "--method", "sorsa", "--rank", "4"))
    assert_one_line_error(rc, out, err, "train", "bad.jsonl:2")
    assert leftovers(tmp_path, "R") == []
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    rc, out, err = run_cli(capsys, *train_args(hf, reversal_data(tmp_path / "d.jsonl"), other, "--method", "sorsa",
                                               "--rank", "4"))
    assert_one_line_error(rc, out, err, "train", "not a qosora run")
    assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-grad-norm", "-1", "--max-grad-norm must be > 0"),
    ("--min-lr-ratio", "-1", "--min-lr-ratio must be >= 0"),
    ("--warmup-steps", "-5", "--warmup-steps must be >= 0"),
    ("--lr", "nan", "--lr must be a finite number"),
    ("--epochs", "inf", "--epochs must be a finite number"),
    ("--eval-fraction", "0.9", "--eval-fraction must be <= 0.5"),
])
def test_sign_flipping_and_non_finite_values_are_refused(tmp_path, hf, capsys, flag, value, needle):
    rc, out, err = run_cli(capsys, *train_args(hf, reversal_data(tmp_path / "d.jsonl"), tmp_path / "R",
                                               "--method", "sorsa", "--rank", "4", flag, value))
    assert_one_line_error(rc, out, err, "train", needle)
    assert leftovers(tmp_path, "R") == []


@pytest.mark.parametrize("rows", [
    [{"prompt": "x" * 40, "completion": "abc"}] * 4,  # every label past --seq-len 32
    [{"text": ""}] * 4,                              # nothing to learn
], ids=["truncated", "empty"])
def test_training_that_can_learn_nothing_is_an_error(tmp_path, hf, capsys, rows):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rc, out, err = run_cli(capsys, *train_args(hf, data, tmp_path / "R", "--method", "sorsa", "--rank", "4"))
    assert_one_line_error(rc, out, err, "train", "no example has a completion token within --seq-len 32")
    assert leftovers(tmp_path, "R") == []


def test_out_equal_to_the_prepared_input_is_refused_before_anything_is_written(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "sorsa")
    before = (prepared / "adapter.safetensors").read_bytes()
    rc, out, err = run_cli(capsys, *train_args(prepared, reversal_data(tmp_path / "d.jsonl"), prepared))
    assert_one_line_error(rc, out, err, "train", "overwrite the input")
    assert (prepared / "adapter.safetensors").read_bytes() == before


def _run(prepared, data, out, **kw):
    cfg = dict(data=str(data), out=str(out), steps=4, lr=3e-3, batch_size=4, seq_len=32, save_every=2)
    cfg.update(kw)
    return TrainConfig(**cfg)


def test_resume_checks_the_prepared_model_and_falls_back_past_a_truncated_checkpoint(tmp_path):
    prepared, data = make_prepared(tmp_path, "sorsa"), reversal_data(tmp_path / "d.jsonl")
    full = finetune(prepared, _run(prepared, data, tmp_path / "full", save_every=1), progress=False)
    # Killed after step 3: checkpoints step-2 and step-3, the newest truncated on disk.
    finetune(prepared, _run(prepared, data, tmp_path / "R", save_every=1), progress=False, stop_after=3)
    newest = sorted((tmp_path / "R" / "checkpoints").iterdir())[-1]
    assert newest.name == "step-000003"
    (newest / "optimizer.safetensors").write_bytes((newest / "optimizer.safetensors").read_bytes()[:100])
    # A different residual with the same shapes must not continue silently.
    other = make_prepared(tmp_path / "o", "sorsa")
    with open(other / "residual.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
        f.truncate()
    with pytest.raises(QosoraError, match="prepared model differs"):
        finetune(other, _run(other, data, tmp_path / "R", save_every=1), resume=True, progress=False)
    # Moved run directory: resumes (from step 2, the newest readable) and ends where the uninterrupted run ended.
    os.replace(tmp_path / "R", tmp_path / "moved")
    res = finetune(prepared, _run(prepared, data, tmp_path / "moved", save_every=1), resume=True, progress=False)
    assert res.resumed_from == 2 and res.steps == 4
    a, b = PreparedReader(tmp_path / "full"), PreparedReader(tmp_path / "moved")
    for m in a.modules:
        for name, t in a.factors(m).items():
            assert torch.equal(t, b.factors(m)[name]), (m, name)
    assert full.steps == 4
    with pytest.raises(QosoraError, match="already finished"):
        finetune(prepared, _run(prepared, data, tmp_path / "moved", save_every=1), resume=True, progress=False)


def test_corrupt_train_config_on_resume_is_an_error(tmp_path, capsys):
    prepared, data = make_prepared(tmp_path, "sorsa"), reversal_data(tmp_path / "d.jsonl")
    finetune(prepared, _run(prepared, data, tmp_path / "R"), progress=False, stop_after=2)
    (tmp_path / "R" / "train_config.json").write_text("{not json")
    rc, out, err = run_cli(capsys, *train_args(prepared, data, tmp_path / "R", "--save-every", "2", "--resume"))
    assert_one_line_error(rc, out, err, "train", "train_config.json is corrupt",
                          status=True)  # the "computing in ..." status line comes first
    assert (tmp_path / "R" / "checkpoints").is_dir()  # a resumable run is never removed


def test_json_stdout_is_strict_json_alone(tmp_path, capsys):
    prepared, data = make_prepared(tmp_path, "sorsa"), reversal_data(tmp_path / "d.jsonl")
    rc, out, err = run_cli(capsys, *train_args(prepared, data, tmp_path / "R", "--optim", "adamw8bit", "--json"))
    assert rc == 0, err
    result = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert result["steps"] == 1 and "adamw8bit needs CUDA" in err


def test_no_bf16_computes_adapted_layers_in_fp32(tmp_path, capsys):
    prepared, data = make_prepared(tmp_path, "sorsa"), reversal_data(tmp_path / "d.jsonl")
    rc, _, err = run_cli(capsys, *train_args(prepared, data, tmp_path / "R", "--no-bf16"))
    assert rc == 0 and "computing in fp32" in err, err


def test_demo_validates_before_touching_out_and_replaces_only_its_own(tmp_path, capsys):
    from qosora.commands.demo import MARKER, _claim

    d = tmp_path / "D"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    rc, out, err = run_cli(capsys, "demo", "--out", d, "--overwrite", "--rank", "0")
    assert_one_line_error(rc, out, err, "demo", "--rank must be >= 1")
    assert (d / "keep.txt").read_text() == "mine"
    with pytest.raises(QosoraError, match="already exists"):
        _claim(d, overwrite=False)
    earlier = tmp_path / "earlier"
    (earlier / "run" / "prepared").mkdir(parents=True)
    (earlier / MARKER).write_text("")
    _claim(earlier, overwrite=False)  # an earlier (interrupted) demo's directory: replaced without --overwrite
    assert sorted(p.name for p in earlier.iterdir()) == [MARKER]


def test_threads_follow_the_free_cores():
    from qosora.threads import thread_settings

    assert thread_settings(4, 1.2, {}) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}
    assert thread_settings(2, 0.1, {}) == {}  # quiet: all cores, OpenMP's own (spinning) wait policy
    assert thread_settings(2, 1.9, {}) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert thread_settings(2, 5.0, {}) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}  # never 0
    assert thread_settings(4, 3.0, {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}) == {}  # the user's own
