"""Scale-out and integrations: 2-process gloo data parallel == 1 process with 2x gradient accumulation;
HF Trainer with the SORSA callback; chunked cross-entropy == full-logits cross-entropy (value and gradient)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import char_tokenizer, make_prepared, reversal_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(path):
    return [json.loads(l) for l in path.read_text().splitlines() if '"loss"' in l]


def test_gloo_two_processes_equal_one_with_double_accumulation(tmp_path):
    prepared = make_prepared(tmp_path, "sorsa")
    data = reversal_data(tmp_path / "d.jsonl")
    common = ["train", str(prepared), "--data", str(data), "--steps", "6", "--lr", "3e-3", "--batch-size", "4",
              "--seq-len", "32", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    subprocess.run([sys.executable, "-m", "qosora", *common, "--out", str(tmp_path / "single"), "--grad-accum", "2"],
                   check=True, env=env, capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "qosora", *common, "--out", str(tmp_path / "ddp"), "--grad-accum", "1"],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = _metrics(tmp_path / "single" / "metrics.jsonl"), _metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["orthonormality"] == pytest.approx(b["orthonormality"], rel=1e-3, abs=1e-5)
    fa, fb = load_file(tmp_path / "single" / "adapter.safetensors"), load_file(tmp_path / "ddp" / "adapter.safetensors")
    for k in fa:
        torch.testing.assert_close(fa[k].float(), fb[k].float(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_matches_full_logits(dtype):
    from qosora.train.loss import chunked_lm_loss, full_lm_loss

    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 17, 16, 50
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(V, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    labels[2, 10:] = -100
    full, n_full = full_lm_loss(hidden, weight, labels)
    gh_full, gw_full = torch.autograd.grad(full, [hidden, weight])
    for chunk in (1, 7, 1000):  # uneven chunks, one chunk
        loss, n = chunked_lm_loss(hidden, weight, labels, chunk_size=chunk)
        gh, gw = torch.autograd.grad(loss, [hidden, weight])
        assert n == n_full
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(loss, full.float(), **tol)
        torch.testing.assert_close(gh.float(), gh_full.float(), **tol)
        torch.testing.assert_close(gw.float(), gw_full.float(), **tol)


def test_hf_trainer_with_sorsa_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    from qosora.layer import adapter_layers
    from qosora.train.data import collate, load_examples
    from qosora.train.hf import SORSARegularizer, trainable_model
    from qosora.train.regularizer import orthonormality

    prepared = make_prepared(tmp_path, "sorsa")
    examples = load_examples(reversal_data(tmp_path / "d.jsonl"), char_tokenizer(), 32)

    def collator(rows):
        b = collate(rows, pad_id=0)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    results = {}
    for gamma in (1e-3, 0.0):
        model = trainable_model(prepared)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert n_train == sum(p.numel() for l in adapter_layers(model).values() for p in l.adapter_params().values())
        callback = SORSARegularizer(gamma)
        args = TrainingArguments(output_dir=str(tmp_path / f"hf{gamma}"), max_steps=25, learning_rate=1e-2,
                                 per_device_train_batch_size=8, report_to=[], save_strategy="no", use_cpu=True,
                                 logging_steps=5, lr_scheduler_type="constant", remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator,
                          callbacks=[callback])
        out = trainer.train()
        # Logged beside the loss every logging_steps=5 of the 25 (and in the end-of-training summary).
        logged = [h["step"] for h in trainer.state.log_history if "loss" in h and "orthonormality" in h]
        assert logged == [5, 10, 15, 20, 25], trainer.state.log_history
        results[gamma] = (orthonormality(adapter_layers(model)), out.training_loss)
    assert results[1e-3][0] < results[0.0][0] / 5, results
