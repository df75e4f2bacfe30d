"""The deploy path: qosora.run generates with onnxruntime + tokenizers only, and matches PyTorch greedy decoding on
both graph contracts (standard: left padding, concatenated cache; gqa: right padding, one shared cache buffer)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qosora.export import ExportOptions, export_onnx

from conftest import build_tiny_model, write_tiny_tokenizer

PROMPT = [3, 17, 42, 9]
PROMPTS = ["w3 w17 w42 w9", "w5 w6", "w7 w8 w9 w10 w11 w12 w13"]  # mixed lengths: padding on both sides


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases) far from uniform logits, and its exports: fp32 with each attention, fp16."""
    root = tmp_path_factory.mktemp("run")
    model = build_tiny_model(root / "hf", "qwen2", weight_std=0.15)  # greedy ties cannot hide a bug
    write_tiny_tokenizer(root / "hf")
    dirs = {}
    for name, opts in {"standard": ExportOptions(format="fp32", attention="standard"),
                       "gqa": ExportOptions(format="fp32", attention="gqa"),
                       "fp16": ExportOptions(format="fp16"),
                       "int4-fp16-standard": ExportOptions(format="int4", attention="standard", io_dtype="float16"),
                       "int4-fp16-gqa": ExportOptions(format="int4", attention="gqa", io_dtype="float16")}.items():
        export_onnx(root / "hf", root / name, options=opts, check=False, progress=False)
        dirs[name] = root / name
    return model, dirs


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def generator(path):
    from qosora.run import Generator

    return Generator(path, provider="cpu", threads=1, spinning=False)


def test_contract_is_read_from_the_graph(tiny):
    from qosora.run import OnnxCausalLM

    _, dirs = tiny
    assert OnnxCausalLM(dirs["standard"]).io.contract == "standard"
    gqa = OnnxCausalLM(dirs["gqa"])
    assert gqa.io.contract == "gqa" and "position_ids" not in {i.name for i in gqa.session.get_inputs()}
    assert OnnxCausalLM(dirs["fp16"]).io.cache_dtype == np.float16


@pytest.mark.parametrize("kind", ["standard", "gqa"])
def test_greedy_matches_torch_for_32_tokens(tiny, kind):
    from qosora.run import GenerationOptions

    model, dirs = tiny
    r = generator(dirs[kind]).generate([PROMPT], GenerationOptions(max_new_tokens=32, ignore_eos=True))[0]
    assert r.new_tokens == torch_greedy(model, PROMPT, 32) and r.stop_reason == "length"


@pytest.mark.parametrize("kind", ["standard", "gqa"])
def test_batch_of_mixed_lengths_equals_torch_one_by_one(tiny, kind):
    from qosora.run import GenerationOptions

    model, dirs = tiny
    g = generator(dirs[kind])
    opts = GenerationOptions(max_new_tokens=12, ignore_eos=True)
    batched = g.generate(PROMPTS, opts, batch_size=3)
    for prompt, r in zip(PROMPTS, batched):
        ids = [int(w[1:]) for w in prompt.split()]
        assert r.prompt_tokens == len(ids) and r.new_tokens == torch_greedy(model, ids, 12), prompt
    assert [r.new_tokens for r in g.generate(PROMPTS, opts, batch_size=2)] == [r.new_tokens for r in batched]


def confident_prefix(path, prompt: list[int], tokens: list[int], margin: float = 0.1) -> int:
    """How many of `tokens` (a greedy continuation) the graph at `path` chose with a top-2 logit margin >= margin."""
    from qosora.run import OnnxCausalLM

    lm = OnnxCausalLM(path)
    seq = prompt + tokens
    logits, _ = lm.forward(np.array([seq]), np.ones((1, len(seq)), np.int64))
    top2 = np.sort(logits[0, len(prompt) - 1:-1].astype(np.float32), axis=-1)[:, -2:]
    small = np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)
    return int(small[0]) if len(small) else len(tokens)


