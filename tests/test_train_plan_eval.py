"""`qosora plan` (component accounting, the 7B/8B budgets, JSON) and `qosora eval` (loss, ppl, exact match)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from qosora.planning import GiB, ModelDims, plan, read_model

from conftest import char_tokenizer, make_prepared, reversal_data, reversal_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llama2_7b_sorsa_r128_fits_8gb_and_llama3_8b_fits_10gb_thanks_to_chunked_loss():
    kw = dict(method="sorsa", rank=128, seq_len=2048, batch_size=1, optim="adamw8bit", gradient_checkpointing=True)
    l2 = plan("llama-2-7b", **kw)
    assert l2.trainable_params == 319_844_352  # SORSA paper: 320M for Llama-2-7B r=128
    assert l2.total_bytes < 8 * GiB
    l3 = plan("llama-3-8b", **kw)
    l3_full = plan("llama-3-8b", chunked_loss=False, **kw)
    assert l3.total_bytes < 10 * GiB < l3_full.total_bytes
    assert l3_full.components["logits_loss"] > 8 * l3.components["logits_loss"]
    # Each switch moves the component it should.
    adamw = plan("llama-2-7b", **{**kw, "optim": "adamw"})
    assert adamw.components["optimizer_states"] > 3.5 * l2.components["optimizer_states"]
    no_ckpt = plan("llama-2-7b", **{**kw, "gradient_checkpointing": False})
    assert no_ckpt.components["activations"] > 10 * l2.components["activations"]
    # Qwen2.5-7B (h 3584, i 18944, 28 layers, 4 kv heads of 128): r (d_in + d_out) + r per linear, by hand.
    qwen = plan("qwen2.5-7b", **kw)
    per_layer = 128 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944)) + 7 * 128
    assert qwen.trainable_params == 28 * per_layer == 322_986_496
    # Its q/k/v biases (3584 + 2 * 512 per layer) are held in bf16 beside the base.
    no_bias = plan(dataclasses.replace(read_model("qwen2.5-7b"), attention_bias=False), **kw)
    assert qwen.components["base_16bit"] - no_bias.components["base_16bit"] == 2 * 28 * (3584 + 2 * 512)


def test_plan_counts_the_trainable_parameters_of_a_real_prepared_model(tmp_path):
    from qosora.loading import load
    from qosora.train.params import trainable_parameters

    for method in ("sorsa", "osora", "pissa"):
        prepared = make_prepared(tmp_path, method)
        dims = ModelDims.from_config(json.loads((prepared / "config.json").read_text()))
        n = sum(p.numel() for p in trainable_parameters(load(prepared)).values())
        assert plan(dims, method=method, rank=8).trainable_params == n


def test_plan_cli_json_and_fit(capsys):
    from qosora.cli import main

    assert main(["plan", "--config", "llama-2-7b", "--method", "sorsa", "--rank", "128", "--seq-len", "2048",
                 "--optim", "adamw8bit", "--gradient-checkpointing", "--gpu-memory", "8", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_bytes"] == sum(d["components"].values()) and d["fits"] is True
    assert set(d["components"]) >= {"nf4_residual", "base_16bit", "adapter_weights", "gradients", "optimizer_states",
                                    "activations", "logits_loss"}
    assert main(["plan", "--config", "llama-3-8b", "--gpu-memory", "4"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--config", "no-such-model"]) == 2
    assert "llama-2-7b" in capsys.readouterr().err


def greedy_text(model, tok, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding by recomputing the whole prefix each step (no cache, no `generate`), stopping at </s>."""
    ids = tok(prompt).input_ids
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_eval_loss_ppl_and_exact_match(tmp_path, capsys):
    from qosora.cli import main
    from qosora.evaluation import evaluate, extract_answer
    from qosora.loading import load
    from qosora.train.data import gsm8k_prompt

    prepared = make_prepared(tmp_path, "pissa")
    data = reversal_data(tmp_path / "d.jsonl", n=12)
    loss = evaluate(prepared, data, "loss", progress=False)
    ppl = evaluate(prepared, data, "ppl", progress=False)
    # Reference: a float64 log-softmax over the fp32 model's logits, one example at a time; every completion
    # character and its </s> are labelled (char tokenizer, no BOS).
    tok, model = char_tokenizer(), load(prepared, dtype=torch.float32).eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in reversal_rows(12):
            prompt, completion = tok(row["prompt"]).input_ids, tok(row["completion"]).input_ids + [tok.eos_token_id]
            logp = model(torch.tensor([prompt + completion])).logits[0].double().log_softmax(-1)
            nll -= sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))
            tokens += len(completion)
    assert loss.examples == 12 and loss.tokens == tokens == sum(len(r["completion"]) + 1 for r in reversal_rows(12))
    assert loss.value == pytest.approx(nll / tokens, rel=2e-3)  # bf16 autocast where the device has it
    assert ppl.value == pytest.approx(math.exp(loss.value))
    # Exact match with a known answer: two references are what greedy decoding (an argmax loop here) produces,
    # one (five digits in four tokens) cannot be.
    questions = ["0+0?", "0+1?", "1+1?"]  # equal lengths: no padding in the batch
    said = [extract_answer(greedy_text(model, tok, gsm8k_prompt(q), 4)) for q in questions]
    assert None not in said[:2], said
    answers = [f"#### {said[0]}", f"#### {said[1]}", "#### 12345"]
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)])
    em = evaluate(prepared, qa, "exact-match", max_new_tokens=4, progress=False)
    assert em.examples == 3 and em.value == pytest.approx(2 / 3)
    assert main(["eval", str(prepared), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(loss.value)
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    # A plain Hugging Face directory (e.g. merged) evaluates too.
    assert evaluate(tmp_path / "hf", data, "loss", progress=False).tokens == loss.tokens


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("answer: -3.50 then 12", "12"), ("#### 5.0", "5"),
    ("no digits", None),
])
def test_extract_answer(text, expected):
    from qosora.evaluation import extract_answer

    assert extract_answer(text) == expected


def test_every_train_verb_help_has_an_example(capsys):
    from qosora.cli import main

    for verb in ("train", "plan", "eval"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert "example:" in out and f"qosora {verb}" in out
