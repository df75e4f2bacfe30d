"""Prepare SmolLM2 at rank r: qosora (streamed SVD + NF4) vs PEFT's PiSSA route, in the same run.

PEFT's route to a PiSSA adapter on a 4-bit base (its documented recipe): load the fp32 model,
`LoraConfig(init_lora_weights="pissa_niter_4")`, save the adapter, unload and save the residual model, then reload
the residual in 4-bit (bitsandbytes NF4, double quant) with the adapter on top. qosora does the same work (top-r SVD
with 4 power iterations, NF4 residual with double quant) in one streamed pass, plus per-layer error statistics.

Each run is its own process (clean peak RSS); runs alternate qosora / PEFT; medians are reported.

    python tools/bench_prepare.py --rank 64 --repeats 3 --out bench/prepare.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, median, run_child, write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child_qosora(model: str, out: str, rank: int) -> dict:
    import qosora
    from qosora.config import PrepareConfig

    import resource

    r = qosora.prepare(model, out, PrepareConfig(method="pissa", rank=rank), progress=False, device="cpu")
    prepare_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_4bit = qosora.load(out)  # what training starts from
    return {"layers": r.layers, "mean_rel_error": r.mean_rel_error, "prepare_peak_rss_bytes": prepare_rss,
            "params": sum(p.numel() for p in model_4bit.parameters())}


def child_peft(model: str, out: str, rank: int) -> dict:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = Path(out)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="pissa_niter_4", lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: reload without re-running PiSSA
    peft_model.save_pretrained(out / "adapter")
    residual = peft_model.unload()
    residual.save_pretrained(out / "residual")
    for f in Path(model).glob("tokenizer*"):
        shutil.copy(f, out / "residual" / f.name)
    del residual, peft_model, base
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model_4bit = AutoModelForCausalLM.from_pretrained(out / "residual", quantization_config=bnb, device_map="cpu")
    model_4bit = PeftModel.from_pretrained(model_4bit, out / "adapter")
    return {"params": sum(p.numel() for p in model_4bit.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: the SmolLM2-135M fixture)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/prepare.json")
    ap.add_argument("--child", choices=["qosora", "peft"])
    ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child:
        fn = child_qosora if args.child == "qosora" else child_peft
        print(json.dumps(fn(args.model, args.child_out, args.rank)))
        return
    if args.model is None:
        from qosora.fixtures import smollm2_dir

        args.model = str(smollm2_dir())
    fp32_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    runs = {"qosora": [], "peft": []}
    for i in range(args.repeats):
        for who in ("qosora", "peft"):
            tmp = tempfile.mkdtemp(prefix=f"bench-{who}-")
            out = str(Path(tmp) / "out")
            r = run_child([__file__, "--child", who, "--child-out", out, "--model", args.model, "--rank", str(args.rank)])
            r["output_bytes"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
            shutil.rmtree(tmp)
            runs[who].append(r)
            print(f"run {i} {who}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    summary = {
        who: {"seconds_median": median([r["seconds"] for r in rs]),
              "peak_rss_bytes_median": median([r["peak_rss_bytes"] for r in rs]),
              "output_bytes": rs[-1]["output_bytes"]}
        for who, rs in runs.items()
    }
    summary["qosora"]["prepare_only_peak_rss_bytes_median"] = median(
        [r["child"]["prepare_peak_rss_bytes"] for r in runs["qosora"]])
    q, p = summary["qosora"], summary["peft"]
    result = {
        "benchmark": "prepare", "model": args.model, "rank": args.rank, "repeats": args.repeats, "machine": machine(),
        "fp32_checkpoint_bytes": fp32_bytes, "runs": runs, "summary": summary,
        "time_ratio_qosora_over_peft": q["seconds_median"] / p["seconds_median"],
        "rss_ratio_qosora_over_peft": q["peak_rss_bytes_median"] / p["peak_rss_bytes_median"],
        "qosora_prepare_rss_over_fp32_plus_output": q["prepare_only_peak_rss_bytes_median"] / (fp32_bytes + q["output_bytes"]),
    }
    print(f"time qosora/peft = {result['time_ratio_qosora_over_peft']:.2f}, "
          f"peak RSS qosora/peft = {result['rss_ratio_qosora_over_peft']:.2f}, "
          f"qosora prepare RSS / (fp32 + output) = {result['qosora_prepare_rss_over_fp32_plus_output']:.2f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
