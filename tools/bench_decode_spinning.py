"""Decode speed with onnxruntime's worker threads spinning vs sleeping between ops, on graphs bench_export.py wrote.

qosora keeps spinning off where PyTorch or a tokenizer share the process (the parity check, training-time eval) and
turns it on in `qosora generate` (`--no-spinning` to opt out). This measures what that is worth: each run is a fresh
process (64-token prompt, 128 new tokens, batch 1), variants alternate inside each repeat, medians are reported.

    python tools/bench_export.py --out bench/export.json          # writes the graphs under /tmp/qosora-bench-export
    python tools/bench_decode_spinning.py --out bench/decode_spinning.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CODE = """
import json
from qosora.run.decoder import OnnxCausalLM, StepTimes
lm = OnnxCausalLM({model_dir!r}, threads={threads}, spinning={spinning})
prompt = [(7 * i + 100) % 40000 for i in range(64)]
lm.generate(prompt[:8], 4)  # warm-up
t = StepTimes()
lm.generate(prompt, 128, times=t)
print(json.dumps({{"decode_tps": t.decode_tokens_per_s, "prefill_ms": t.prefill_s * 1e3}}))
"""


def run(model_dir: Path, threads: int, spinning: bool) -> dict:
    code = CODE.format(model_dir=str(model_dir), threads=threads, spinning=spinning)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qosora-bench-export"))
    ap.add_argument("--graphs", default="fp32,int4,int4-asym")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/decode_spinning.json"))
    args = ap.parse_args()
    graphs, threads = args.graphs.split(","), [int(t) for t in args.threads.split(",")]
    runs: dict[str, list] = {}
    for _ in range(args.repeats):
        for g in graphs:
            for t in threads:
                for spinning in (False, True):
                    runs.setdefault(f"{g}|{t}|{spinning}", []).append(run(args.work / g, t, spinning))
    results = {}
    print("graph        threads   sleeping tok/s   spinning tok/s   spinning / sleeping")
    for g in graphs:
        for t in threads:
            off, on = (statistics.median(r["decode_tps"] for r in runs[f"{g}|{t}|{s}"]) for s in (False, True))
            results[f"{g}, {t} threads"] = {"sleeping_tps": off, "spinning_tps": on, "ratio": on / off}
            print(f"{g:<12} {t:>7}   {off:>14.1f}   {on:>14.1f}   {on / off:>19.2f}")
    args.out.write_text(json.dumps({"benchmark": "decode_spinning", "work": str(args.work),
                                    "repeats": args.repeats, "results": results, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
