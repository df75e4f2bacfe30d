"""`qosora merge` and `qosora inspect` on damaged prepared/trained directories: a one-line error naming the module,
before anything is written; the input is never destroyed."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, build_tiny_model, files_under, make_prepared, run_cli
from qosora.errors import QosoraError
from qosora.prepared import PreparedReader

MODULE = "model.layers.1.self_attn.v_proj"
SMALL = dict(rank=4, targets=("q_proj", "v_proj"))


def edit(path: Path, change) -> None:
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def merge_fails(capsys, tmp_path, prepared, *needles):
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, "merge", prepared, "--out", tmp_path / "merged", "--json")
    assert_one_line_error(rc, out, err, "merge", *needles)
    assert files_under(tmp_path) == before  # nothing written, not even a hidden temporary


@pytest.mark.parametrize("method, factor", [("sorsa", "S"), ("osora", "O"), ("pissa", "B"), ("qlora", "A")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_factor_fails_naming_the_module(tmp_path, capsys, method, factor, value):
    prepared = make_prepared(tmp_path, method, **SMALL)
    edit(prepared / "adapter.safetensors", lambda s: s[f"{MODULE}.{factor}"].view(-1).__setitem__(0, value))
    merge_fails(capsys, tmp_path, prepared, MODULE, "NaN/Inf")


@pytest.mark.parametrize("part", ["absmax_offset", "absmax_scale", "absmax_code"])
def test_non_finite_nf4_scales_fail_naming_the_module(tmp_path, capsys, part):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    edit(prepared / "residual.safetensors", lambda s: s[f"{MODULE}.nf4.{part}"].view(-1).__setitem__(0, float("nan")))
    merge_fails(capsys, tmp_path, prepared, MODULE, f"nf4.{part}", "NaN/Inf")


def test_non_finite_dense_residual_fails_naming_the_module(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "sorsa", quant="none", **SMALL)
    edit(prepared / "residual.safetensors", lambda s: s[f"{MODULE}.residual"].__setitem__((0, 0), float("-inf")))
    merge_fails(capsys, tmp_path, prepared, MODULE, "NaN/Inf")


def test_missing_factor(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    edit(prepared / "adapter.safetensors", lambda s: s.pop(f"{MODULE}.Vh"))
    merge_fails(capsys, tmp_path, prepared, f"{MODULE}.Vh is missing")


@pytest.mark.parametrize("factor, shape", [("S", (5,)), ("U", (32, 5)), ("Vh", (4, 63)), ("U", (4, 32))])
def test_mis_shaped_factor(tmp_path, capsys, factor, shape):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    edit(prepared / "adapter.safetensors", lambda s: s.__setitem__(f"{MODULE}.{factor}", torch.zeros(shape)))
    merge_fails(capsys, tmp_path, prepared, f"{MODULE}.{factor} has shape {shape}", MODULE)


def test_mis_shaped_residual_parts(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    edit(prepared / "residual.safetensors", lambda s: s.__setitem__(f"{MODULE}.nf4.absmax", s[f"{MODULE}.nf4.absmax"][:-1]))
    merge_fails(capsys, tmp_path, prepared, f"{MODULE}.nf4.absmax has shape")


def test_mis_shaped_bias(tmp_path, capsys):
    build_tiny_model(tmp_path / "hf", "qwen2")  # make_prepared's source, so it is not built as a llama
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    edit(prepared / "base.safetensors", lambda s: s.__setitem__(f"{MODULE}.bias", torch.zeros(7)))
    merge_fails(capsys, tmp_path, prepared, f"{MODULE}.bias has shape (7,)")


def test_finite_adapter_that_overflows_float16_is_refused(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "pissa", **SMALL)
    edit(prepared / "adapter.safetensors", lambda s: s[f"{MODULE}.B"].mul_(1e8))
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, "merge", prepared, "--out", tmp_path / "m", "--dtype", "float16", "--json")
    assert_one_line_error(rc, out, err, "merge", MODULE, "overflows float16")
    assert files_under(tmp_path) == before
    # float32 holds it: the same directory merges
    rc, out, err = run_cli(capsys, "merge", prepared, "--out", tmp_path / "m", "--json")
    assert rc == 0 and json.loads(out)["dtype"] == "float32"


@pytest.mark.parametrize("text", ["[]", "null", "{\"model_type\": \"llama\"}"])
def test_config_json_not_an_object_or_incomplete(tmp_path, capsys, text):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    (prepared / "config.json").write_text(text)
    merge_fails(capsys, tmp_path, prepared, "config.json")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_equal_to_or_inside_the_input_is_refused_with_overwrite(tmp_path, capsys, where):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    out = prepared if where == "same" else prepared / "merged"
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    rc, stdout, err = run_cli(capsys, "merge", prepared, "--out", out, "--overwrite", "--json")
    assert_one_line_error(rc, stdout, err, "merge", "would destroy the input")
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before


def test_reader_check_does_not_read_the_packed_codes(tmp_path, monkeypatch):
    """`check()` (merge's pre-pass) reads factors and scales only; the 4-bit codes are read once, while merging."""
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    reader = PreparedReader(prepared)
    read = []
    original = type(reader._residual).get
    monkeypatch.setattr(type(reader._residual), "get", lambda self, name: read.append(name) or original(self, name))
    reader.check()
    assert read and not any(name.endswith(".nf4.data") for name in read)


def test_inspect_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, "inspect", prepared, "--json", "--plot", tmp_path / "s.png")
    assert_one_line_error(rc, out, err, "inspect", "matplotlib", "qosora[plot]")
    assert files_under(tmp_path) == before


def test_inspect_plot_into_a_missing_directory(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    rc, out, err = run_cli(capsys, "inspect", prepared, "--json", "--plot", tmp_path / "no" / "s.png")
    assert_one_line_error(rc, out, err, "inspect", "does not exist")


def test_inspect_of_a_nan_adapter_names_the_module(tmp_path, capsys):
    prepared = make_prepared(tmp_path, "sorsa", **SMALL)
    edit(prepared / "adapter.safetensors", lambda s: s[f"{MODULE}.S"].__setitem__(0, float("nan")))
    rc, out, err = run_cli(capsys, "inspect", prepared, "--json")
    assert_one_line_error(rc, out, err, "inspect", MODULE)


def test_reader_still_loads_a_healthy_directory_bit_exactly(tmp_path):
    prepared = make_prepared(tmp_path, "osora", **SMALL)
    reader = PreparedReader(prepared)
    reader.check()
    stored = load_file(prepared / "adapter.safetensors")
    for module in reader.modules:
        for name, t in reader.factors(module).items():
            assert torch.equal(t, stored[f"{module}.{name}"])
    with pytest.raises(QosoraError, match="is not a directory"):
        PreparedReader(tmp_path / "nothing")