def test_fp16_io_follows_fp32_while_margins_allow(tiny):
    """fp16 rounding may flip a near-tie: compare the tokens chosen with a clear margin (and at least 3 of them)."""
    from qosora.run import GenerationOptions

    model, dirs = tiny
    opts = GenerationOptions(max_new_tokens=8, ignore_eos=True)
    ref = torch_greedy(model, PROMPT, 8)
    fp16 = generator(dirs["fp16"]).generate([PROMPT], opts)[0].new_tokens
    n = confident_prefix(dirs["fp16"], PROMPT, ref)
    assert n >= 3 and fp16[:n] == ref[:n]
    # The same int4 weights under both contracts, fp16 cache. Their logits are close to tied (int4 on a 64-wide
    # model), so compare logits, teacher-forced on the standard graph's greedy tokens: the gqa graph's decode loop
    # (right padding, one shared fp16 buffer) against the gqa graph's own uncached forward of each prefix (batch 1,
    # no padding), and against the standard graph (fused fp16 attention vs float32 softmax: looser).
    from qosora.run import OnnxCausalLM

    standard = OnnxCausalLM(dirs["int4-fp16-standard"])
    gqa = OnnxCausalLM(dirs["int4-fp16-gqa"])
    rows = [[int(w[1:]) for w in p.split()] for p in PROMPTS]
    tokens = [r.new_tokens for r in generator(dirs["int4-fp16-standard"]).generate(PROMPTS, opts, batch_size=3)]
    batch = gqa.start(rows, 8)
    got = [batch.prefill()]
    for k in range(7):
        got.append(batch.step(np.array([t[k] for t in tokens]), np.ones(3, bool)))
    for b, (row, toks) in enumerate(zip(rows, tokens)):
        seq, decoded = row + toks, np.stack([g[b] for g in got])  # [8, V]
        for lm, atol in ((gqa, 0.01), (standard, 0.15)):
            ref, _ = lm.forward(np.array([seq]), np.ones((1, len(seq)), np.int64))
            np.testing.assert_allclose(decoded, ref[0, len(row) - 1:len(seq) - 1].astype(np.float32), atol=atol,
                                       rtol=0)


def test_sampling_is_seeded_per_prompt(tiny):
    from qosora.run import GenerationOptions

    _, dirs = tiny
    g = generator(dirs["gqa"])
    hot = GenerationOptions(max_new_tokens=16, temperature=5.0, seed=3, ignore_eos=True)
    a, b = g.generate([PROMPT], hot)[0], g.generate([PROMPT], hot)[0]
    other = g.generate([PROMPT], GenerationOptions(max_new_tokens=16, temperature=5.0, seed=4, ignore_eos=True))[0]
    assert a.new_tokens == b.new_tokens and a.new_tokens != other.new_tokens
    # each prompt draws from its own generator: its neighbours in the batch change nothing
    batched = g.generate([PROMPTS[1], PROMPT, PROMPTS[2]], hot, batch_size=3)
    assert batched[1].new_tokens == a.new_tokens
    assert batched[0].new_tokens == g.generate([PROMPTS[1]], hot)[0].new_tokens


def test_top_k_1_and_a_tiny_top_p_are_greedy(tiny):
    from qosora.run import GenerationOptions

    model, dirs = tiny
    g, ref = generator(dirs["standard"]), torch_greedy(model, PROMPT, 12)
    for opts in (GenerationOptions(max_new_tokens=12, temperature=1.5, top_k=1, seed=7, ignore_eos=True),
                 GenerationOptions(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=7, ignore_eos=True)):
        assert g.generate([PROMPT], opts)[0].new_tokens == ref


def test_repetition_penalty_changes_greedy_output(tiny):
    """The tiny model repeats w31 three times greedily; a strong penalty must avoid repeating any earlier id."""
    from qosora.run import GenerationOptions

    model, dirs = tiny
    g = generator(dirs["gqa"])
    r = g.generate([PROMPT], GenerationOptions(max_new_tokens=8, repetition_penalty=1e4, ignore_eos=True))[0]
    assert r.new_tokens != torch_greedy(model, PROMPT, 8)
    assert len(set(PROMPT + r.new_tokens)) == len(PROMPT) + 8  # nothing repeated


def test_stop_strings_stop_and_are_cut(tiny):
    from qosora.run import GenerationOptions, load_tokenizer

    model, dirs = tiny
    g, tok = generator(dirs["standard"]), load_tokenizer(dirs["standard"])
    full = tok.decode(torch_greedy(model, PROMPT, 12))
    stop = full.split()[3]  # the fourth word of the greedy text
    r = g.generate([PROMPT], GenerationOptions(max_new_tokens=12, stop=("zz", stop), ignore_eos=True))[0]
    assert r.stop_reason == "stop" and r.text == full[: full.index(stop)] and len(r.new_tokens) < 12
    assert "".join(g.stream(PROMPT, GenerationOptions(max_new_tokens=12, stop=(stop,), ignore_eos=True))) == r.text


