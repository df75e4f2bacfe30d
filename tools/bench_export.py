"""Benchmark the ONNX export on SmolLM2-135M (prepared rank 64): fidelity, speed, export cost. Prints tables, writes JSON.

    flock /tmp/qosora-heavy.lock env OMP_WAIT_POLICY=PASSIVE python tools/bench_export.py --out bench_export.json
    ... --calibrate --skip-speed --block-size 64 --model ROTATED_COPY --out bench/export_calibrated_rot_bs64.json

What it measures, every figure against an anchor from the same run:
  1. Perplexity on held-out text (GSM8K train questions+answers if ../shared/data is there, else built-in prompts)
     of the trained PyTorch model (qosora.load), our fp32 graph, our int4 (linears only, same block size) vs
     onnxruntime's own int4 quantizers (matmul_nbits_quantizer: RTN symmetric, RTN asymmetric, HQQ) applied to our
     fp32 graph, and our --keep-principal.
  2. Greedy agreement over 64 new tokens on 5 prompts: nf4 (and int4) vs the PyTorch model.
  3. Decode tokens/s and prefill ms (64-token prompt, 128 new tokens, batch 1, 1 and 2 threads, median of runs
     alternated between variants): fp32 vs our int4 (+ int4 lm_head/embedding) vs ORT-quantized int4.
  With --calibrate: our `--calibrate` exports (GPTQ on the int4 / trt-int4 grids) beside onnxruntime's GPTQ
     (on the same token windows) and k-quant, all on held-out text disjoint from the calibration rows.
  4. Export wall time and peak RSS (each export in its own process) vs the fp32 checkpoint size, and with
     --optimum-python, optimum's export of the merged model + ORT's int4 quantizer (a separate venv: optimum-onnx
     pins transformers < 4.58; tools/setup_optimum_env.sh makes one).
Caveat: SmolLM2's weights in this fixture went through GGUF Q4_1 once; compare methods on the same weights only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def run_timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd; return (wall s, peak RSS MB of that process, stdout)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a chatty child cannot block on it
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            err.seek(0)
            last = (err.read().strip().splitlines() or [""])[-1]
            raise RuntimeError(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)})\n{last}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, out


RESUME = False  # --resume: reuse a row whose graph and result record exist from an earlier run of the same command


def _timed_row(out: Path, cmd: list[str], row) -> dict:
    """Run cmd (it writes out), then row(wall, rss, stdout) -> the table row; recorded beside out for --resume."""
    record = out.parent / f"{out.name}.row.json"
    if RESUME and out.is_dir() and record.is_file():
        saved = json.loads(record.read_text())
        if saved["cmd"] == cmd:
            return saved["row"]
    shutil.rmtree(out, ignore_errors=True)
    (out.parent / f"{out.name}.ppl.json").unlink(missing_ok=True)  # measured on the graph being replaced
    result = row(*run_timed(cmd))
    record.write_text(json.dumps({"cmd": cmd, "row": result}))
    return result


def graph_ppl(model_dir: Path, ids: list[int], chunk: int) -> float:
    """onnx_ppl, recorded beside the graph; --resume reuses it for the same tokens."""
    record = model_dir.parent / f"{model_dir.name}.ppl.json"
    key = {"tokens": ids, "chunk": chunk}
    if RESUME and record.is_file() and json.loads(record.read_text())["key"] == key:
        return json.loads(record.read_text())["ppl"]
    ppl = onnx_ppl(model_dir, ids, chunk)
    record.write_text(json.dumps({"key": key, "ppl": ppl}))
    return ppl


def export(src: Path, out: Path, fmt: str, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "qosora", "export", str(src), "--onnx", str(out), "--format", fmt, "--no-check",
           "--json", *extra]

    def row(wall, rss, stdout):
        report = json.loads(stdout)
        return {"dir": str(out), "wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1),
                "onnx_mb": round(report["graph"]["onnx_bytes"] / 2**20, 1),
                "mean_rel_error": report["requantization"]["mean_rel_error"]}
    return _timed_row(out, cmd, row)


def ort_quantize(fp32_dir: Path, out: Path, kind: str, block_size: int, windows: Path | None = None) -> dict:
    """One of onnxruntime's quantizers (tools/_ort_quant.py) on our fp32 graph, in its own process; a quantizer that
    fails (onnxruntime 1.32's k-quant at block 64) is a row saying so, not the end of the run."""
    cmd = [sys.executable, str(REPO / "tools" / "_ort_quant.py"), str(fp32_dir), str(out), "--kind", kind,
           "--block-size", str(block_size), *(["--windows", str(windows)] if windows else [])]

    def row(wall, rss, stdout):
        (result,) = [json.loads(l) for l in stdout.splitlines() if l.startswith('{"kind"')]
        return {"dir": str(out), "wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1),
                "quantizer_s": round(result["seconds"], 2),
                "onnx_mb": round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 2**20, 1)}
    try:
        return _timed_row(out, cmd, row)
    except RuntimeError as e:
        return {"dir": str(out), "failed": str(e).splitlines()[-1][-300:]}


