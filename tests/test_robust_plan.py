"""`qosora plan` on bad options and configs: one-line errors (exit 2), never a negative byte count; the flags are
derived from PlanOptions."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import get_args

import pytest

from conftest import assert_one_line_error, run_cli
from qosora.cli import main
from qosora.planning import ModelDims, PlanOptions, plan, run_plan


@pytest.mark.parametrize("flags, needle", [
    (["--rank", "0"], "--rank must be >= 1"),
    (["--rank", "-8"], "--rank must be >= 1"),
    (["--rank", "4097"], "rank 4097 is too large"),
    (["--seq-len", "0"], "--seq-len must be >= 1"),
    (["--seq-len", "-2048"], "--seq-len must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch-size", "-1"], "--batch-size must be >= 1"),
    (["--gpu-memory", "0"], "--gpu-memory must be > 0"),
    (["--gpu-memory", "-24"], "--gpu-memory must be > 0"),
    (["--gpu-memory", "nan"], "--gpu-memory must be a finite number"),
    (["--targets", "q,attn"], "unknown target 'attn'"),
])
def test_bad_options_are_one_line_errors(capsys, flags, needle):
    rc, out, err = run_cli(capsys, "plan", "--config", "llama-2-7b", "--json", *flags)
    assert_one_line_error(rc, out, err, "plan", needle)


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "holds an array where a JSON object belongs"),
    ("null", "holds null where a JSON object belongs"),
    ("7", "holds a number"),
    ("{", "is not valid JSON"),
    ('{"hidden_size": 64}', "lacks 'intermediate_size'"),
    ('{"hidden_size": 0, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 1}',
     "hidden_size = 0 is not a positive integer"),
    ('{"hidden_size": "4096", "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, '
     '"vocab_size": 1}', "hidden_size = '4096'"),
])
def test_config_that_is_not_a_llama_shaped_object(tmp_path, capsys, text, needle):
    path = tmp_path / "config.json"
    path.write_text(text)
    rc, out, err = run_cli(capsys, "plan", "--config", path, "--json")
    assert_one_line_error(rc, out, err, "plan", needle)
    rc, out, err = run_cli(capsys, "plan", "--config", tmp_path, "--json")  # a model directory reads the same file
    assert_one_line_error(rc, out, err, "plan", needle)


def test_never_a_negative_component_over_the_option_grid():
    dims = ModelDims(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)
    for method, rank, seq, batch, optim, ckpt, chunked, device in itertools.product(
            ("sorsa", "osora", "pissa", "qlora"), (1, 32), (1, 4096), (1, 3), ("adamw", "adamw8bit"),
            (False, True), (False, True), ("cuda", "cpu")):
        report = plan(dims, method, rank, seq, batch, optim, ckpt, chunked, device=device)
        assert all(v >= 0 for v in report.components.values()), (method, rank, report.components)
        assert report.total_bytes > 0 and report.trainable_params > 0


def test_library_call_validates_like_the_cli():
    with pytest.raises(Exception, match="--rank must be >= 1"):
        plan("llama-2-7b", rank=0)
    with pytest.raises(Exception, match="--seq-len must be >= 1"):
        run_plan(PlanOptions(config="llama-2-7b", seq_len=-1))
    with pytest.raises(Exception, match="unknown --method 'dora'"):
        plan("llama-2-7b", method="dora")


def test_flags_are_derived_from_plan_options(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(PlanOptions):
        if f.metadata.get("cli", True):
            assert (f.metadata.get("flag") or "--" + f.name.replace("_", "-")) in text, f.name


def test_optimizer_choices_match_the_trainer():
    from qosora.planning import Optim as PlanOptim
    from qosora.train.optim import OPTIMS

    assert get_args(PlanOptim) == OPTIMS


def test_cli_json_is_strict_and_matches_the_library(capsys):
    rc, out, err = run_cli(capsys, "plan", "--config", "qwen2.5-7b", "--rank", "16", "--targets", "q,v",
                           "--full-logits", "--device", "cpu", "--json")
    assert rc == 0, err
    d = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    ref = plan("qwen2.5-7b", rank=16, targets=("q_proj", "v_proj"), chunked_loss=False, device="cpu")
    assert d["total_bytes"] == ref.total_bytes and d["chunked_loss"] is False and d["device"] == "cpu"
