"""The exported directory runs in onnxruntime-genai (`og.Model`), for the CPU form and for the CUDA form with its
providers cleared (the CPU provider implements the same ops), and gives PyTorch's greedy tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qosora.export import ExportOptions, export_onnx

from conftest import build_tiny_model, write_tiny_tokenizer

og = pytest.importorskip("onnxruntime_genai", reason="the interop tier needs onnxruntime-genai (in the test extra)")

PROMPT = [3, 17, 42, 9, 77, 5, 101, 64]
EOS = 127


def _torch_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _genai_greedy(directory, ids: list[int], n: int, clear_providers: bool = False) -> list[int]:
    config = og.Config(str(directory))
    if clear_providers:
        config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)][len(ids):]


def _qosora_greedy(directory, ids: list[int], n: int) -> list[int]:
    from qosora.run import GenerationOptions, Generator

    g = Generator(directory, provider="cpu", threads=1, spinning=False)
    return g.generate([ids], GenerationOptions(max_new_tokens=n, ignore_eos=True))[0].new_tokens


def _assert_same_until_eos(genai: list[int], ours: list[int]) -> None:
    """genai stops at EOS (ours was asked to ignore it): the same tokens up to there."""
    assert len(genai) >= 8 and genai == ours[:len(genai)]
    assert len(genai) == len(ours) or ours[len(genai)] == EOS  # genai's sequence ends before its EOS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("genai")
    model = build_tiny_model(root / "hf", "llama", weight_std=0.15, eos_token_id=EOS, pad_token_id=0)
    write_tiny_tokenizer(root / "hf")
    assert EOS not in _torch_greedy(model, PROMPT, 32)  # genai stops at EOS, PyTorch below does not
    return model, root


@pytest.mark.parametrize("opts", [ExportOptions(format="fp32", attention="gqa"), ExportOptions(format="fp32"),
                                  ExportOptions(format="int4", accuracy_level=0)],
                         ids=["fp32-gqa", "fp32-standard", "int4-cpu"])
def test_cpu_form_runs_in_genai_with_torchs_greedy_tokens(tiny, opts):
    model, root = tiny
    out = root / f"{opts.format}-{opts.attention}"
    export_onnx(root / "hf", out, options=opts, check=False)
    got = _genai_greedy(out, PROMPT, 32)
    _assert_same_until_eos(got, _qosora_greedy(out, PROMPT, 32))  # the same graph under both runtimes
    if opts.format != "int4":  # int4 weights change the function; the dense graphs are PyTorch's
        assert got == _torch_greedy(model, PROMPT, 32)


def test_cuda_int4_form_gives_the_same_tokens_in_genai_and_qosora(tiny):
    _, root = tiny
    out = root / "cuda-int4"
    export_onnx(root / "hf", out, options=ExportOptions(format="int4", device="cuda"), check=False)
    got = _genai_greedy(out, PROMPT, 32, clear_providers=True)
    _assert_same_until_eos(got, _qosora_greedy(out, PROMPT, 32))


def test_cuda_form_runs_in_genai_on_the_cpu_provider(tiny):
    model, root = tiny
    out = root / "cuda-fp16"
    # The CUDA form of a dense model: fp16 weights, I/O and cache, GroupQueryAttention, shared buffer.
    export_onnx(root / "hf", out, options=ExportOptions(format="fp16", attention="gqa", device="cuda"), check=False)
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert "position_ids" not in cfg["model"]["decoder"]["inputs"]
    got = _genai_greedy(out, PROMPT, 32, clear_providers=True)
    ref = _torch_greedy(model, PROMPT, 32)
    agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
    assert agree >= 16, (got, ref)  # fp16 rounding may flip a near-tie late in the sequence, not early
