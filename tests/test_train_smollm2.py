"""Real-model tier: a short SORSA fine-tune of SmolLM2-135M-Instruct on the bundled demo task lowers the
held-out loss and keeps the factors orthonormal; the output evaluates with `qosora eval`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_sorsa_demo_finetune_lowers_heldout_loss(smollm2_dir, tmp_path):
    from qosora.data import DEMO_JSONL
    from qosora.config import PrepareConfig
    from qosora.evaluation import evaluate
    from qosora.train.loop import TrainConfig, finetune

    config = TrainConfig(data=str(DEMO_JSONL), out=str(tmp_path / "run"), steps=12, lr=3e-4, batch_size=8,
                         seq_len=64, eval_fraction=0.1)
    res = finetune(smollm2_dir, config, PrepareConfig(method="sorsa", rank=8), progress=False)
    assert res.final_eval_loss < 0.8 * res.initial_eval_loss, res
    assert res.orthonormality < 0.05, res
    report = evaluate(tmp_path / "run", DEMO_JSONL, "loss", seq_len=64, limit=16, progress=False)
    assert report.loss < res.initial_eval_loss
