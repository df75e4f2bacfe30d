"""export_onnx end to end on tiny directories: files, report, parity, atomicity, CLI, prepared-directory source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_tiny_tokenizer
from export_helpers import tiny_model
from qosora.errors import QosoraError
from qosora.export import ExportOptions, export_onnx


@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_model("llama", tied=True)
    d = tmp_path / "hf"
    model.save_pretrained(d)
    write_tiny_tokenizer(d)
    return d


def test_export_writes_a_complete_directory(hf_dir, tmp_path):
    out = tmp_path / "onnx"
    report = export_onnx(hf_dir, out, options=ExportOptions(format="fp32"), check_new_tokens=8)
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "config.json", "genai_config.json",
                 "generation_config.json", "export_report.json"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["parity"]["summary"] == report["parity"]["summary"]
    s = report["parity"]["summary"]
    assert s["max_rel_logit_diff"] < 1e-4 and s["top1_agreement"] == 1.0 and s["greedy_all_equal"]
    assert abs(s["ppl_torch"] - s["ppl_onnx"]) < 1e-3 * s["ppl_torch"]
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == 2
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    # weights are external: the .onnx file holds the graph only
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size / 4


def test_int4_report_has_layer_errors_and_parity_within_them(hf_dir, tmp_path):
    report = export_onnx(hf_dir, tmp_path / "int4", options=ExportOptions(format="int4", block_size=32))
    layers = report["requantization"]["layers"]
    assert len(layers) == 2 * 7 + 2  # linears + embedding + lm_head
    assert all(0 < e["rel_error"] < 0.2 for e in layers.values())
    s = report["parity"]["summary"]
    # quantized, but the same function (the exact layout check is test_int4_matches_dequantized_reference)
    assert 0 < s["kl_mean"] < 0.5 and s["top1_agreement"] > 0.3  # a layout bug gives KL of several nats
    assert abs(np.log(s["ppl_onnx"] / s["ppl_torch"])) < 0.5


def test_trt_report_has_shape_profile(hf_dir, tmp_path):
    report = export_onnx(hf_dir, tmp_path / "trt", options=ExportOptions(format="trt-int4"), check=False,
                         trt_max_batch=4, trt_max_context=128)
    prof = report["tensorrt"]["profile"]
    assert prof["past_key_values.0.key"]["min"] == [1, 2, 0, 16]
    assert prof["past_key_values.0.key"]["max"] == [4, 2, 127, 16]
    assert prof["attention_mask"]["max"] == [4, 128]
    assert report["graph"]["domains"] == ["ai.onnx"]
    assert "--minShapes=input_ids:1x1," in report["tensorrt"]["trtexec"]


def test_failed_export_leaves_no_directory(hf_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("qosora.export.check.parity_check", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        export_onnx(hf_dir, out, options=ExportOptions(format="fp32"))
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # the hidden temporary directory is gone too


def test_existing_output_is_not_overwritten_silently(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(QosoraError, match="already exists"):
        export_onnx(hf_dir, out, options=ExportOptions(format="fp32"), check=False)
    assert (out / "keep.txt").is_file()


def test_cli_export_json_and_generate(hf_dir, tmp_path, capsys):
    from qosora.cli import main

    out = tmp_path / "cli"
    assert main(["export", str(hf_dir), "--onnx", str(out), "--format", "int4", "--block-size", "16",
                 "--json", "--check-tokens", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["options"]["block_size"] == 16 and report["parity"]["summary"]["new_tokens"] == 4
    assert main(["generate", str(out), "--prompt", "w5 w6 w7", "--max-new-tokens", "5", "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["new_tokens"] == len(gen["token_ids"]) == 5 and gen["prompt_tokens"] == 3
    assert main(["export", "/nonexistent", "--onnx", str(tmp_path / "x")]) == 2


def test_prepared_directory_exports_nf4_and_int4(hf_dir, tmp_path):
    """Through qosora.prepared.PreparedReader: nf4 reproduces qosora.load's model; int4 requantizes the merge."""
    prep = pytest.importorskip("qosora.preparation")
    from qosora.config import PrepareConfig, QuantConfig

    prepared = tmp_path / "prepared"
    # float32 factors and compute: qosora.load's bf16 adapter rounds its activations to bf16, which the ONNX
    # branch (float32 products of the same factors) does not; that would show up as ~2e-3 relative logit noise.
    cfg = PrepareConfig(method="sorsa", rank=4, adapter_dtype="float32", quant=QuantConfig(compute_dtype="float32"))
    prep.prepare(hf_dir, prepared, cfg, progress=False)
    nf4 = export_onnx(prepared, tmp_path / "nf4", options=ExportOptions(format="nf4"), check_new_tokens=8)
    s = nf4["parity"]["summary"]
    assert nf4["graph"]["op_counts"]["com.microsoft::MatMulBnb4"] == 14
    assert s["max_rel_logit_diff"] < 1e-3 and s["greedy_all_equal"], s
    int4 = export_onnx(prepared, tmp_path / "int4", options=ExportOptions(format="int4"), check=False)
    kept = export_onnx(prepared, tmp_path / "kept", options=ExportOptions(format="int4", keep_principal=True),
                       check=False)
    mean = lambda r: np.mean([e["rel_error"] for k, e in r["requantization"]["layers"].items() if "layers." in k])
    assert mean(kept) < mean(int4)
    assert (tmp_path / "nf4" / "qosora_config.json").is_file()
