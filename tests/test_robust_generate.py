"""`qosora generate` on bad inputs: a missing or corrupt tokenizer, a truncated model.onnx / model.onnx.data, an
empty prompt, a prompt that fills the context, and non-finite or negative options are one-line errors (exit 2);
decoding stops at the context instead of running past the rotary tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, build_tiny_model, run_cli, save_word_tokenizer

CONTEXT = 256  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from qosora.export import ExportOptions, export_onnx

    root = tmp_path_factory.mktemp("gen")
    build_tiny_model(root / "hf", "llama", weight_std=0.15)
    save_word_tokenizer(root / "hf", raw=True)
    export_onnx(root / "hf", root / "onnx", options=ExportOptions(format="fp32"), check=False, progress=False)
    assert json.loads((root / "onnx" / "config.json").read_text())["max_position_embeddings"] == CONTEXT
    return root / "onnx"


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    out = tmp_path / "onnx"
    shutil.copytree(exported, out)
    return out


def words(n: int) -> str:
    return " ".join(f"w{4 + i % 100}" for i in range(n))


def test_missing_tokenizer(copy, capsys):
    (copy / "tokenizer.json").unlink()
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "tokenizer.json not found")


def test_corrupt_tokenizer(copy, capsys):
    (copy / "tokenizer.json").write_text("{\"not\": \"a tokenizer\"}")
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "tokenizer.json cannot be read")


@pytest.mark.parametrize("name, keep", [("model.onnx", 0.5), ("model.onnx", 0.0), ("model.onnx.data", 0.5),
                                        ("model.onnx.data", 0.0)])
def test_truncated_model_files(copy, capsys, name, keep):
    path = copy / name
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "cannot be loaded by onnxruntime", "re-run `qosora export`")


def test_missing_data_file(copy, capsys):
    (copy / "model.onnx.data").unlink()
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "cannot be loaded by onnxruntime")


@pytest.mark.parametrize("prompt, needle", [("", "--prompt is empty"), ("   ", "encodes to no tokens")])
def test_empty_prompt(exported, capsys, prompt, needle):
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", prompt, "--json")
    assert_one_line_error(rc, out, err, "generate", needle)


def test_prompt_that_fills_the_context(exported, capsys):
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", words(CONTEXT + 44), "--json")
    assert_one_line_error(rc, out, err, "generate", f"has {CONTEXT + 44} tokens", f"context is {CONTEXT}")


def test_decoding_stops_at_the_context(exported):
    from qosora.run import generate

    r = generate(exported, words(CONTEXT - 5), max_new_tokens=50, threads=1)
    assert r.prompt_tokens == CONTEXT - 5 and len(r.new_tokens) <= 5


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be a positive integer"),
    (["--threads", "0"], "--threads must be a positive integer"),
])
def test_bad_options(exported, capsys, flags, needle):
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", "w5 w6", "--json", *flags)
    assert_one_line_error(rc, out, err, "generate", needle)


def test_generation_config_that_is_not_an_object(copy, capsys):
    (copy / "generation_config.json").write_text("[2]")
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "generation_config.json", "JSON object")


def test_a_good_run_is_strict_json(exported, capsys):
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
                           "--temperature", "0.7", "--threads", "1", "--json")
    assert rc == 0, err
    r = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert r["prompt_tokens"] == 3 and 1 <= len(r["new_tokens"]) <= 4
