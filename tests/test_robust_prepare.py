"""`qosora prepare` on bad inputs: a clear one-line error (exit 2), nothing written, the input untouched.

Non-finite weights, config.json that does not describe the weights (or is not a JSON object), malformed linear
weights, an --out that would destroy the input, and strict JSON under --json (no NaN).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, build_tiny_model, files_under, run_cli


@pytest.fixture
def src(tmp_path) -> Path:
    build_tiny_model(tmp_path / "src", "llama")
    return tmp_path / "src"


def edit_weights(src: Path, edit) -> None:
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})


def edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def prepare_fails(capsys, tmp_path, src, *needles, extra=()):
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, "prepare", src, "--rank", 4, "--out", tmp_path / "out", "--json", *extra)
    assert_one_line_error(rc, out, err, "prepare", *needles)
    assert files_under(tmp_path) == before  # no --out, no hidden .out.tmp-* directory


@pytest.mark.parametrize("method", ["sorsa", "qlora"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_targeted_weight_is_refused_naming_the_tensor(src, tmp_path, capsys, method, value):
    name = "model.layers.1.self_attn.k_proj.weight"
    edit_weights(src, lambda s: s[name].__setitem__((3, 5), value))
    prepare_fails(capsys, tmp_path, src, name, "NaN/Inf", extra=("--method", method))


def test_non_finite_norm_weight_is_refused_too(src, tmp_path, capsys):
    name = "model.layers.0.input_layernorm.weight"
    edit_weights(src, lambda s: s[name].__setitem__(0, float("nan")))
    prepare_fails(capsys, tmp_path, src, name)


@pytest.mark.parametrize("changes, needles", [
    ({"hidden_size": 96, "head_dim": 16}, ("q_proj.weight has shape (64, 64)", "hidden_size=96")),
    ({"num_hidden_layers": 3}, ("num_hidden_layers=3", "model.layers.2.self_attn.q_proj.weight is missing")),
    ({"num_hidden_layers": 1}, ("num_hidden_layers=1", "layer 1")),
    ({"num_attention_heads": 8, "head_dim": 16}, ("q_proj.weight has shape (64, 64)", "num_attention_heads=8")),
    ({"num_key_value_heads": 4}, ("k_proj.weight has shape (32, 64)", "num_key_value_heads=4")),
    ({"intermediate_size": 128}, ("gate_proj.weight has shape (96, 64)", "intermediate_size=128")),
    ({"vocab_size": 200}, ("embed_tokens.weight has shape (128, 64)", "vocab_size=200")),
    ({"hidden_size": "64"}, ("hidden_size = '64' is not a positive integer",)),
    ({"num_attention_heads": 0}, ("num_attention_heads = 0",)),
])
def test_config_that_does_not_describe_the_weights_is_refused_before_writing(src, tmp_path, capsys, changes, needles):
    edit_config(src, **changes)
    prepare_fails(capsys, tmp_path, src, *needles)


def test_untied_config_without_lm_head_is_refused(src, tmp_path, capsys):
    edit_weights(src, lambda s: s.pop("lm_head.weight"))
    prepare_fails(capsys, tmp_path, src, "lm_head.weight is missing")


@pytest.mark.parametrize("text", ["[1, 2]", "null", "3", '"llama"'])
def test_config_json_that_is_not_an_object(src, tmp_path, capsys, text):
    (src / "config.json").write_text(text)
    prepare_fails(capsys, tmp_path, src, "config.json holds", "where a JSON object belongs")


def test_config_json_with_invalid_json(src, tmp_path, capsys):
    (src / "config.json").write_text("{\"model_type\": \"llama\",")
    prepare_fails(capsys, tmp_path, src, "config.json is not valid JSON")


def test_one_dimensional_tensor_under_a_linear_weight_name(src, tmp_path, capsys):
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_weights(src, lambda s: s.__setitem__(name, torch.randn(64)))
    prepare_fails(capsys, tmp_path, src, name, "shape (64,)")


def test_integer_linear_weight_is_refused(src, tmp_path, capsys):
    name = "model.layers.0.mlp.up_proj.weight"
    edit_weights(src, lambda s: s.__setitem__(name, torch.zeros(96, 64, dtype=torch.int8)))
    prepare_fails(capsys, tmp_path, src, name, "I8")


def test_model_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    prepare_fails(capsys, tmp_path, tmp_path / "model.safetensors", "is a file, not a directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(src, tmp_path, capsys):
    prepare_fails(capsys, tmp_path, src, "no CUDA device", extra=("--device", "cuda"))


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_out_that_overlaps_the_input_is_refused_even_with_overwrite(src, tmp_path, capsys, where):
    out = {"same": src, "inside": src / "prepared", "around": tmp_path}[where]
    before = {p: p.read_bytes() for p in src.iterdir()}
    rc, stdout, err = run_cli(capsys, "prepare", src, "--rank", 4, "--out", out, "--overwrite", "--json")
    assert_one_line_error(rc, stdout, err, "prepare", "would destroy the input")
    assert {p: p.read_bytes() for p in src.iterdir()} == before


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name} on stdout")


def test_no_quant_json_is_strict_json(src, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "prepare", src, "--rank", 4, "--targets", "q", "--no-quant",
                           "--out", tmp_path / "p", "--json")
    assert rc == 0, err
    report = json.loads(out, parse_constant=_no_constants)
    assert report["mean_rel_error_plain_nf4"] is None  # not measured without NF4: null, not NaN
    assert report["mean_rel_error"] < 1e-5 and report["layers"] == 2


@pytest.mark.parametrize("shape", [(64,), (0, 64), (2, 3, 4)])
def test_check_rank_names_a_malformed_shape_instead_of_a_negative_rank(shape):
    from qosora.decompose import check_rank
    from qosora.errors import QosoraError

    with pytest.raises(QosoraError, match="not a \\(d_out, d_in\\) matrix"):
        check_rank(4, shape, "model.layers.0.mlp.up_proj")
