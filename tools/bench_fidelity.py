"""Quantization fidelity on SmolLM2-135M (all 7 projections, 30 layers): residual NF4 vs plain NF4, in one run.

For each SVD setting: mean relative Frobenius error of deq(NF4(W_res)) + principal against W, the same for plain
deq(NF4(W)) (the anchor: bitsandbytes' absmax quantizer, QLoRA's base), and the KL divergence of the model's next-token distribution from the fp32 model's on a
real text (tests/data/sample.txt). The plain-NF4 model is qosora's `qlora` init (residual = NF4(W), B = 0).

    python tools/bench_fidelity.py --rank 64 --out bench/fidelity.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, write_json  # noqa: E402

import qosora  # noqa: E402
from qosora.config import PrepareConfig, QuantConfig, SVDConfig  # noqa: E402

TEXT = Path(__file__).parent.parent / "tests" / "data" / "sample.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", default="bench/fidelity.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qosora.fixtures import smollm2_dir

    model_dir = args.model or str(smollm2_dir())
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT.read_text(), return_tensors="pt").input_ids[:, :384]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits.float().log_softmax(-1)

    absmax = QuantConfig(scale="absmax")  # bitsandbytes' own NF4 quantizer; the default searches block scales
    settings = {
        "plain NF4 (qlora init)": PrepareConfig(method="qlora", rank=args.rank, quant=absmax),
        "plain NF4, searched scales": PrepareConfig(method="qlora", rank=args.rank),
        "randomized SVD, 1 round, absmax scales": PrepareConfig(method="sorsa", rank=args.rank, quant=absmax),
        "randomized SVD, 1 round": PrepareConfig(method="sorsa", rank=args.rank),
        "exact SVD, 1 round": PrepareConfig(method="sorsa", rank=args.rank, svd=SVDConfig(solver="exact")),
        "randomized SVD, 5 rounds, absmax scales": PrepareConfig(method="sorsa", rank=args.rank, quant=absmax,
                                                                 svd=SVDConfig(refine_rounds=5)),
        "randomized SVD, 5 rounds": PrepareConfig(method="sorsa", rank=args.rank, svd=SVDConfig(refine_rounds=5)),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in settings.items():
            out = Path(tmp) / str(len(rows))
            r = qosora.prepare(model_dir, out, cfg, progress=False)
            with torch.no_grad():
                logp = qosora.load(out)(ids).logits.float().log_softmax(-1)
            kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
            rows[name] = {
                "mean_rel_error": r.mean_rel_error, "mean_rel_error_plain_nf4": r.mean_rel_error_plain_nf4,
                "error_reduction": 1 - r.mean_rel_error / r.mean_rel_error_plain_nf4, "kl_from_fp32": kl,
                "prepare_seconds": r.seconds,
            }
            print(f"{name:<28} rel err {r.mean_rel_error:.4f} (plain {r.mean_rel_error_plain_nf4:.4f}, "
                  f"-{rows[name]['error_reduction']:.1%})  KL {kl:.4f}  {r.seconds:.1f} s")
    plain_kl = rows["plain NF4 (qlora init)"]["kl_from_fp32"]
    for row in rows.values():
        row["kl_ratio_vs_plain_nf4"] = row["kl_from_fp32"] / plain_kl
    write_json(args.out, {"benchmark": "fidelity", "model": model_dir, "rank": args.rank, "tokens": ids.shape[1],
                          "machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
