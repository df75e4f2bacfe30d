"""Real-model tier (SmolLM2-135M, 30 layers, all 7 projections, rank 64): quantization fidelity on real spectra.

Measured here (BENCHMARKS.md): mean relative error 33.1 % below plain (bitsandbytes) NF4 with one round, 49.0 % with
5 QPiSSA rounds, with the default searched NF4 scales. The thresholds sit a little under that, to catch regressions,
and at the issue's targets (30 % / 45 %).
"""

from pathlib import Path

import pytest
import torch

import qosora
from qosora.config import PrepareConfig, QuantConfig, SVDConfig

pytestmark = pytest.mark.slow
TEXT = (Path(__file__).parent / "data" / "sample.txt").read_text()


@pytest.fixture(scope="module")
def prepared(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    reports = {}
    for name, cfg in {
        "sorsa": PrepareConfig(method="sorsa", rank=64),
        "sorsa-refined": PrepareConfig(method="sorsa", rank=64, svd=SVDConfig(refine_rounds=5)),
        "qlora": PrepareConfig(method="qlora", rank=64, quant=QuantConfig(scale="absmax")),  # bitsandbytes' NF4(W)
    }.items():
        reports[name] = qosora.prepare(smollm2_dir, root / name, cfg, progress=False)
    return root, reports


def test_residual_quantization_beats_plain_nf4_on_real_weights(prepared):
    _, reports = prepared
    one, refined = reports["sorsa"], reports["sorsa-refined"]
    assert one.layers == refined.layers == 210
    reduction_one = 1 - one.mean_rel_error / one.mean_rel_error_plain_nf4
    reduction_refined = 1 - refined.mean_rel_error / refined.mean_rel_error_plain_nf4
    print(f"error reduction vs plain NF4: one round {reduction_one:.1%}, 5 rounds {reduction_refined:.1%}")
    assert reduction_one > 0.31
    assert reduction_refined > 0.47
    plain = reports["qlora"]
    assert abs(plain.mean_rel_error - plain.mean_rel_error_plain_nf4) < 1e-9  # QLoRA's residual is NF4(W) itself


def test_kl_from_fp32_is_lower_than_plain_nf4(smollm2_dir, prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = prepared
    torch.set_num_threads(2)
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(TEXT, return_tensors="pt").input_ids[:, :384]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)(ids).logits.float().log_softmax(-1)

        def kl(name):
            logp = qosora.load(root / name)(ids).logits.float().log_softmax(-1)
            return float((ref.exp() * (ref - logp)).sum(-1).mean())

        kls = {name: kl(name) for name in ("sorsa", "sorsa-refined", "qlora")}
    print("KL(fp32 || model):", kls)
    assert kls["sorsa-refined"] < kls["sorsa"] < kls["qlora"]
