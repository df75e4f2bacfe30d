"""The CLI: one-line errors naming problem and fix, non-zero exit, nothing left behind; JSON outputs."""

import json
import subprocess
import sys

import pytest

from qosora.cli import main

from conftest import assert_one_line_error, build_tiny_model, run_cli


def assert_clean_failure(rc, out, err, verb, out_dir, *needles):
    assert_one_line_error(rc, out, err, verb, *needles)
    assert not out_dir.exists()
    assert not any(p.name.startswith(f".{out_dir.name}.tmp") for p in out_dir.parent.iterdir())


@pytest.fixture
def src(tmp_path):
    build_tiny_model(tmp_path / "src", "llama")
    return tmp_path / "src"


def test_missing_model_dir(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "prepare", tmp_path / "nope", "--out", tmp_path / "o")
    assert_clean_failure(rc, out, err, "prepare", tmp_path / "o", "does not exist")


def test_pickled_weights_are_refused(src, tmp_path, capsys):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    rc, out, err = run_cli(capsys, "prepare", src, "--out", tmp_path / "o")
    assert_clean_failure(rc, out, err, "prepare", tmp_path / "o", ".bin", "safe_serialization")


def test_corrupt_safetensors(src, tmp_path, capsys):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    rc, out, err = run_cli(capsys, "prepare", src, "--out", tmp_path / "o")
    assert_clean_failure(rc, out, err, "prepare", tmp_path / "o", "not a valid safetensors file")


def test_rank_too_large(src, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "prepare", src, "--rank", "65", "--out", tmp_path / "o")
    assert_clean_failure(rc, out, err, "prepare", tmp_path / "o", "rank 65 is too large", "--rank <= 64")


def test_unknown_target(src, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "prepare", src, "--targets", "q,attn", "--out", tmp_path / "o")
    assert_clean_failure(rc, out, err, "prepare", tmp_path / "o", "unknown target 'attn'")


def test_unknown_method_is_an_argparse_error(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", str(src), "--method", "dora", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "invalid choice: 'dora'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config

    # A config.json alone: the architecture is refused before any weight is read.
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "gpt2")
    rc, out, err = run_cli(capsys, "prepare", tmp_path / "gpt2", "--out", tmp_path / "o")
    assert_clean_failure(rc, out, err, "prepare", tmp_path / "o", "unsupported architecture 'gpt2'", "llama")


def test_existing_output_is_not_overwritten(src, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    rc, _, err = run_cli(capsys, "prepare", src, "--rank", "4", "--out", tmp_path / "o")
    assert rc == 2 and "--overwrite" in err
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_merge_of_a_non_qosora_dir(src, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "merge", src, "--out", tmp_path / "m")
    assert_clean_failure(rc, out, err, "merge", tmp_path / "m", "qosora_config.json missing", "qosora prepare")


def test_prepare_json_inspect_and_merge(src, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "prepare", src, "--rank", "4", "--method", "pissa", "--out", tmp_path / "p", "--json")
    assert rc == 0
    report = json.loads(out)
    for key in ("method", "rank", "layers", "trainable_params", "frozen_params", "mean_rel_error",
                "mean_rel_error_plain_nf4", "seconds"):
        assert key in report
    assert report["method"] == "pissa" and report["layers"] == 14
    # PiSSA trains r (d_in + d_out) per linear: 2 layers x 4 x (q, o 64+64; k, v 64+32; gate, up, down 64+96).
    assert report["trainable_params"] == 2 * 4 * (2 * 128 + 2 * 96 + 3 * 160) == 7424
    assert report["mean_rel_error"] < report["mean_rel_error_plain_nf4"]

    rc, out, _ = run_cli(capsys, "inspect", tmp_path / "p", "--json", "--plot", tmp_path / "s.png")
    info = json.loads(out)
    assert rc == 0 and info["layers"] == 14 and info["trainable_params"] == report["trainable_params"]
    assert set(info["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    rc, out, _ = run_cli(capsys, "inspect", tmp_path / "p")
    assert "down_proj" in out and "reduction" in out

    rc, out, _ = run_cli(capsys, "merge", tmp_path / "p", "--out", tmp_path / "m", "--json")
    assert rc == 0 and json.loads(out) == {"out_dir": str(tmp_path / "m"), "dtype": "float32"}
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_help_shows_an_example():
    out = subprocess.run([sys.executable, "-m", "qosora", "prepare", "--help"], capture_output=True, text=True).stdout
    assert "example:" in out and "qosora prepare" in out


def test_import_stays_light():
    code = ("import sys, qosora; heavy = [m for m in ('torch', 'bitsandbytes', 'onnx', 'onnxruntime', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
