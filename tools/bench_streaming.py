"""Streaming: peak RSS of `qosora prepare`, `merge` and `export` on a synthetic ~1.1B Llama vs its fp32 size.

    python tools/bench_streaming.py --model /tmp/llama-1b --out bench/streaming.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine, run_child, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/qosora-llama-1b")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", default="bench/streaming.json")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        subprocess.run([sys.executable, str(Path(__file__).parent / "make_synthetic_llama.py"), args.model], check=True)
    fp32 = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        prep = run_child(["-m", "qosora", "prepare", args.model, "--rank", str(args.rank), "--out", str(tmp / "p"),
                          "--json"])
        merge = run_child(["-m", "qosora", "merge", str(tmp / "p"), "--out", str(tmp / "m"), "--dtype", "bfloat16",
                           "--json"])
        export = run_child(["-m", "qosora", "export", str(tmp / "p"), "--onnx", str(tmp / "onnx"), "--format", "int4",
                            "--no-check", "--json"])
        out_bytes = sum(f.stat().st_size for f in (tmp / "p").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "benchmark": "streaming", "model": args.model, "fp32_checkpoint_bytes": fp32, "machine": machine(),
        "prepare": {**prep, "rss_over_fp32": prep["peak_rss_bytes"] / fp32, "output_bytes": out_bytes},
        "merge": {**merge, "rss_over_fp32": merge["peak_rss_bytes"] / fp32},
        "export_int4": {**export, "rss_over_fp32": export["peak_rss_bytes"] / fp32},
    }
    print(json.dumps({k: result[k]["rss_over_fp32"] for k in ("prepare", "merge", "export_int4")}))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
