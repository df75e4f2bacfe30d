"""How long the README's main command takes: `qosora demo`, quiet and with another process keeping one core busy.

    python tools/bench_demo.py --out bench/demo.json [--avx2]

Each run is a fresh `qosora demo --json` child with the environment a user has (no OMP_* variables: qosora picks
the wait policy and thread count itself). `--avx2` adds runs with PyTorch pinned to its AVX2 kernels
(ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2), which is how an AVX2-only CPU computes bf16: qosora then trains
in fp32. onnxruntime has no such switch, so the export and generate parts of those runs still use this CPU's ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, write_json  # noqa: E402

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def demo(work: Path, env_extra: dict, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update(env_extra)
    out = work / "demo"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qosora", "demo", "--out", str(out), "--steps", str(steps), "--json"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    summary = json.loads(proc.stdout)
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_s = [r["tokens_per_s"] for r in rows if "loss" in r]
    compute = next((l for l in proc.stderr.splitlines() if "computing in" in l), "")
    return {"wall_s": round(wall, 1), "prepare_and_train_s": round(summary["prepare_and_train_s"], 1),
            "export_s": round(summary["export_s"], 1), "median_train_tokens_per_s": round(statistics.median(tokens_per_s)),
            "final_eval_loss": summary["final_eval_loss"], "compute": compute.strip(),
            "env": env_extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/demo.json")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--avx2", action="store_true")
    args = ap.parse_args()
    results = {"machine": machine(), "steps": args.steps, "runs": {}}
    variants = [("quiet", {}, False), ("one core busy", {}, True)]
    if args.avx2:
        variants += [("quiet, AVX2 kernels", AVX2, False), ("one core busy, AVX2 kernels", AVX2, True)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, env, loaded in variants:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if loaded else None
            try:
                time.sleep(0.5 if loaded else 0)
                results["runs"][name] = r = demo(Path(tmp), env, args.steps)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            print(f"{name:<30} {r['wall_s']:7.1f} s   (prepare+train {r['prepare_and_train_s']:.1f} s, "
                  f"export {r['export_s']:.1f} s)  {r['compute']}", flush=True)
    runs = results["runs"]
    for base in [n for n in runs if not n.startswith("one core busy")]:
        loaded = "one core busy" + base[len("quiet"):]
        if loaded in runs:
            results[f"loaded / quiet{base[len('quiet'):]}"] = round(runs[loaded]["wall_s"] / runs[base]["wall_s"], 2)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