def test_streaming_yields_the_generated_text(tiny):
    from qosora.run import GenerationOptions, load_tokenizer

    model, dirs = tiny
    g = generator(dirs["gqa"])
    opts = GenerationOptions(max_new_tokens=10, ignore_eos=True)
    pieces = list(g.stream(PROMPTS[0], opts))
    assert len(pieces) > 1
    assert "".join(pieces) == g.generate([PROMPTS[0]], opts)[0].text == \
        load_tokenizer(dirs["gqa"]).decode(torch_greedy(model, PROMPT, 10))


def test_eos_ends_a_row(tiny, tmp_path):
    import shutil

    from qosora.run import GenerationOptions

    model, dirs = tiny
    out = tmp_path / "eos"
    shutil.copytree(dirs["gqa"], out)
    ref = torch_greedy(model, PROMPT, 12)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [999, ref[4]]}))
    r = generator(out).generate([PROMPT], GenerationOptions(max_new_tokens=12))[0]
    assert r.stop_reason == "eos" and r.new_tokens == ref[: ref.index(ref[4]) + 1]


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} is blocked on the deploy path')
sys.meta_path.insert(0, Block())
from qosora.cli import main
rc = main(sys.argv[1:])
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
sys.exit(rc)
"""


@pytest.mark.parametrize("kind", ["standard", "gqa"])
def test_cli_runs_with_torch_and_transformers_unimportable(tiny, kind):
    model, dirs = tiny
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "generate", str(dirs[kind]), "--prompt", PROMPTS[0],
                           "--max-new-tokens", "12", "--threads", "1", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    ref = torch_greedy(model, PROMPT, 12)
    n = r["new_tokens"]  # an EOS of the tiny config may end it early
    assert r["token_ids"] == ref[:n] and n == len(r["token_ids"]) >= 1


def test_generate_function_and_step_times(tiny):
    """qosora.run.generate (the old entry point) and OnnxCausalLM.generate with StepTimes keep working."""
    from qosora.run import OnnxCausalLM, StepTimes, generate

    model, dirs = tiny
    lm = OnnxCausalLM(dirs["gqa"], threads=1)
    times = StepTimes()
    ids = lm.generate(PROMPT, 12, times=times)
    assert ids == torch_greedy(model, PROMPT, 12)
    assert times.prefill_s > 0 and len(times.decode_s) == 11 and times.decode_tokens_per_s > 0
    r = generate(dirs["gqa"], PROMPTS[0], max_new_tokens=12, model=lm)
    assert r.new_tokens[: len(r.new_tokens)] == ids[: len(r.new_tokens)] and r.prompt_tokens == 4


def test_batched_left_padded_forward_matches_single_rows(tiny):
    from qosora.run import OnnxCausalLM

    _, dirs = tiny
    lm = OnnxCausalLM(dirs["standard"], threads=1)
    a, b = [5, 6, 7, 8, 9], [11, 12, 13]
    ids = np.array([a, [0, 0] + b])
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]])
    logits, cache = lm.forward(ids, mask)
    assert cache["past_key_values.1.value"].shape == (2, 2, 5, 16)
    single, _ = lm.forward(np.array([b]), np.ones((1, 3), np.int64))
    np.testing.assert_allclose(logits[1, 2:], single[0], rtol=1e-4, atol=1e-4)
    nxt = logits[:, -1].argmax(-1)[:, None]  # one decode step for the batch, positions continue per row
    step, _ = lm.forward(nxt, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1), cache=cache)
    single2, _ = lm.forward(np.array([b + [int(nxt[1, 0])]]), np.ones((1, 4), np.int64))
    np.testing.assert_allclose(step[1, 0], single2[0, -1], rtol=1e-4, atol=1e-4)


def test_spinning_is_off_unless_asked_for():
    from qosora.run import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(key) == "0"
    assert session_options(2, spinning=True).get_session_config_entry(key) == "1"
    assert session_options(2, spinning=True).intra_op_num_threads == 2
