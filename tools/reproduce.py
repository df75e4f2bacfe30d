"""A small-scale reproduction of the papers' method comparison: QLoRA, PiSSA, SORSA and OSoRA on the same NF4 base
(SmolLM2-135M-Instruct), GSM8K, the same steps / sequence length / batch / rank, each method's learning rate swept.

    OMP_WAIT_POLICY=PASSIVE flock /tmp/qosora-heavy.lock python tools/reproduce.py     # resumable; ~2 h here
    python tools/reproduce.py --report                   # tables and the loss-curve PNG from the JSON alone

The study, cell by cell (each cell its own process, timed, peak RSS recorded; finished cells are cached in
--results and skipped on the next run, so it can span sessions; a changed plan refuses to mix with the old one):
  split    GSM8K train.jsonl shuffled with a fixed seed into test (--test), validation (--val) and train rows
           (written under --work; nothing of GSM8K is committed)
  prepare  each method's prepared directory (rank --rank; trainable parameters counted by `qosora inspect`)
  sweep    seed 0 at the method's default learning rate x --lr-factors; validation answer loss after --steps picks
           the learning rate; a best lr at an end of the sweep gets --extend more lrs beyond it
  seeds    the chosen learning rate again with the other --seeds
  deploy   per (method, seed) and deploy variant: `qosora export` (fp32 = the trained function up to float rounding;
           int4 = the CPU default; int4-calibrated for seed 0), then held-out answer loss and greedy exact match on
           the --test questions through the graph (qosora.run's Generator, `#### n` extraction as `qosora eval`)
  test     the held-out answer loss in PyTorch (qosora.load, fp32) of the first method's seed 0: the parity check
           of the fp32 graph's figure (PyTorch's NF4 forward on the CPU takes longer than the graph's)
Exact-match figures carry their binomial standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
METHODS = ("qlora", "pissa", "sorsa", "osora")
VARIANTS = {  # deploy variant -> `qosora export` flags (`--calibrate train`: the run's own training data)
    "fp32": ("--format", "fp32"),
    "int4": ("--format", "int4"),
    "int4-calibrated": ("--format", "int4", "--calibrate", "train", "--calibration-samples", "16",
                        "--calibration-seq-len", "256"),
}
SEED0_ONLY = ("int4-calibrated",)


def plan_from(args) -> dict:
    return {"model": "SmolLM2-135M-Instruct (the fixture: GGUF Q4_1 -> bf16)", "data": "GSM8K train.jsonl",
            "split_seed": args.split_seed, "test": args.test, "val": args.val, "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank,
            "lr_factors": args.lr_factors, "extend": args.extend, "seeds": args.seeds, "methods": args.methods,
            "max_new_tokens": args.max_new_tokens, "variants": args.variants}


# -- the driver -------------------------------------------------------------------------------------------------

class Study:
    """The results file is the cache: {"plan", "machine", "cells": {key: result}}, rewritten after every cell."""

    def __init__(self, args):
        self.args, self.work, self.path = args, Path(args.work), Path(args.results)
        self.plan = plan_from(args)
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if data and data.get("plan") != self.plan:
            raise SystemExit(f"{self.path} holds a study with another plan: pass --results NEW.json, or delete it "
                             f"to start over\n  stored: {data.get('plan')}\n  asked:  {self.plan}")
        self.cells: dict = data.get("cells", {})
        self.machine = data.get("machine", machine())

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"plan": self.plan, "machine": self.machine, "cells": self.cells}, indent=1))
        tmp.replace(self.path)

    def cell(self, key: str, *argv: str, needs: Path | None = None) -> dict:
        """The cached result of `key`, else run `reproduce.py --cell argv` and cache it. `needs`: a directory the
        cell leaves behind that later cells read; a cached cell whose directory is gone (a new machine) reruns."""
        if key in self.cells and (needs is None or needs.exists()):
            return self.cells[key]
        print(f"[reproduce] {key} ...", file=sys.stderr, flush=True)
        run = run_child([str(Path(__file__)), "--work", str(self.work), "--cell", *argv])
        self.cells[key] = {**run["child"], "wall_s": round(run["seconds"], 1),
                           "peak_rss_mb": round(run["peak_rss_bytes"] / 2**20)}
        self.save()
        return self.cells[key]

    def run(self) -> None:
        a = self.args
        split(self.work, a.split_seed, a.test, a.val)
        for m in a.methods:
            self.cell(f"prepare/{m}", "prepare", m, str(a.rank), needs=self.work / f"prepared-{m}")
        chosen = {}
        for m in a.methods:
            for lr in sweep_lrs(m, a.lr_factors):
                self.train(m, lr, a.seeds[0])
            while len(self.swept(m)) < len(a.lr_factors) + a.extend:  # best lr at an end: one step beyond it
                lrs = self.swept(m)
                best = self.chosen_lr(m)
                if best not in (lrs[0], lrs[-1]) or len(lrs) < 2:
                    break
                ratio = lrs[1] / lrs[0]
                self.train(m, float(f"{best * ratio if best == lrs[-1] else best / ratio:.3g}"), a.seeds[0])
            chosen[m] = self.chosen_lr(m)
        for m in a.methods:
            for seed in a.seeds[1:]:
                self.train(m, chosen[m], seed)
        for seed in a.seeds:  # every method's first seed before any second one
            for m in a.methods:
                run_dir = self.train(m, chosen[m], seed)
                if (m, seed) == (a.methods[0], a.seeds[0]):
                    self.cell(f"test/{m}/{chosen[m]:g}/{seed}", "test", str(run_dir), str(a.seq_len))
                later = seed != a.seeds[0]
                for v in sorted(a.variants, key=lambda v: v != "int4") if later else a.variants:  # cheapest first
                    if v in SEED0_ONLY and later:
                        continue
                    self.cell(f"deploy/{m}/{chosen[m]:g}/{seed}/{v}", "deploy", str(run_dir), v, str(a.seq_len),
                              str(a.max_new_tokens))

    def train(self, method: str, lr: float, seed: int) -> Path:
        a, run_dir = self.args, self.work / "runs" / f"{method}-lr{lr:g}-s{seed}"
        self.cell(f"train/{method}/{lr:g}/{seed}", "train", method, repr(lr), str(seed), str(a.steps),
                  str(a.batch_size), str(a.seq_len), needs=run_dir / "qosora_config.json")
        return run_dir

    def swept(self, method: str) -> list[float]:
        """The learning rates trained with the first seed so far, ascending."""
        seed = str(self.args.seeds[0])
        return sorted(float(k.split("/")[2]) for k in self.cells
                      if k.startswith(f"train/{method}/") and k.split("/")[3] == seed)

    def chosen_lr(self, method: str) -> float:
        """The swept learning rate with the lowest validation loss."""
        seed = self.args.seeds[0]
        return min(self.swept(method), key=lambda lr: self.cells[f"train/{method}/{lr:g}/{seed}"]["final_eval_loss"])


def sweep_lrs(method: str, factors: list[float]) -> list[float]:
    from qosora.methods import METHOD_SPECS

    return [float(f"{METHOD_SPECS[method].default_lr * f:.3g}") for f in factors]


def split(work: Path, seed: int, n_test: int, n_val: int, source: Path | None = None) -> None:
    """test / val / train JSONL under work (from `source`, default GSM8K's train file), disjoint; skipped when
    already written with this seed and sizes."""
    source = source or GSM8K
    marker = work / "split.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"seed": seed, "test": n_test, "val": n_val}:
        return
    rows = [l for l in source.read_text().splitlines() if l.strip()]
    if len(rows) < n_test + n_val + 1:
        raise SystemExit(f"{source} has {len(rows)} rows: too few for {n_test} test + {n_val} validation rows")
    random.Random(seed).shuffle(rows)
    work.mkdir(parents=True, exist_ok=True)
    parts = {"test": rows[:n_test], "val": rows[n_test:n_test + n_val], "train": rows[n_test + n_val:]}
    for name, part in parts.items():
        (work / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    marker.write_text(json.dumps({"seed": seed, "test": n_test, "val": n_val}))


# -- the cells (each in its own process) ---------------------------------------------------------------------

def cell_prepare(work: Path, method: str, rank: str) -> dict:
    from qosora.config import PrepareConfig
    from qosora.fixtures import smollm2_dir
    from qosora.inspection import inspect
    from qosora.preparation import prepare

    out = work / f"prepared-{method}"
    prepare(smollm2_dir(), out, PrepareConfig(method=method, rank=int(rank)), overwrite=True, progress=False)
    report = inspect(out)
    return {"trainable_params": report["trainable_params"]}


def cell_train(work: Path, method: str, lr: str, seed: str, steps: str, batch: str, seq_len: str) -> dict:
    from qosora.train.loop import TrainConfig, finetune

    run_dir = work / "runs" / f"{method}-lr{float(lr):g}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(data=str(work / "train.jsonl"), eval_data=str(work / "val.jsonl"), out=str(run_dir),
                         steps=int(steps), batch_size=int(batch), seq_len=int(seq_len), lr=float(lr), seed=int(seed))
    res = finetune(work / f"prepared-{method}", config, progress=False).to_dict()
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    curve = [r["loss"] for r in rows if "loss" in r]
    return {**{k: res[k] for k in ("first_loss", "final_loss", "initial_eval_loss", "final_eval_loss",
                                   "orthonormality", "tokens_per_s", "seconds")}, "loss_curve": curve}


def _test_examples(work: Path, run_dir: str, seq_len: int):
    """The run's tokenizer and the test rows encoded as training encodes them (prompt masked, answer + EOS)."""
    from qosora.loading import load_tokenizer
    from qosora.train.data import load_examples

    tok = load_tokenizer(run_dir)
    return tok, load_examples(work / "test.jsonl", tok, seq_len)


def cell_test(work: Path, run_dir: str, seq_len: str) -> dict:
    import torch

    import qosora
    from qosora.evaluation import eval_loss

    tok, examples = _test_examples(work, run_dir, int(seq_len))
    model = qosora.load(run_dir, dtype=torch.float32, compute_dtype=torch.float32)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    loss, tokens = eval_loss(model, examples, pad, batch_size=8)
    return {"test_loss": loss, "test_tokens": tokens}


def cell_deploy(work: Path, run_dir: str, variant: str, seq_len: str, max_new_tokens: str) -> dict:
    """Export, then the held-out answer loss and greedy exact match through the graph (no torch in the loop)."""
    import subprocess
    import time

    import numpy as np

    from qosora.evaluation import extract_answer
    from qosora.run import GenerationOptions, Generator
    from qosora.train.data import IGNORE

    out = work / "onnx" / f"{Path(run_dir).name}-{variant}"
    flags = list(VARIANTS[variant])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qosora", "export", run_dir, "--onnx", str(out), "--overwrite",
                    "--no-check", "--json", *flags], check=True, capture_output=True)
    export_s = time.perf_counter() - start
    onnx_mb = sum(f.stat().st_size for f in out.glob("model.onnx*")) / 2**20

    tok, examples = _test_examples(work, run_dir, int(seq_len))
    threads = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else None
    gen = Generator(out, threads=threads)
    nll, n = 0.0, 0
    for ex in examples:  # teacher-forced answer loss, one example at a time (no padding to account for)
        ids = np.asarray([ex.input_ids])
        logits, _ = gen.lm.forward(ids, np.ones_like(ids))
        lp = logits[0, :-1].astype(np.float64)
        lp -= lp.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        labels = np.asarray(ex.labels[1:])
        keep = labels != IGNORE
        nll -= lp[np.arange(len(labels))[keep], labels[keep]].sum()
        n += int(keep.sum())

    records = [json.loads(l) for l in (work / "test.jsonl").read_text().splitlines() if l.strip()]
    prompts = [[t for t, lab in zip(ex.input_ids, ex.labels) if lab == IGNORE] for ex in examples]  # the prompts
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length
    options = GenerationOptions(max_new_tokens=int(max_new_tokens), stop=("\nQuestion:",))
    start = time.perf_counter()
    results = gen.generate([prompts[i] for i in order], options, batch_size=16)
    generate_s = time.perf_counter() - start
    texts = [""] * len(order)
    for i, r in zip(order, results):
        texts[i] = r.text
    correct = [extract_answer(t) is not None and extract_answer(t) == extract_answer(r["answer"])
               for t, r in zip(texts, records)]
    return {"variant": variant, "export_s": round(export_s, 1), "onnx_mb": round(onnx_mb, 1),
            "test_loss": nll / n, "test_tokens": n, "exact_match": sum(correct) / len(correct),
            "questions": len(correct), "correct": [int(c) for c in correct], "generate_s": round(generate_s, 1),
            "new_tokens": sum(len(r.new_tokens) for r in results), "sample_output": texts[0][:400]}


