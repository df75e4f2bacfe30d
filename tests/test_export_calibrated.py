"""`qosora export --calibrate DATA.jsonl`: int4 / trt-int4 weights by GPTQ on the scheme's grid, from streamed input
Hessians; the report says what was used and what it bought, per layer; bad calibration input is one line, exit 2."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from qosora.errors import QosoraError
from qosora.export import ExportOptions, export_onnx

from conftest import assert_one_line_error, build_tiny_model, run_cli, save_word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib") / "hf"
    build_tiny_model(d, "llama", weight_std=0.1)
    save_word_tokenizer(d)
    rng = random.Random(0)
    write_jsonl(d.parent / "calib.jsonl",
                [{"text": " ".join(f"w{rng.randrange(4, 128)}" for _ in range(40))} for _ in range(40)])
    return d


def _options(src, fmt="int4", **kw):
    return ExportOptions(format=fmt, block_size=16, accuracy_level=0, calibrate=str(src.parent / "calib.jsonl"),
                         calibration_samples=8, calibration_seq_len=64, **kw)


@pytest.mark.parametrize("fmt,scheme", [("int4", "asym"), ("trt-int4", "sym")])
def test_calibrated_export_compensates_every_linear_and_passes_parity(src, tmp_path, fmt, scheme):
    report = export_onnx(src, tmp_path / "out", options=_options(src, fmt, int4_scheme=scheme), check_new_tokens=4)
    cal = report["calibration"]
    assert cal["tokens"] == 8 * 64 and cal["samples"] == 8 and cal["method"] == "gptq"
    assert cal["peak_held_layers"] == 1.0 and cal["layers"] == 2  # one decoder layer's activations at a time
    layers = report["requantization"]["layers"]
    linears = {m: e for m, e in layers.items() if m.startswith("model.layers.")}
    assert len(linears) == 2 * 7
    # The output error on the calibration inputs falls below the data-free quantizer's for every linear.
    assert all(e["output_error"] < e["output_error_uncalibrated"] for e in linears.values())
    assert "output_error" in layers["lm_head"]  # untied head: its own Hessian (the final norm's output)
    assert "output_error" not in layers.get("model.embed_tokens", {})  # no input Hessian: data-free
    assert report["parity"]["summary"]["new_tokens"] == 4


def test_calibration_is_deterministic_and_changes_the_weights(src, tmp_path):
    a = export_onnx(src, tmp_path / "a", options=_options(src), check=False)
    b = export_onnx(src, tmp_path / "b", options=_options(src), check=False)
    plain = export_onnx(src, tmp_path / "plain", options=ExportOptions(format="int4", block_size=16), check=False)
    data = {k: (tmp_path / k / "model.onnx.data").read_bytes() for k in ("a", "b", "plain")}
    assert data["a"] == data["b"]
    assert data["a"] != data["plain"] and len(data["a"]) == len(data["plain"])  # same layout, other codes
    assert a["requantization"]["layers"] == b["requantization"]["layers"]
    assert "calibration" not in plain


def test_static_grid_reaches_the_export(src, tmp_path):
    """--calibration-grid static: other codes than the default grid's, every linear still below the data-free error
    on the calibration inputs."""
    static = export_onnx(src, tmp_path / "static", options=_options(src, calibration_grid="static"), check=False)
    export_onnx(src, tmp_path / "dynamic", options=_options(src), check=False)
    data = {k: (tmp_path / k / "model.onnx.data").read_bytes() for k in ("static", "dynamic")}
    assert data["static"] != data["dynamic"]
    linears = [e for m, e in static["requantization"]["layers"].items() if m.startswith("model.layers.")]
    assert linears and all(e["output_error"] < e["output_error_uncalibrated"] for e in linears)


def test_calibrate_applies_to_int4_formats_only(src):
    with pytest.raises(QosoraError, match="--calibrate applies to --format int4 and trt-int4"):
        ExportOptions(format="fp16", calibrate="x.jsonl").validate()
    with pytest.raises(QosoraError, match="--calibration-grid static applies to a calibrated export"):
        ExportOptions(calibration_grid="static").validate()


@pytest.mark.parametrize("content,needle", [("", "no rows"), ('{"text": "w5 w6"}\nnot json\n', ":2:"),
                                            ('{"text": "w5 w6"}\n', "disjoint windows")])
def test_bad_calibration_data_is_one_line_and_exit_2(src, tmp_path, capsys, content, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "export", str(src), "--onnx", str(out), "--calibrate", str(bad),
                              "--calibration-samples", "4", "--calibration-seq-len", "64")
    assert_one_line_error(rc, stdout, err, "export", needle)
    assert not out.exists()


def test_a_tied_head_gets_its_own_calibrated_table(tmp_path):
    """Tied embeddings: uncalibrated, the head reads the embedding's int4 table; calibrated, it gets its own GPTQ
    table (from the final norm's Hessian) and the embedding's stays data-free."""
    import onnx

    d = tmp_path / "hf"
    build_tiny_model(d, "llama", tied=True, weight_std=0.1)
    save_word_tokenizer(d)
    rng = random.Random(1)
    data = write_jsonl(tmp_path / "c.jsonl", [{"text": " ".join(f"w{rng.randrange(4, 128)}" for _ in range(40))}
                                              for _ in range(40)])
    opts = dict(format="int4", block_size=16, accuracy_level=0)
    plain = export_onnx(d, tmp_path / "plain", options=ExportOptions(**opts), check=False)
    cal = export_onnx(d, tmp_path / "cal", options=ExportOptions(**opts, calibrate=str(data), calibration_samples=8,
                                                                  calibration_seq_len=64), check_new_tokens=4)
    assert plain["requantization"]["layers"]["lm_head"].get("note") == "shared with embedding"
    head = cal["requantization"]["layers"]["lm_head"]
    assert "note" not in head and head["output_error"] < head["output_error_uncalibrated"]
    names = {t.name for t in onnx.load(str(tmp_path / "cal" / "model.onnx"), load_external_data=False).graph.initializer}
    assert {"lm_head.qweight", "model.embed_tokens.qweight"} <= names
    assert "lm_head.qweight" not in {t.name for t in onnx.load(str(tmp_path / "plain" / "model.onnx"),
                                                                load_external_data=False).graph.initializer}


def test_calibrate_train_reads_the_run_directory_s_training_data(src, tmp_path, capsys):
    """`--calibrate train` on a directory whose train_config.json records its data: the same bytes as naming that
    file; a directory without the record, or whose recorded file is gone, is one line and exit 2."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "train_config.json").write_text(json.dumps({"data": str(src.parent / "calib.jsonl")}))
    named = export_onnx(run, tmp_path / "named", options=_options(src), check=False)
    opts = ExportOptions(format="int4", block_size=16, accuracy_level=0, calibrate="train", calibration_samples=8,
                         calibration_seq_len=64)
    recorded = export_onnx(run, tmp_path / "recorded", options=opts, check=False)
    assert recorded["calibration"]["file"] == str(src.parent / "calib.jsonl") == named["calibration"]["file"]
    assert (tmp_path / "named" / "model.onnx.data").read_bytes() == \
        (tmp_path / "recorded" / "model.onnx.data").read_bytes()

    for directory, needle in ((src, "records no training data"), (run, "is not there")):
        if directory == run:
            (run / "train_config.json").write_text(json.dumps({"data": str(tmp_path / "gone.jsonl")}))
        out = tmp_path / f"out-{directory.name}"
        rc, stdout, err = run_cli(capsys, "export", str(directory), "--onnx", str(out), "--calibrate", "train")
        assert_one_line_error(rc, stdout, err, "export", needle)
        assert not out.exists()


def test_an_uncalibrated_export_of_a_run_directory_hints_at_calibrate_train(src, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "train_config.json").write_text(json.dumps({"data": str(src.parent / "calib.jsonl")}))
    flags = ("--block-size", "16", "--no-check", "--calibration-samples", "8", "--calibration-seq-len", "64")
    rc, stdout, _ = run_cli(capsys, "export", str(run), "--onnx", str(tmp_path / "a"), *flags)
    assert rc == 0 and "hint:" in stdout and "--calibrate train" in stdout
    rc, stdout, _ = run_cli(capsys, "export", str(run), "--onnx", str(tmp_path / "b"), "--calibrate", "train", *flags)
    assert rc == 0 and "hint:" not in stdout
    rc, stdout, _ = run_cli(capsys, "export", str(src), "--onnx", str(tmp_path / "c"), *flags)
    assert rc == 0 and "hint:" not in stdout
