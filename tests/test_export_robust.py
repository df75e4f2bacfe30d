"""Exports that must not happen: NaN weights, a graph that does not compute the model, an --out that is the input."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from conftest import make_prepared, write_tiny_tokenizer
from export_helpers import tiny_model
from qosora.errors import QosoraError
from qosora.export import ExportOptions, export_onnx
from qosora.export.check import failed_parity


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp")]


def test_nan_factor_is_refused_and_nothing_is_written(tmp_path):
    prepared = make_prepared(tmp_path, "sorsa")
    factors = load_file(prepared / "adapter.safetensors")
    first = sorted(factors)[0]
    factors[first] = factors[first].clone()
    factors[first].view(-1)[0] = float("nan")
    save_file(factors, prepared / "adapter.safetensors")
    with pytest.raises(QosoraError, match="NaN"):
        export_onnx(prepared, tmp_path / "onnx", "int4")
    assert _leftovers(tmp_path, "onnx") == []


def test_parity_check_refuses_a_graph_that_does_not_compute_the_model(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    write_tiny_tokenizer(tmp_path / "hf")
    other = tiny_model("llama", seed=1).eval()  # same shapes, other weights: a wrong graph as seen by the check
    with pytest.raises(QosoraError, match="does not compute the model"):
        export_onnx(tmp_path / "hf", tmp_path / "onnx", "fp32", reference_model=other, check_new_tokens=2)
    assert _leftovers(tmp_path, "onnx") == []
    export_onnx(tmp_path / "hf", tmp_path / "onnx", "fp32", reference_model=model.eval(), check_new_tokens=2)


@pytest.mark.parametrize("summary,fmt,reason", [
    ({"max_rel_logit_diff": float("nan"), "ppl_torch": 10.0, "ppl_onnx": 10.0}, "int4", "NaN"),
    ({"max_rel_logit_diff": 0.03, "ppl_torch": 10.0, "ppl_onnx": 10.1}, "fp32", "rounding"),
    ({"max_rel_logit_diff": 0.02, "ppl_torch": 10.0, "ppl_onnx": 10.1}, "fp16", None),
    ({"max_rel_logit_diff": 0.3, "ppl_torch": 10.0, "ppl_onnx": 39.9}, "int4", None),
    ({"max_rel_logit_diff": 0.3, "ppl_torch": 10.0, "ppl_onnx": 40.1}, "trt-int4", "perplexity"),
])
def test_parity_limits(summary, fmt, reason):
    got = failed_parity(summary, fmt)
    assert (got is None) if reason is None else (reason in got), got


def test_out_equal_to_the_input_is_refused(tmp_path):
    prepared = make_prepared(tmp_path, "sorsa")
    before = sorted(p.name for p in prepared.iterdir())
    with pytest.raises(QosoraError, match="destroy the input"):
        export_onnx(prepared, prepared, "fp32", overwrite=True, check=False)
    assert sorted(p.name for p in prepared.iterdir()) == before
