"""`qosora generate` / `qosora bench` on bad inputs: a missing or corrupt tokenizer, a truncated model.onnx /
model.onnx.data, a model.onnx from another tool, an empty prompt, a prompt that fills the context, a bad JSONL line,
an unavailable provider, a missing chat template, and bad option values are one-line errors (exit 2); decoding stops
at the context instead of running past the rotary tables."""

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
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--top-p", "0"], "--top-p must be > 0"),
    (["--top-p", "1.5"], "--top-p must be <= 1"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--stop", ""], "--stop takes non-empty strings"),
    (["--system", "be brief"], "--system goes with --chat"),
])
def test_bad_options(exported, capsys, flags, needle):
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", "w5 w6", "--json", *flags)
    assert_one_line_error(rc, out, err, "generate", needle)


def test_unavailable_provider_lists_what_is_there(exported, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", "w5 w6", "--provider", "cuda", "--json")
    assert_one_line_error(rc, out, err, "generate", "CUDAExecutionProvider is not in this onnxruntime build",
                          *ort.get_available_providers())


def test_unknown_provider_through_the_api(exported):
    from qosora.errors import QosoraError
    from qosora.run import Generator

    with pytest.raises(QosoraError, match="unknown --provider 'tpu'"):
        Generator(exported, provider="tpu")


def test_missing_directory(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "generate", tmp_path / "nowhere", "--prompt", "w5", "--json")
    assert_one_line_error(rc, out, err, "generate", "nowhere has no model.onnx")


def test_a_model_from_another_tool(copy, capsys):
    """A model.onnx whose inputs are not a decoder's: the error says what was expected."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    (copy / "model.onnx.data").unlink()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(copy / "model.onnx"))
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "not a decoder with a KV cache", "expected input_ids, "
                          "attention_mask", "inputs x")


@pytest.mark.parametrize("line, needle", [
    ("not json", "not JSON"),
    ('{"promt": "w5"}', 'exactly one of "prompt", "chat", "messages"'),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"messages": [{"role": "user"}]}', 'string "role" and "content"'),
    ('["w5"]', "expected a JSON object"),
    ('{"prompt": "w5", "system": "x"}', '"system" goes with "chat"'),
])
def test_bad_jsonl_line(exported, capsys, tmp_path, line, needle):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "w5 w6"}\n\n' + line + "\n")
    rc, out, err = run_cli(capsys, "generate", exported, "--input", path, "--json")
    assert_one_line_error(rc, out, err, "generate", f"{path}:3: ", needle)


def test_jsonl_prompt_that_fills_the_context_names_its_line(exported, capsys, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "w5"}) + "\n" + json.dumps({"prompt": words(CONTEXT)}) + "\n")
    rc, out, err = run_cli(capsys, "generate", exported, "--input", path, "--json")
    assert_one_line_error(rc, out, err, "generate", f"{path}:2 has {CONTEXT} tokens", f"context is {CONTEXT}")


def test_chat_without_a_template(exported, capsys):
    rc, out, err = run_cli(capsys, "generate", exported, "--chat", "hello", "--json")
    assert_one_line_error(rc, out, err, "generate", "has no chat template", "chat_template.jinja", "--prompt")


@pytest.mark.parametrize("flags, needle", [
    (["--prompt-len", "0"], "--prompt-len takes positive integers"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--prompt-len", str(CONTEXT)], f"--prompt-len {CONTEXT} has {CONTEXT} tokens"),
])
def test_bench_bad_options(exported, capsys, flags, needle):
    rc, out, err = run_cli(capsys, "bench", exported, "--gen-len", "2", "--repeats", "1", "--json", *flags)
    assert_one_line_error(rc, out, err, "bench", needle)


def test_generation_config_that_is_not_an_object(copy, capsys):
    (copy / "generation_config.json").write_text("[2]")
    rc, out, err = run_cli(capsys, "generate", copy, "--prompt", "w5 w6", "--json")
    assert_one_line_error(rc, out, err, "generate", "generation_config.json", "JSON object")


def test_a_good_run_is_strict_json(exported, capsys):
    rc, out, err = run_cli(capsys, "generate", exported, "--prompt", "w5 w6 w7", "--max-new-tokens", "4",
                           "--temperature", "0.7", "--threads", "1", "--json")
    assert rc == 0, err
    r = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert r["prompt_tokens"] == 3 and 1 <= r["new_tokens"] == len(r["token_ids"]) <= 4