def calibration_windows(calibrate: str, hf: Path, work: Path, samples: int, seq_len: int) -> tuple[Path, Path]:
    """The calibration JSONL (`gsm8k`: the first 2000 rows of the GSM8K train file, disjoint from the last 200 that
    perplexity reads) and the token windows our --calibrate draws from it (seed 0), saved for onnxruntime's GPTQ."""
    from transformers import AutoTokenizer

    from qosora.export.calibration import load_calibration_tokens

    if calibrate == "gsm8k":
        rows = GSM8K.read_text().splitlines()
        assert len(rows) >= 2200, "calibration and perplexity rows would overlap"
        path = work / "calib.jsonl"
        path.write_text("\n".join(rows[:2000]) + "\n")
    else:
        path = Path(calibrate)
    windows = load_calibration_tokens(path, AutoTokenizer.from_pretrained(hf), samples, seq_len, seed=0)
    npy = work / "calib_windows.npy"
    np.save(npy, windows.numpy())
    return path, npy


def optimum_anchor(python: Path, src: Path, work: Path, block_size: int) -> dict:
    """optimum's ONNX export of the merged fp32 model (validation off, as our exports run with --no-check), then
    onnxruntime's int4 quantizer (RTN asymmetric, its fastest, and HQQ) on that graph: the route a user takes
    without qosora. The merge itself (qosora merge) is timed separately and not added to the anchor."""
    merged = work / "merged-fp32"
    shutil.rmtree(merged, ignore_errors=True)
    merge_s, _, _ = run_timed([sys.executable, "-m", "qosora", "merge", str(src), "--out", str(merged),
                               "--dtype", "float32"])
    out = work / "optimum-fp32"
    shutil.rmtree(out, ignore_errors=True)
    code = ("from optimum.exporters.onnx import main_export; "
            f"main_export({str(merged)!r}, output={str(out)!r}, task='text-generation-with-past', do_validation=False)")
    wall, rss, _ = run_timed([str(python), "-c", code])
    result = {"merge_s": round(merge_s, 2), "optimum_export_s": round(wall, 2), "optimum_peak_rss_mb": round(rss, 1)}
    for kind in ("rtn-asym", "hqq"):
        q = ort_quantize(out, work / f"optimum-{kind}", kind, block_size)
        result[f"ort_{kind}_s"] = q["wall_s"]
        result[f"ort_{kind}_peak_rss_mb"] = q["peak_rss_mb"]
        result[f"optimum_plus_{kind}_s"] = round(wall + q["wall_s"], 2)
    return result


