"""Training-step benchmark on SmolLM2-135M (CPU): qosora SORSA / OSoRA vs PEFT QLoRA, plus the memory planner.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/qosora-heavy.lock python tools/bench_train.py [--rounds 2] [--steps 4]

Each configuration runs in its own process (so peak RSS is its own), alternating ours and the anchor's, round
after round; times are medians over rounds of the median step (the first step is a warm-up and not timed).
Peak RSS is VmHWM after the steps, reset once the model is loaded (so it is the training peak, not the load).
Same data (random ids, seq 256 x batch 4, loss on every token), rank 16, all seven projections, bf16 autocast
where the CPU has it, torch AdamW, no gradient checkpointing on either side.

Reported: s/step and peak RSS as ratios to PEFT QLoRA measured in the same run; the chunked cross-entropy's
saving (qosora SORSA with --full-logits); `qosora plan --device cpu` against the measured SORSA peak.
Needs `pip install peft` (benchmark only). Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SEQ, BATCH, RANK = 256, 4, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def worker(kind: str, prepared: str | None, steps: int) -> dict:
    """One configuration: load, then time `steps` + 1 optimizer steps. Runs in a child process."""
    import torch

    from qosora.fixtures import smollm2_dir
    from qosora.train.loop import bf16_supported

    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, SEQ))
    bf16 = bf16_supported(torch.device("cpu"))
    ac = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    if kind == "peft_qlora":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), quantization_config=q,
                                                     dtype=torch.bfloat16 if bf16 else torch.float32)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]

        def step_loss():
            with ac():
                return model(input_ids=ids, labels=ids).loss
        reg = None
    else:
        from qosora.artifact import load
        from qosora.layer import adapter_layers
        from qosora.train.data import Batch
        from qosora.train.loop import trainable_parameters
        from qosora.train.loss import causal_lm_loss
        from qosora.train.regularizer import add_regularizer_grad

        model = load(prepared, dtype=torch.bfloat16 if bf16 else torch.float32)
        params = list(trainable_parameters(model, autocast=bf16).values())
        layers = adapter_layers(model)
        batch = Batch(ids, torch.ones_like(ids), ids)
        chunked = not kind.endswith("full_logits")

        def step_loss():
            with ac():
                loss, n = causal_lm_loss(model, batch, chunked=chunked)
            return loss / n
        reg = (lambda: add_regularizer_grad(layers, 4e-4, 1e-4)) if kind.startswith("sorsa") else None
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_trainable = sum(p.numel() for p in params)
    _rss_reset()
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if reg is not None:
            reg()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"kind": kind, "s_per_step": statistics.median(times[1:]), "times": times, "losses": losses,
            "peak_rss": _rss_peak(), "trainable_params": n_trainable, "bf16": bf16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    p.add_argument("--work", default="/tmp/qosora-bench-train", help="where the prepared models are cached")
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "PREPARED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], None if args.worker[1] == "-" else args.worker[1], args.steps)))
        return

    from qosora.config import PrepareConfig
    from qosora.fixtures import smollm2_dir
    from qosora.preparation import prepare
    from qosora.train.plan import plan

    work = Path(args.work)
    prepared = {}
    for method in ("sorsa", "osora"):
        d = work / f"smollm2-{method}-r{RANK}"
        if not (d / "qosora_config.json").is_file():
            prepare(smollm2_dir(), d, PrepareConfig(method=method, rank=RANK), overwrite=True, progress=False)
        prepared[method] = str(d)
    runs = [("sorsa", prepared["sorsa"]), ("peft_qlora", "-"), ("osora", prepared["osora"]),
            ("sorsa_full_logits", prepared["sorsa"])]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    results: dict[str, list[dict]] = {k: [] for k, _ in runs}
    for r in range(args.rounds):
        for kind, prep in (runs if r % 2 == 0 else runs[::-1]):  # alternate the order round to round
            out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", kind, prep],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[kind].append(res)
            print(f"round {r} {kind:<18} {res['s_per_step']:.2f} s/step  peak RSS {res['peak_rss'] / 2**20:.0f} MiB",
                  flush=True)

    med = lambda kind, key: statistics.median(x[key] for x in results[kind])  # noqa: E731
    anchor_t, anchor_m = med("peft_qlora", "s_per_step"), med("peft_qlora", "peak_rss")
    predicted = plan(str(smollm2_dir()), "sorsa", RANK, SEQ, BATCH, device="cpu").total_bytes
    measured = med("sorsa", "peak_rss")
    summary = {
        "config": {"model": "SmolLM2-135M-Instruct", "seq_len": SEQ, "batch_size": BATCH, "rank": RANK,
                   "rounds": args.rounds, "timed_steps": args.steps, "bf16": results["sorsa"][0]["bf16"]},
        "peft_qlora": {"s_per_step": anchor_t, "peak_rss": anchor_m},
        **{k: {"s_per_step": med(k, "s_per_step"), "peak_rss": med(k, "peak_rss"),
               "time_ratio_vs_peft": med(k, "s_per_step") / anchor_t, "rss_ratio_vs_peft": med(k, "peak_rss") / anchor_m,
               "trainable_params": results[k][0]["trainable_params"]}
           for k in ("sorsa", "osora", "sorsa_full_logits")},
        "chunked_loss_saving_bytes": med("sorsa_full_logits", "peak_rss") - measured,
        "plan_sorsa": {"predicted_bytes": predicted, "measured_bytes": measured, "ratio": predicted / measured},
        "runs": results,
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"\n| config | s/step | x PEFT | peak RSS MiB | x PEFT |\n|---|---|---|---|---|")
    print(f"| PEFT QLoRA (anchor) | {anchor_t:.2f} | 1.00 | {anchor_m / 2**20:.0f} | 1.00 |")
    for k in ("sorsa", "osora", "sorsa_full_logits"):
        s = summary[k]
        print(f"| qosora {k} | {s['s_per_step']:.2f} | {s['time_ratio_vs_peft']:.2f} | {s['peak_rss'] / 2**20:.0f} | "
              f"{s['rss_ratio_vs_peft']:.2f} |")
    print(f"chunked loss saves {summary['chunked_loss_saving_bytes'] / 2**20:.0f} MiB of peak RSS")
    print(f"plan predicts {predicted / 2**20:.0f} MiB for SORSA, measured {measured / 2**20:.0f} MiB "
          f"(ratio {predicted / measured:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
