"""Training-step benchmark on SmolLM2-135M (CPU): qosora SORSA / OSoRA vs PEFT QLoRA, plus the memory planner.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/qosora-heavy.lock python tools/bench_train.py [--steps 8]

Time: PEFT QLoRA, SORSA and OSoRA live in one process and take one optimizer step each in turn (the order rotates
every turn); s/step is the median over the turns after a warm-up turn, so every comparison is paired under the
same load of this shared machine (separate processes run minutes apart differed by 30 % on the same config).
Memory: each configuration alone in its own process; peak RSS is VmHWM after the steps, reset once the model is
loaded (so it is the training peak, not the load).
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

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine  # noqa: E402

SEQ, BATCH, RANK = 256, 4, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def build(kind: str, prepared: str | None):
    """Load one configuration; return (one_optimizer_step() -> loss, trainable parameter count, bf16)."""
    import torch

    from qosora.fixtures import smollm2_dir
    from qosora.precision import bf16_supported

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
        from qosora.loading import load
        from qosora.layer import adapter_layers
        from qosora.train.data import Batch
        from qosora.train.params import trainable_parameters
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

    def optimizer_step() -> float:
        loss = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if reg is not None:
            reg()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return optimizer_step, sum(p.numel() for p in params), bf16


def memory_worker(kind: str, prepared: str | None, steps: int) -> dict:
    """Peak RSS of `steps` optimizer steps of one configuration, alone in its process."""
    optimizer_step, n_trainable, bf16 = build(kind, prepared)
    _rss_reset()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer_step()
        times.append(time.perf_counter() - t0)
    return {"kind": kind, "peak_rss": _rss_peak(), "times": times, "trainable_params": n_trainable, "bf16": bf16}


def timing_worker(kinds: list[tuple[str, str | None]], steps: int) -> dict:
    """All configurations in one process, one optimizer step each in turn (order rotating), `steps` turns after
    a warm-up turn: every comparison is paired, under the same machine load."""
    built = {k: build(k, p)[0] for k, p in kinds}
    names = list(built)
    times: dict[str, list[float]] = {k: [] for k in names}
    for turn in range(steps + 1):
        order = names[turn % len(names):] + names[:turn % len(names)]
        for k in order:
            t0 = time.perf_counter()
            built[k]()
            if turn:
                times[k].append(time.perf_counter() - t0)
    return {"times": times, "s_per_step": {k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed turns (each kind one step a turn, after a warm-up)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps of each memory run")
    p.add_argument("--work", default="/tmp/qosora-bench-train", help="where the prepared models are cached")
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.worker[0] == "timing":
            kinds = [(k, None if v == "-" else v) for k, v in zip(args.worker[1::2], args.worker[2::2])]
            print(json.dumps(timing_worker(kinds, args.steps)))
        else:
            kind, prep = args.worker[1], args.worker[2]
            print(json.dumps(memory_worker(kind, None if prep == "-" else prep, args.memory_steps)))
        return

    from qosora.config import PrepareConfig
    from qosora.fixtures import smollm2_dir
    from qosora.preparation import prepare
    from qosora.planning import plan

    work = Path(args.work)
    prepared = {}
    for method in ("sorsa", "osora"):
        d = work / f"smollm2-{method}-r{RANK}"
        if not (d / "qosora_config.json").is_file():
            prepare(smollm2_dir(), d, PrepareConfig(method=method, rank=RANK), overwrite=True, progress=False)
        prepared[method] = str(d)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")

    def child(*worker_args: str) -> dict:
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--memory-steps",
                              str(args.memory_steps), "--worker", *worker_args], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{worker_args} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    timed = [("peft_qlora", "-"), ("sorsa", prepared["sorsa"]), ("osora", prepared["osora"])]
    timing = child("timing", *[x for kv in timed for x in kv])
    for k, v in timing["s_per_step"].items():
        print(f"time   {k:<18} {v:.2f} s/step (median of {args.steps} paired turns)", flush=True)
    memory = {}
    for kind, prep in [("peft_qlora", "-"), ("sorsa", prepared["sorsa"]), ("osora", prepared["osora"]),
                       ("sorsa_full_logits", prepared["sorsa"])]:
        memory[kind] = child("memory", kind, prep)
        print(f"memory {kind:<18} peak RSS {memory[kind]['peak_rss'] / 2**20:.0f} MiB", flush=True)

    anchor_t, anchor_m = timing["s_per_step"]["peft_qlora"], memory["peft_qlora"]["peak_rss"]
    predicted = plan(str(smollm2_dir()), "sorsa", RANK, SEQ, BATCH, device="cpu").total_bytes
    measured = memory["sorsa"]["peak_rss"]
    summary = {
        "machine": machine(),
        "config": {"model": "SmolLM2-135M-Instruct", "seq_len": SEQ, "batch_size": BATCH, "rank": RANK,
                   "timed_turns": args.steps, "bf16": memory["sorsa"]["bf16"]},
        "peft_qlora": {"s_per_step": anchor_t, "peak_rss": anchor_m},
        **{k: {"s_per_step": timing["s_per_step"].get(k), "peak_rss": memory[k]["peak_rss"],
               "time_ratio_vs_peft": timing["s_per_step"][k] / anchor_t if k in timing["s_per_step"] else None,
               "rss_ratio_vs_peft": memory[k]["peak_rss"] / anchor_m,
               "trainable_params": memory[k]["trainable_params"]}
           for k in ("sorsa", "osora", "sorsa_full_logits")},
        "chunked_loss_saving_bytes": memory["sorsa_full_logits"]["peak_rss"] - measured,
        "plan_sorsa": {"predicted_bytes": predicted, "measured_bytes": measured, "ratio": predicted / measured},
        "timing": timing, "memory": memory,
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print("\n| config | s/step | x PEFT | peak RSS MiB | x PEFT |\n|---|---|---|---|---|")
    print(f"| PEFT QLoRA (anchor) | {anchor_t:.2f} | 1.00 | {anchor_m / 2**20:.0f} | 1.00 |")
    for k in ("sorsa", "osora", "sorsa_full_logits"):
        s = summary[k]
        t = f"{s['s_per_step']:.2f} | {s['time_ratio_vs_peft']:.2f}" if s["s_per_step"] else "- | -"
        print(f"| qosora {k} | {t} | {s['peak_rss'] / 2**20:.0f} | {s['rss_ratio_vs_peft']:.2f} |")
    print(f"chunked loss saves {summary['chunked_loss_saving_bytes'] / 2**20:.0f} MiB of peak RSS")
    print(f"plan predicts {predicted / 2**20:.0f} MiB for SORSA, measured {measured / 2**20:.0f} MiB "
          f"(ratio {predicted / measured:.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