CELLS = {"prepare": cell_prepare, "train": cell_train, "test": cell_test, "deploy": cell_deploy}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(REPO / "bench" / "reproduce.json"))
    ap.add_argument("--work", default="/tmp/qosora-reproduce")
    ap.add_argument("--split-seed", type=int, default=1234)
    ap.add_argument("--test", type=int, default=150, help="held-out questions (exact match and answer loss)")
    ap.add_argument("--val", type=int, default=48, help="validation rows (picks the learning rate)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr-factors", type=lambda s: [float(x) for x in s.split(",")], default=[1 / 3, 1.0, 3.0])
    ap.add_argument("--extend", type=int, default=2,
                    help="when the best lr is at an end of the sweep, train this many more steps beyond it")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--report", action="store_true", help="only print the tables and write the plot from --results")
    ap.add_argument("--plot", default=str(REPO / "bench" / "reproduce_loss.png"))
    ap.add_argument("--cell", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.cell:
        print(json.dumps(CELLS[args.cell[0]](Path(args.work), *args.cell[1:])))
        return 0
    from _reproduce_report import report

    if not args.report:
        if not GSM8K.is_file():
            raise SystemExit(f"{GSM8K} not found: the study reads GSM8K's train.jsonl from ../shared/data")
        Study(args).run()
    report(json.loads(Path(args.results).read_text()), Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