LIN = ("--no-quantize-lm-head", "--no-quantize-embedding")  # what onnxruntime's quantizers touch
CALIBRATED = [  # (row, --format, flags): our --calibrate exports
    ("int4-linears-asym-gptq", "int4", ("--int4-scheme", "asym", *LIN)),  # like for like with onnxruntime's rows
    ("int4-linears-hqq-gptq", "int4", ("--int4-scheme", "hqq", *LIN)),
    ("int4-linears-asym-ls-float-gptq", "int4", ("--int4-scheme", "asym-ls-float", *LIN)),
    ("int4-linears-keep-principal-gptq", "int4", ("--keep-principal", "--int4-scheme", "hqq", *LIN)),
    # --calibration-grid static: GPTQ on each block's data-free grid
    ("int4-linears-asym-ls-float-static-gptq", "int4", ("--int4-scheme", "asym-ls-float", "--calibration-grid",
                                                        "static", *LIN)),
    ("int4-linears-keep-principal-static-gptq", "int4", ("--keep-principal", "--int4-scheme", "hqq",
                                                         "--calibration-grid", "static", *LIN)),
    ("int4-gptq", "int4", ()),  # the CPU defaults, lm_head and embedding int4 too
    ("int4-hqq-gptq", "int4", ("--int4-scheme", "hqq")),
    ("trt-int4-gptq", "trt-int4", ("--int4-scheme", "sym")),  # absmax / 7; sym-search is the default now
    ("trt-int4-sym-search-gptq", "trt-int4", ("--int4-scheme", "sym-search")),
    ("trt-int4-keep-principal-gptq", "trt-int4", ("--keep-principal",)),
    ("trt-int4-linears-gptq", "trt-int4", LIN),
]


def eval_tokens(src: Path, n_tokens: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    if GSM8K.is_file():
        texts = []
        for line in GSM8K.read_text().splitlines()[-200:]:  # the tail: not what a demo fine-tune starts with
            row = json.loads(line)
            texts.append(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n")
        text = "".join(texts)
    else:
        from qosora.export.check import DEFAULT_PROMPTS

        text = "\n\n".join(DEFAULT_PROMPTS) * 20
    return tok.encode(text).ids[:n_tokens]


def onnx_ppl(model_dir: Path, ids: list[int], chunk: int) -> float:
    from qosora.run import OnnxCausalLM

    lm = OnnxCausalLM(model_dir)
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, chunk):
        c = ids[s:s + chunk + 1]
        logits, _ = lm.forward(np.asarray([c[:-1]]), np.ones((1, len(c) - 1), np.int64))
        lp = logits[0].astype(np.float64)
        lp = lp - lp.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(c) - 1), c[1:]].sum()
        n += len(c) - 1
    return math.exp(nll / n)


def torch_ppl(model, ids: list[int], chunk: int) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, chunk):
            c = torch.tensor([ids[s:s + chunk + 1]])
            logits = model(input_ids=c[:, :-1]).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits, c[0, 1:], reduction="sum").item()
            n += c.shape[1] - 1
    return math.exp(nll / n)


