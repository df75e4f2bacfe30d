"""`qosora bench`: prefill time and decode speed of an exported directory over prompt lengths, generation lengths
and batch sizes, median of repeats; optionally onnxruntime-genai's Generator on the same directory in the same run.

Prompts are synthetic ids ((7 i + 100 + row) mod vocab) and EOS is ignored, so every run decodes gen_len tokens.
decode tokens/s counts the tokens after the first over the time of the steps that made them, per sequence
(`total` multiplies by the batch); prefill covers the prompt's forward (genai: `append_tokens`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from qosora.errors import QosoraError
from qosora.run.generator import Generator
from qosora.run.options import BenchOptions, GenerationOptions, RuntimeOptions


def synthetic_prompts(length: int, batch: int, vocab: int) -> list[list[int]]:
    return [[(7 * i + 100 + b) % vocab for i in range(length)] for b in range(batch)]


def _point(prompt_len: int, gen_len: int, batch: int, runs: list[tuple[float, float]], engine: str) -> dict:
    prefill = statistics.median(r[0] for r in runs)
    tps = statistics.median(r[1] for r in runs)
    return {"engine": engine, "prompt_len": prompt_len, "gen_len": gen_len, "batch_size": batch,
            "prefill_ms": prefill, "decode_tokens_per_s": tps, "decode_tokens_per_s_total": tps * batch,
            "runs": [{"prefill_ms": p, "decode_tokens_per_s": t} for p, t in runs]}


def bench_qosora(g: Generator, opts: BenchOptions) -> list[dict]:
    points = []
    g.generate([synthetic_prompts(8, 1, g.lm.vocab_size)[0]], GenerationOptions(max_new_tokens=4))  # warm-up
    for p in opts.prompt_len:
        g.lm.check_prompt(p, f"--prompt-len {p}")
        for n in opts.gen_len:
            for b in opts.batch_size:
                prompts, gen = synthetic_prompts(p, b, g.lm.vocab_size), GenerationOptions(max_new_tokens=n,
                                                                                          ignore_eos=True)
                runs = []
                for _ in range(opts.repeats):
                    r = g.generate(prompts, gen, batch_size=b)[0]
                    runs.append((r.prefill_ms, r.decode_tokens_per_s))
                points.append(_point(p, n, b, runs, "qosora"))
    return points


@contextmanager
def genai_dir(model_dir: Path, threads: int | None, cuda: bool):
    """A temporary copy of the directory whose genai_config.json sets the thread count (and CUDA); the other files
    are symlinks."""
    config = json.loads((model_dir / "genai_config.json").read_text())
    for key in [k for k, v in config["model"].items() if v is None]:  # genai refuses null token ids
        del config["model"][key]
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
    if cuda:
        options["provider_options"] = [{"cuda": {}}]
    tmp = Path(tempfile.mkdtemp(prefix="qosora-genai-"))
    try:
        for f in model_dir.iterdir():
            if f.name != "genai_config.json":
                os.symlink(f.resolve(), tmp / f.name)
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=2))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_genai(model_dir: Path, opts: BenchOptions, vocab: int, threads: int | None, cuda: bool) -> list[dict]:
    import onnxruntime_genai as og

    if not (model_dir / "genai_config.json").is_file():
        raise QosoraError(f"{model_dir} has no genai_config.json: re-run `qosora export` or drop --against-genai")
    points = []
    with genai_dir(model_dir, threads, cuda) as d:
        model = og.Model(str(d))

        def once(prompts: list[list[int]], n: int) -> tuple[float, float]:
            params = og.GeneratorParams(model)
            total = len(prompts[0]) + n
            params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(prompts))
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(np.asarray(prompts, np.int32))
            gen.generate_next_token()  # picks token 1 from the prefill's logits
            t1 = time.perf_counter()
            for _ in range(n - 1):
                gen.generate_next_token()
            t2 = time.perf_counter()
            return (t1 - t0) * 1e3, (n - 1) / (t2 - t1) if n > 1 else 0.0

        once(synthetic_prompts(8, 1, vocab), 4)  # warm-up
        for p in opts.prompt_len:
            for n in opts.gen_len:
                for b in opts.batch_size:
                    runs = [once(synthetic_prompts(p, b, vocab), n) for _ in range(opts.repeats)]
                    points.append(_point(p, n, b, runs, "genai"))
    return points


def run_bench(model_dir: str | Path, opts: BenchOptions, runtime: RuntimeOptions, say=print) -> dict:
    """Every point for qosora (and genai when asked and installed); `say` gets the progress lines."""
    opts, runtime = opts.validate(), runtime.validate()
    model_dir = Path(model_dir)
    g = Generator(model_dir, runtime.provider, runtime.threads, runtime.spinning)
    vocab, cuda = g.lm.vocab_size, g.lm.io.device == "cuda"
    report = {"model_dir": str(model_dir), "contract": g.lm.io.contract, "device": g.lm.io.device,
              "threads": runtime.threads, "repeats": opts.repeats, "points": bench_qosora(g, opts), "genai": None}
    del g  # its session's threads stay out of genai's way
    if opts.against_genai:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            say("onnxruntime-genai is not installed (pip install onnxruntime-genai): qosora only")
            report["genai"] = "not installed"
            return report
        report["genai"] = "ran"
        try:
            genai = bench_genai(model_dir, opts, vocab, runtime.threads, cuda)
        except QosoraError:
            raise
        except Exception as e:  # onnxruntime-genai raises RuntimeError / its own types for configs it refuses
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QosoraError(f"onnxruntime-genai cannot run {model_dir} ({first}): drop --against-genai") from None
        for ours, theirs in zip(report["points"], genai):
            ours["genai_prefill_ms"], ours["genai_decode_tokens_per_s"] = theirs["prefill_ms"], \
                theirs["decode_tokens_per_s"]
            ours["decode_vs_genai"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"] \
                if theirs["decode_tokens_per_s"] else None
        report["genai_points"] = genai
    return report


def table(report: dict) -> str:
    genai = report.get("genai") == "ran"
    head = f"{'prompt':>7} {'gen':>5} {'batch':>5} {'prefill ms':>11} {'decode tok/s':>13} {'total tok/s':>12}"
    if genai:
        head += f" {'genai prefill':>14} {'genai tok/s':>12} {'vs genai':>9}"
    lines = [head]
    for p in report["points"]:
        line = (f"{p['prompt_len']:>7} {p['gen_len']:>5} {p['batch_size']:>5} {p['prefill_ms']:>11.1f} "
                f"{p['decode_tokens_per_s']:>13.1f} {p['decode_tokens_per_s_total']:>12.1f}")
        if genai:
            ratio = p["decode_vs_genai"]
            line += (f" {p['genai_prefill_ms']:>14.1f} {p['genai_decode_tokens_per_s']:>12.1f} "
                     f"{(f'{ratio:.2f}x' if ratio else '-'):>9}")
        lines.append(line)
    return "\n".join(lines)
