"""The training loop on a tiny Llama: loss goes down, gradients reach exactly the declared factors, SORSA's
regularizer holds orthonormality, OSoRA/PiSSA train without it, the output is a loadable prepared directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qosora.train.loop import TrainConfig, finetune

from conftest import TRAIN_MODEL, build_tiny_model, char_tokenizer, make_prepared, reversal_data

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp: Path, prepared: Path, name: str, **kw):
    cfg = dict(data=str(reversal_data(tmp / "data.jsonl")), out=str(tmp / name), steps=30, lr=3e-3, batch_size=8,
               seq_len=32)
    cfg.update(kw)
    return finetune(prepared, TrainConfig(**cfg), progress=False)


@pytest.mark.parametrize("method", ["sorsa", "osora", "pissa"])
def test_loss_goes_down_and_output_is_a_trained_directory(tmp_path, method):
    from qosora.layer import adapter_layers
    from qosora.loading import load
    from qosora.prepared import PreparedReader

    prepared = make_prepared(tmp_path, method)
    lr = 1e-1 if method == "osora" else 3e-3
    res = run(tmp_path, prepared, "run", lr=lr, eval_fraction=0.2)
    assert res.steps == 30
    assert res.final_eval_loss < res.initial_eval_loss - 0.3, res
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    assert {"lr", "tokens_per_s", "grad_norm"} <= set(train[0])
    assert ("orthonormality" in train[0]) == (method == "sorsa")
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000  # a real image, not an empty file
    # OUT is a prepared-format directory holding the trained factors; the frozen files are unchanged.
    out = PreparedReader(tmp_path / "run")
    before = PreparedReader(prepared)
    assert out.config.trained_steps == 30
    m = out.modules[0]
    assert torch.equal(out.adapted(m).residual_dense(), before.adapted(m).residual_dense())
    trainable = out.spec.trainable
    for f in out.spec.factors:
        changed = not torch.equal(out.factors(m)[f], before.factors(m)[f])
        assert changed == (f in trainable), f
    # It loads as a model that holds exactly those trained factors.
    loaded = adapter_layers(load(tmp_path / "run"))
    for f, t in out.factors(m).items():
        assert torch.equal(loaded[m].factors()[f].float(), t.float()), f


@pytest.mark.parametrize("method", ["sorsa", "osora", "pissa", "qlora"])
def test_gradients_reach_exactly_the_declared_parameters(tmp_path, method):
    from qosora.loading import load
    from qosora.layer import adapter_layers
    from qosora.train.data import collate, encode
    from qosora.train.params import trainable_parameters
    from qosora.train.loss import causal_lm_loss

    model = load(make_prepared(tmp_path, method))
    named = trainable_parameters(model)
    declared = {id(p) for l in adapter_layers(model).values() for p in l.adapter_params().values()}
    assert {id(p) for p in named.values()} == declared and len(declared) == 14 * len(
        {"sorsa": "USV", "osora": "SO", "pissa": "AB", "qlora": "AB"}[method])
    tok = char_tokenizer()
    batch = collate([encode({"prompt": "abc|", "completion": "cba"}, tok)] * 2, pad_id=0)
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    for name, p in model.named_parameters():
        if id(p) in declared:
            assert p.grad is not None, name
            # QLoRA starts at B = 0, so A's first gradient is exactly zero (dL/dA = B^T dL/dy x^T).
            if method == "qlora" and name.endswith(".A"):
                assert torch.count_nonzero(p.grad) == 0, name
            else:
                assert p.grad.abs().sum() > 0, name
            assert p.dtype == torch.float32  # fp32 master weights while training
        else:
            assert not p.requires_grad and p.grad is None, name
    # The NF4 residual is no parameter at all.
    assert all("residual" not in n for n, _ in model.named_parameters())


def test_sorsa_regularizer_keeps_orthonormality(tmp_path):
    prepared = make_prepared(tmp_path, "sorsa")
    kept = run(tmp_path, prepared, "reg", lr=1e-2, gamma=1e-3)
    drift = run(tmp_path, prepared, "noreg", lr=1e-2, gamma=0.0)
    assert drift.orthonormality > 0.2, drift
    assert kept.orthonormality < drift.orthonormality / 5, (kept, drift)


def test_train_cli_prepares_on_the_fly_and_refuses_to_clobber(tmp_path, capsys):
    from qosora.cli import main

    build_tiny_model(tmp_path / "hf", tokenizer=char_tokenizer(), **TRAIN_MODEL)
    data = reversal_data(tmp_path / "d.jsonl", n=16)
    args = ["train", str(tmp_path / "hf"), "--method", "pissa", "--rank", "4", "--data", str(data),
            "--out", str(tmp_path / "run"), "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 3 and result["method"] == "pissa"
    assert (tmp_path / "run" / "prepared" / "qosora_config.json").is_file()
    assert (tmp_path / "run" / "qosora_config.json").is_file()
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "hf"), "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "--method and --rank" in capsys.readouterr().err


def test_gradient_checkpointing_and_full_logits_do_not_change_training(tmp_path):
    prepared = make_prepared(tmp_path, "sorsa")
    ref = run(tmp_path, prepared, "ref", steps=4, bf16=False)
    ckpt = run(tmp_path, prepared, "ckpt", steps=4, bf16=False, gradient_checkpointing=True)
    full = run(tmp_path, prepared, "full", steps=4, bf16=False, chunked_loss=False)
    losses = lambda d: [json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses("ckpt") == pytest.approx(losses("ref"), rel=1e-5)
    assert losses("full") == pytest.approx(losses("ref"), rel=1e-4)
    assert ref.final_loss < ref.first_loss


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    from qosora.errors import QosoraError

    prepared = make_prepared(tmp_path, "pissa")
    with pytest.raises(QosoraError, match="lower --lr"):
        run(tmp_path, prepared, "nan", steps=5, lr=1e30, max_grad_norm=1e30)


@pytest.mark.parametrize("shape", [(12, 5, 9), (7, 1, 7), (6, 6, 6)])  # d_out != d_in, rank 1, rank = min(d)
def test_regularizer_closed_form_gradient_matches_autograd(shape):
    from qosora.methods import orthonormality
    from qosora.train.regularizer import orthonormality_grads

    d_out, r, d_in = shape
    g = torch.Generator().manual_seed(1)
    U = torch.randn(d_out, r, generator=g, dtype=torch.float64, requires_grad=True)
    Vh = torch.randn(r, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.linalg.matrix_norm(U.mT @ U - torch.eye(r, dtype=torch.float64)) + torch.linalg.matrix_norm(
        Vh @ Vh.mT - torch.eye(r, dtype=torch.float64))
    rU, rVh = torch.autograd.grad(ref, [U, Vh])
    value, gU, gVh = orthonormality_grads(U.detach().float(), Vh.detach().float())
    assert value == pytest.approx(float(ref.detach()), rel=1e-5)
    assert value == pytest.approx(float(orthonormality(U.detach(), Vh.detach())), rel=1e-5)
    torch.testing.assert_close(gU.double(), rU, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gVh.double(), rVh, rtol=1e-4, atol=1e-5)