def decode_speed(model_dir: Path, threads: int, prompt: list[int], new_tokens: int) -> dict:
    """Run in a fresh process so sessions do not share thread pools; returns prefill ms and decode tok/s."""
    code = f"""
import json, sys
from qosora.run.decoder import OnnxCausalLM, StepTimes
lm = OnnxCausalLM({str(model_dir)!r}, threads={threads})
lm.generate({prompt[:8]!r}, 4)  # warm-up
t = StepTimes()
lm.generate({prompt!r}, {new_tokens}, times=t)
print(json.dumps({{"prefill_ms": t.prefill_s * 1e3, "decode_tps": t.decode_tokens_per_s, "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=None, help="prepared dir (default: prepare SmolLM2 rank 64 in --work)")
    ap.add_argument("--model", type=Path, default=None,
                    help="HF directory to prepare (default: the SmolLM2 fixture; tools/make_rotated_llama.py makes a "
                         "copy of it off the Q4_1 grid)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qosora-bench-export"))
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the graphs (and their recorded times) an interrupted run of the same commands left")
    ap.add_argument("--optimum-python", type=Path, default=None,
                    help="python of a separate venv with optimum-onnx (it pins transformers < 4.58): times optimum's "
                         "export of the merged model + onnxruntime's int4 quantizer as the export-time anchor")
    ap.add_argument("--calibrate", nargs="?", const="gsm8k", default=None, metavar="FILE",
                    help="add calibrated rows (ours: --calibrate; onnxruntime's GPTQ on the same token windows) and "
                         "onnxruntime's k-quant; bare --calibrate: the first 2000 GSM8K train rows")
    ap.add_argument("--calibration-samples", type=int, default=16)
    ap.add_argument("--no-ort-gptq", action="store_true",
                    help="leave out onnxruntime's GPTQ (it runs the whole graph once per MatMul input over all "
                         "calibration tokens: ~40 min for SmolLM2 with 16 x 256 tokens on 2 cores)")
    ap.add_argument("--calibration-seq-len", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("bench_export.json"))
    args = ap.parse_args()
    global RESUME
    RESUME = args.resume

    import torch

    import qosora
    from qosora.export.check import parity_check, prompt_token_ids
    from qosora.fixtures import smollm2_dir

    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    hf = args.model or smollm2_dir()
    src = args.src or work / "prepared-r64"
    results: dict = {"model": str(hf), "source": str(src), "block_size": args.block_size, "machine": machine()}
    if not (src / "qosora_config.json").is_file():
        wall, rss, _ = run_timed([sys.executable, "-m", "qosora", "prepare", str(hf), "--rank", "64",
                                  "--out", str(src), "--overwrite", "--json"])
        results["prepare"] = {"wall_s": round(wall, 1), "peak_rss_mb": round(rss, 1)}
    ckpt_mb = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
    results["fp32_checkpoint_mb"] = round(ckpt_mb, 1)
    bs = str(args.block_size)

    # -- 1. exports -----------------------------------------------------------------------------------------
    print("exporting ...", file=sys.stderr)
    lin = LIN
    ex = {
        "fp32": export(src, work / "fp32", "fp32"),
        "int4": export(src, work / "int4", "int4", "--block-size", bs),  # the defaults: --device cpu, asym, level 4
        "int4-hqq": export(src, work / "int4-hqq", "int4", "--block-size", bs, "--int4-scheme", "hqq"),
        "int4-standard-attn": export(src, work / "int4-std", "int4", "--block-size", bs, "--attention", "standard"),
        "int4-acc0": export(src, work / "int4-acc0", "int4", "--block-size", bs, "--accuracy-level", "0"),
        "int4-linears": export(src, work / "int4-linears", "int4", "--block-size", bs, "--int4-scheme", "hqq", *lin),
        "int4-linears-asym": export(src, work / "int4-linears-asym", "int4", "--block-size", bs, "--int4-scheme",
                                    "asym", *lin),
        "int4-linears-asym-ls-float": export(src, work / "int4-linears-asymlsf", "int4", "--block-size", bs,
                                             "--int4-scheme", "asym-ls-float", *lin),
        "int4-linears-asym-ls": export(src, work / "int4-linears-asymls", "int4", "--block-size", bs, "--int4-scheme",
                                       "asym-ls", *lin),
        "int4-linears-sym-search": export(src, work / "int4-linears-symsearch", "int4", "--block-size", bs,
                                          "--int4-scheme", "sym-search", *lin),
        "int4-linears-sym7": export(src, work / "int4-linears-sym7", "int4", "--block-size", bs, "--int4-scheme",
                                    "sym", *lin),
        "int4-keep-principal": export(src, work / "int4-kp", "int4", "--block-size", bs, "--keep-principal",
                                      "--int4-scheme", "hqq", *lin),
        "int4-keep-principal-asym": export(src, work / "int4-kp-asym", "int4", "--block-size", bs, "--keep-principal",
                                           "--int4-scheme", "asym", *lin),
        "nf4": export(src, work / "nf4", "nf4"),
        "trt-int4": export(src, work / "trt-int4", "trt-int4", "--block-size", bs, "--int4-scheme", "sym"),
        "trt-int4-sym-search": export(src, work / "trt-int4-ss", "trt-int4", "--block-size", bs, "--int4-scheme",
                                      "sym-search"),
        "trt-int4-keep-principal": export(src, work / "trt-int4-kp", "trt-int4", "--block-size", bs,
                                          "--keep-principal"),
        "trt-int4-linears": export(src, work / "trt-int4-linears", "trt-int4", "--block-size", bs, *lin),
    }
    for kind in ("rtn-sym", "rtn-asym", "hqq"):
        ex[f"ort-{kind}"] = ort_quantize(work / "fp32", work / f"ort-{kind}", kind, args.block_size)
    if args.calibrate:
        print("calibrated exports ...", file=sys.stderr)
        data, windows = calibration_windows(args.calibrate, hf, work, args.calibration_samples,
                                            args.calibration_seq_len)
        results["calibration"] = {"file": str(data), "samples": args.calibration_samples,
                                  "seq_len": args.calibration_seq_len, "seed": 0}
        cal = ("--calibrate", str(data), "--calibration-samples", str(args.calibration_samples),
               "--calibration-seq-len", str(args.calibration_seq_len))
        for name, fmt, extra in CALIBRATED:
            ex[name] = export(src, work / name, fmt, "--block-size", bs, *extra, *cal)
        ex["ort-k-quant"] = ort_quantize(work / "fp32", work / "ort-k-quant", "k-quant", args.block_size)
        if not args.no_ort_gptq:
            ex["ort-gptq"] = ort_quantize(work / "fp32", work / "ort-gptq", "gptq", args.block_size, windows)
    if args.optimum_python:
        results["optimum_anchor"] = optimum_anchor(args.optimum_python, src, work, args.block_size)
    results["exports"] = ex

    # -- 2. perplexity --------------------------------------------------------------------------------------
    print("perplexity ...", file=sys.stderr)
    model = qosora.load(src, dtype=torch.float32, compute_dtype=torch.float32).eval()  # the exact stored function
    ids = eval_tokens(hf, args.ppl_tokens)
    ppl = {"torch (qosora.load)": torch_ppl(model, ids, args.chunk)}
    for name in ("fp32", "int4-linears", "int4-linears-asym", "int4-linears-asym-ls", "int4-linears-asym-ls-float",
                 "int4-linears-sym7",
                 "int4-linears-sym-search", "ort-rtn-sym", "ort-rtn-asym", "ort-hqq", "int4-keep-principal",
                 "int4-keep-principal-asym", "int4", "int4-hqq", "int4-acc0", "nf4", "trt-int4",
                 "trt-int4-sym-search", "trt-int4-keep-principal", "trt-int4-linears"):
        ppl[name] = graph_ppl(Path(ex[name]["dir"]), ids, args.chunk)
    for name in [n for n, _, _ in CALIBRATED] + ["ort-k-quant", "ort-gptq"] if args.calibrate else []:
        if name in ex and "failed" not in ex[name]:
            ppl[name] = graph_ppl(Path(ex[name]["dir"]), ids, args.chunk)
    base = ppl["torch (qosora.load)"]
    results["perplexity"] = {"tokens": len(ids), "values": ppl, "increase": {k: v - base for k, v in ppl.items()}}

    # -- 3. greedy agreement --------------------------------------------------------------------------------
    print("greedy agreement ...", file=sys.stderr)
    prompts = prompt_token_ids(hf)
    results["greedy_64"] = {}
    for name in ("nf4", "int4", "int4-keep-principal", "fp32"):
        s = parity_check(Path(ex[name]["dir"]), model, prompts, new_tokens=64)["summary"]
        results["greedy_64"][name] = {k: s[k] for k in ("greedy_agree_tokens", "greedy_total_tokens",
                                                          "greedy_all_equal", "kl_mean", "top1_agreement")}
    del model

    # -- 4. speed -------------------------------------------------------------------------------------------
    if not args.skip_speed:
        print("speed ...", file=sys.stderr)
        prompt = (ids * 2)[:64]
        names = ["fp32", "int4", "int4-standard-attn", "int4-hqq", "int4-acc0", "int4-keep-principal", "ort-rtn-asym",
                 "ort-hqq", "trt-int4", "nf4"]
        speed: dict = {}
        for threads in [int(t) for t in args.threads.split(",")]:
            runs: dict[str, list] = {n: [] for n in names}
            for _ in range(args.repeats):  # alternate variants inside each repeat
                for n in names:
                    runs[n].append(decode_speed(Path(ex[n]["dir"]), threads, prompt, args.new_tokens))
            speed[threads] = {n: {"decode_tps": statistics.median(r["decode_tps"] for r in rs),
                                  "prefill_ms": statistics.median(r["prefill_ms"] for r in rs),
                                  "torch_imported": any(r["torch"] for r in rs)} for n, rs in runs.items()}
            for n in names:
                speed[threads][n]["decode_vs_fp32"] = speed[threads][n]["decode_tps"] / speed[threads]["fp32"]["decode_tps"]
        results["speed"] = speed

    args.out.write_text(json.dumps(results, indent=2))
    print_tables(results)
    return 0


def print_tables(r: dict) -> None:
    print(f"\nSmolLM2-135M prepared rank 64 ({r['source']}), block size {r['block_size']}")
    print("\nexport            wall s   peak RSS MB   ONNX MB   mean rel. requant error")
    for k, v in r["exports"].items():
        if "failed" in v:
            print(f"  {k:<20} failed: {v['failed']}")
            continue
        print(f"  {k:<20} {v['wall_s']:>6.1f}   {v['peak_rss_mb']:>9.0f}   {v['onnx_mb']:>7.1f}   "
              f"{v.get('mean_rel_error', float('nan')):.4f}")
    print(f"  fp32 checkpoint: {r['fp32_checkpoint_mb']:.0f} MB")
    if "optimum_anchor" in r:
        a = r["optimum_anchor"]
        print(f"  anchor: optimum export {a['optimum_export_s']:.1f} s (peak {a['optimum_peak_rss_mb']:.0f} MB) + ORT "
              f"RTN-asym {a['ort_rtn-asym_s']:.1f} s = {a['optimum_plus_rtn-asym_s']:.1f} s; + HQQ = "
              f"{a['optimum_plus_hqq_s']:.1f} s; our int4 {r['exports']['int4']['wall_s']:.1f} s")
    p = r["perplexity"]
    print(f"\nperplexity on {p['tokens']} tokens          ppl      increase vs PyTorch")
    for k, v in p["values"].items():
        print(f"  {k:<28} {v:>8.3f}   {p['increase'][k]:+.3f}")
    print("\ngreedy agreement, 64 new tokens x 5 prompts")
    for k, v in r["greedy_64"].items():
        print(f"  {k:<22} {v['greedy_agree_tokens']:>3}/{v['greedy_total_tokens']}   KL {v['kl_mean']:.2e}")
    for threads, rows in r.get("speed", {}).items():
        print(f"\ndecode speed, {threads} thread(s)      tok/s   x fp32   prefill ms (64 tok)")
        for k, v in rows.items():
            print(f"  {k:<22} {v['decode_tps']:>7.1f}   {v['decode_vs_fp32']:>5.2f}   {v['prefill_ms']:>8.1f}")


if __name__ == "__main__":
    sys.exit(main())
