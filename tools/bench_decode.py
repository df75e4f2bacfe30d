"""Decode and prefill speed of `qosora generate` against onnxruntime-genai, and the perplexity each int4 graph costs.

One model (SmolLM2-135M-Instruct by default), two int4 CPU graphs of it:
    ours      `qosora export MODEL --onnx ours` with the default options (the CPU form)
    builder   onnxruntime-genai's model builder, `-p int4 -e cpu` (its own RTN int4 graph; the anchor)
and two runtimes: qosora's (`qosora bench`, the code path of `qosora generate`) and onnxruntime-genai's Generator
(`qosora bench --against-genai` runs it on the same directory in the same process, after ours). Every cell is a fresh
`qosora bench` process; graphs and thread counts alternate inside each repeat; medians over repeats.

    python tools/bench_decode.py --out bench/decode.json          # ~6 min on 2 cores

Perplexity: 4096 tokens of GSM8K text (the tail of the train split), PyTorch fp32 of the same model as the anchor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QOSORA = [sys.executable, "-m", "qosora.cli"]


def build(model: Path, work: Path, genai_python: str) -> dict[str, Path]:
    dirs = {"ours": work / "ours-int4", "builder": work / "genai-int4"}
    if not (dirs["ours"] / "model.onnx").is_file():
        subprocess.run([*QOSORA, "export", str(model), "--onnx", str(dirs["ours"]), "--no-check", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    if not (dirs["builder"] / "model.onnx").is_file():
        shutil.rmtree(dirs["builder"], ignore_errors=True)
        with open(work / "builder.log", "w") as log:  # the builder prints a progress line per tensor
            subprocess.run([genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o",
                            str(dirs["builder"]), "-p", "int4", "-e", "cpu"], check=True, stdout=log, stderr=log)
    return dirs


def bench(directory: Path, threads: int, args) -> dict:
    cmd = [*QOSORA, "bench", str(directory), "--prompt-len", args.prompt_len, "--gen-len", str(args.gen_len),
           "--batch-size", args.batch_size, "--repeats", "1", "--threads", str(threads), "--against-genai", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}).stdout
    return json.loads(out)


def perplexities(model: Path, dirs: dict[str, Path], n_tokens: int) -> dict:
    from bench_export import eval_tokens, onnx_ppl, torch_ppl

    import torch

    from qosora.loading import load_hf

    ids = eval_tokens(model, n_tokens)
    torch.set_num_threads(os.cpu_count() or 1)
    ref = torch_ppl(load_hf(model, dtype=torch.float32).eval(), ids, 512)
    values = {"pytorch fp32": ref, **{name: onnx_ppl(d, ids, 512) for name, d in dirs.items()}}
    return {"tokens": len(ids), "values": values, "increase": {k: v - ref for k, v in values.items()}}


def summarize(cells: list[dict]) -> list[dict]:
    """Medians per (threads, prompt_len, batch) of: qosora on ours, genai on builder (the anchor), genai on ours."""
    rows: dict[tuple, dict[str, list]] = {}
    for c in cells:
        for qp, gp in zip(c["report"]["points"], c["report"]["genai_points"]):
            key = (c["threads"], qp["prompt_len"], qp["batch_size"])
            r = rows.setdefault(key, {})
            for engine, p in (("qosora", qp), ("genai", gp)):
                r.setdefault(f"{engine} on {c['graph']}", []).append(p)
    out = []
    for (threads, prompt_len, batch), r in sorted(rows.items()):
        med = {k: {"decode_tps": statistics.median(p["decode_tokens_per_s"] for p in v),
                   "decode_tps_total": statistics.median(p["decode_tokens_per_s_total"] for p in v),
                   "prefill_ms": statistics.median(p["prefill_ms"] for p in v), "n": len(v)} for k, v in r.items()}
        anchor = med["genai on builder"]
        out.append({"threads": threads, "prompt_len": prompt_len, "batch_size": batch, "medians": med,
                    "decode_vs_anchor": {k: m["decode_tps"] / anchor["decode_tps"] for k, m in med.items()},
                    "prefill_vs_anchor": {k: m["prefill_ms"] / anchor["prefill_ms"] for k, m in med.items()}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/qosora/smollm2-135m-instruct")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qosora-bench-decode"))
    ap.add_argument("--genai-python", default=sys.executable, help="python with onnxruntime-genai's builder deps")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-len", default="64,512")
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--batch-size", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=REPO / "bench/decode.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dirs = build(args.model, args.work, args.genai_python)
    cells = []
    for rep in range(args.repeats):
        for threads in (int(t) for t in args.threads.split(",")):
            for graph, directory in dirs.items():
                print(f"repeat {rep + 1}/{args.repeats}: {graph}, {threads} thread(s)", file=sys.stderr)
                cells.append({"repeat": rep, "threads": threads, "graph": graph,
                              "report": bench(directory, threads, args)})
    print("perplexity ...", file=sys.stderr)
    result = {"benchmark": "decode", "model": str(args.model), "machine": machine(), "graphs": {k: str(v) for k, v
              in dirs.items()}, "settings": {k: str(v) for k, v in vars(args).items()},
              "summary": summarize(cells), "perplexity": perplexities(args.model, dirs, args.ppl_tokens),
              "cells": cells}
    write_json(args.out, result)
    print(table(result))
    return 0


def table(result: dict) -> str:
    lines = ["| threads | prompt | batch | qosora on ours | genai on builder (anchor) | genai on ours | "
             "prefill ms: qosora on ours / anchor |", "|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        m, v = r["medians"], r["decode_vs_anchor"]
        lines.append(f"| {r['threads']} | {r['prompt_len']} | {r['batch_size']} | "
                     f"{m['qosora on ours']['decode_tps']:.1f} ({v['qosora on ours']:.2f}x) | "
                     f"{m['genai on builder']['decode_tps']:.1f} | "
                     f"{m['genai on ours']['decode_tps']:.1f} ({v['genai on ours']:.2f}x) | "
                     f"{m['qosora on ours']['prefill_ms']:.0f} / {m['genai on builder']['prefill_ms']:.0f} |")
    p = result["perplexity"]
    lines.append("")
    lines.append(f"perplexity on {p['tokens']} tokens: " + ", ".join(
        f"{k} {v:.3f} ({p['increase'][k]:+.3f})" for k, v in p["values"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
