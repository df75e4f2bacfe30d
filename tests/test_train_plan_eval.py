"""`qosora plan` (component accounting, the 7B/8B budgets, JSON) and `qosora eval` (loss, ppl, exact match)."""

from __future__ import annotations

import json
import math

import pytest

from qosora.planning import GiB, ModelDims, plan
from test_train_data import write_jsonl
from test_train_loop import make_prepared, one_thread, reversal_data  # noqa: F401  (fixture)


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
    assert plan("qwen2.5-7b", **kw).total_bytes > 0


def test_plan_counts_the_trainable_parameters_of_a_real_prepared_model(tmp_path):
    from qosora.loading import load
    from qosora.train.loop import trainable_parameters

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


def test_eval_loss_ppl_and_exact_match(tmp_path, capsys):
    from qosora.cli import main
    from qosora.evaluation import evaluate

    prepared = make_prepared(tmp_path, "pissa")
    data = reversal_data(tmp_path / "d.jsonl", n=12)
    loss = evaluate(prepared, data, "loss", progress=False)
    ppl = evaluate(prepared, data, "ppl", progress=False)
    assert loss.examples == 12 and loss.tokens > 0 and 0 < loss.value < 10
    assert ppl.value == pytest.approx(math.exp(loss.value))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "#### 2"}] * 3)
    em = evaluate(prepared, qa, "exact-match", max_new_tokens=4, progress=False)
    assert em.examples == 3 and 0.0 <= em.value <= 1.0
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
