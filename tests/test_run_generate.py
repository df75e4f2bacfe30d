"""The deploy path: qosora.run generates with onnxruntime + tokenizers only, and matches PyTorch greedy decoding."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from qosora.export import ExportOptions, export_onnx

from conftest import build_tiny_model, write_tiny_tokenizer


def _export(tmp_path, arch="qwen2"):
    src = tmp_path / "hf"
    model = build_tiny_model(src, arch, weight_std=0.15)  # far from uniform logits: greedy ties cannot hide a bug
    write_tiny_tokenizer(src)
    out = tmp_path / "onnx"
    export_onnx(src, out, options=ExportOptions(format="fp32"), check=False)
    return model, out


def test_generate_imports_no_torch_and_matches_torch_greedy(tmp_path):
    model, out = _export(tmp_path)
    code = (
        "import sys, json, time\n"
        "from qosora.run import OnnxCausalLM, generate\n"
        f"lm = OnnxCausalLM({str(out)!r}, threads=1)\n"
        "t0 = time.perf_counter()\n"
        f"r = generate({str(out)!r}, 'w3 w17 w42 w9', max_new_tokens=12, model=lm)\n"
        "wall = time.perf_counter() - t0\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'ids': r.new_tokens, 'prompt': r.prompt_tokens,\n"
        "                  'tps': r.decode_tokens_per_s, 'prefill_ms': r.prefill_ms, 'wall': wall}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    assert result["prompt"] == 4 and len(result["ids"]) == 12
    # 12 tokens = prefill + 11 decode steps; the timed steps fit inside the wall time of the call.
    assert result["prefill_ms"] / 1e3 + 11 / result["tps"] <= result["wall"]
    with torch.no_grad():  # PyTorch greedy, no EOS in the tiny config's way: 12 tokens
        ref = model.generate(torch.tensor([[3, 17, 42, 9]]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert result["ids"] == ref


def test_batched_left_padded_forward_matches_single_rows(tmp_path):
    from qosora.run import OnnxCausalLM

    _, out = _export(tmp_path, "llama")
    lm = OnnxCausalLM(out, threads=1)
    a, b = [5, 6, 7, 8, 9], [11, 12, 13]
    ids = np.array([a, [0, 0] + b])
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])
    logits, cache = lm.forward(ids, mask)
    assert cache["past_key_values.1.value"].shape == (2, 2, 5, 16)
    single, _ = lm.forward(np.array([b]), np.ones((1, 3), np.int64))
    np.testing.assert_allclose(logits[1, 2:], single[0], rtol=1e-4, atol=1e-4)
    # one decode step for the batch, positions continue per row
    nxt = logits[:, -1].argmax(-1)[:, None]
    step, _ = lm.forward(nxt, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), cache=cache)
    single2, _ = lm.forward(np.array([b + [int(nxt[1, 0])]]), np.ones((1, 4), np.int64))
    np.testing.assert_allclose(step[1, 0], single2[0, -1], rtol=1e-4, atol=1e-4)


def test_spinning_is_off_unless_asked_for():
    from qosora.run import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(key) == "0"
    assert session_options(2, spinning=True).get_session_config_entry(key) == "1"
    assert session_options(2, spinning=True).intra_op_num_threads == 2
