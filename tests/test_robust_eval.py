"""`qosora eval` on bad inputs: pickles refused, incomplete checkpoints refused (never a randomly initialised model),
bad options one-line errors; a plain Hugging Face directory read through ShardReader equals transformers' model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, build_tiny_model, files_under, run_cli, save_word_tokenizer
from qosora.evaluation import EvalOptions, evaluate
from qosora.loading import load_hf


def hf_dir(tmp_path: Path, tied: bool = False, name: str = "hf") -> tuple[Path, torch.nn.Module]:
    d = tmp_path / name
    model = build_tiny_model(d, "llama", tied=tied)
    save_word_tokenizer(d)
    return d, model


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 120 + 4}" for j in range(12))}) + "\n"
                            for i in range(6)))
    return path


def eval_fails(capsys, tmp_path, directory, data, *needles, extra=()):
    before = files_under(tmp_path)
    rc, out, err = run_cli(capsys, "eval", directory, "--data", data, "--json", *extra)
    assert_one_line_error(rc, out, err, "eval", *needles)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("tied", [False, True])
def test_hf_directory_loads_the_same_model_as_transformers(tmp_path, tied):
    d, model = hf_dir(tmp_path, tied)
    ids = torch.randint(4, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(d)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, capsys, data, monkeypatch):
    d, model = hf_dir(tmp_path)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    eval_fails(capsys, tmp_path, d, data, ".bin", "does not unpickle")


def test_safetensors_lacking_tensors_is_refused_not_randomly_initialised(tmp_path, capsys, data):
    d, _ = hf_dir(tmp_path)
    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, d / "model.safetensors",
              metadata={"format": "pt"})
    eval_fails(capsys, tmp_path, d, data, "lacks", "model.layers.1.")


def test_untied_model_without_lm_head_is_refused(tmp_path, capsys, data):
    d, _ = hf_dir(tmp_path, tied=False)
    state = load_file(d / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, d / "model.safetensors")
    eval_fails(capsys, tmp_path, d, data, "lm_head.weight")


def test_unknown_and_mis_shaped_tensors_are_refused(tmp_path, capsys, data):
    d, _ = hf_dir(tmp_path)
    state = load_file(d / "model.safetensors")
    save_file({**state, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, d / "model.safetensors")
    eval_fails(capsys, tmp_path, d, data, "does not know", "model.layers.9.mlp.up_proj.weight")
    save_file({**state, "model.norm.weight": torch.ones(65)}, d / "model.safetensors")
    eval_fails(capsys, tmp_path, d, data, "model.norm.weight has shape (65,)")


@pytest.mark.parametrize("text", ["[]", "null", "\"llama\""])
def test_config_json_not_an_object(tmp_path, capsys, data, text):
    d, _ = hf_dir(tmp_path)
    (d / "config.json").write_text(text)
    eval_fails(capsys, tmp_path, d, data, "config.json", "JSON object")


def test_prepared_directory_with_a_list_config(tmp_path, capsys, data):
    from qosora.config import PrepareConfig
    from qosora.preparation import prepare

    d, _ = hf_dir(tmp_path)
    prepare(d, tmp_path / "p", PrepareConfig(method="pissa", rank=4, targets=("q_proj",)), progress=False)
    (tmp_path / "p" / "config.json").write_text("[1]")
    eval_fails(capsys, tmp_path, tmp_path / "p", data, "config.json", "JSON object")


@pytest.mark.parametrize("flags, needle", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seq-len", "0"], "--seq-len must be >= 2"),
    (["--seq-len", "-5"], "--seq-len must be >= 2"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, data, flags, needle):
    d, _ = hf_dir(tmp_path)
    eval_fails(capsys, tmp_path, d, data, needle, extra=flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path, capsys, data):
    d, _ = hf_dir(tmp_path)
    eval_fails(capsys, tmp_path, d, data, "no CUDA device", extra=["--device", "cuda"])


def test_empty_exact_match_data_is_an_error_not_zero_accuracy(tmp_path, capsys):
    d, _ = hf_dir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    eval_fails(capsys, tmp_path, d, tmp_path / "empty.jsonl", "has no records", extra=["--metric", "exact-match"])


def test_neither_qosora_nor_hf_directory(tmp_path, capsys, data):
    (tmp_path / "x").mkdir()
    eval_fails(capsys, tmp_path, tmp_path / "x", data, "neither a qosora directory nor a Hugging Face")


def test_limit_and_json_output(tmp_path, capsys, data):
    d, _ = hf_dir(tmp_path)
    rc, out, err = run_cli(capsys, "eval", d, "--data", data, "--limit", "4", "--seq-len", "8", "--json")
    assert rc == 0, err
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["examples"] == 4 and report["tokens"] == 4 * 7  # 8 tokens a row, 7 next-token targets
    assert report == evaluate(d, data, limit=4, seq_len=8, progress=False).to_dict()


def test_eval_options_defaults_are_the_keyword_defaults():
    import inspect

    sig = inspect.signature(evaluate).parameters
    for name in ("metric", "seq_len", "batch_size", "limit", "max_new_tokens", "device"):
        assert sig[name].default == getattr(EvalOptions(data="x"), name), name


def test_tokenizer_that_does_not_belong_to_the_model(tmp_path, capsys, data):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d, _ = hf_dir(tmp_path)
    tok = Tokenizer(models.WordLevel({"w0": 0, "w3": 3, "w5": 5, "w6": 6, "big": 300}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", unk_token="w3").save_pretrained(d)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "w5 w6 big w6"}) + "\n")
    eval_fails(capsys, tmp_path, d, tmp_path / "big.jsonl", "token id 300", "128 rows")
