"""Rehearse the whole pipeline on a 7B-shaped synthetic checkpoint, one measured subprocess per step.

    python tools/rehearse_7b.py                               # Llama-2-7B shape in /tmp/qosora-7b (~30-60 min, 2 cores)
    python tools/rehearse_7b.py --shape llama3-8b --cuda-export
    python tools/rehearse_7b.py --layers 2 --hidden 256 --rank 16 --work /tmp/r --out /tmp/r.json   # tiny, ~1 min

    checkpoint  tools/make_synthetic_llama.py  bf16, ~5 GB shards + index, config.json ("qosora_synthetic": true),
                                               generation_config.json, a byte-level BPE tokenizer
    prepare     qosora prepare    --method sorsa --rank 128 --device cpu
    plan        qosora plan       --device cpu, the train step's settings
    train       qosora train      --steps 2 --seq-len 512 --batch-size 1 --gradient-checkpointing --packing
    merge       qosora merge      --dtype bfloat16
    export      qosora export     --format int4 [--no-check]       (+ export_cuda: --device cuda, with --cuda-export)
    generate    qosora generate   16 new tokens from the int4 export

Each step is its own process (`.venv/bin/qosora`), timed, with its peak RSS from `os.wait4`'s ru_maxrss and its
`--json` result kept; stdout goes to WORK/logs/STEP.json, stderr to WORK/logs/STEP.log, and a line on our stderr
every --heartbeat seconds gives the step's elapsed time, current RSS and last progress line.

Training uses --packing so that every row holds --seq-len tokens: the demo examples are ~25 tokens long, and
`qosora plan` predicts full rows. The export runs without its parity check unless --export-check is given: the
check loads the PyTorch model next to the onnxruntime session (its peak is theirs together, not the export's) and at
7B on a CPU it runs ~85 full forwards on one thread.

Resumable: a step whose output is complete is skipped, and so is a step recorded in WORK/rehearsal_state.json whose
output was deleted because nothing left to run needs it, so a killed run is continued by running the same command.
Without --keep the big intermediate outputs (checkpoint, prepared, run, merged) are deleted once no later step
needs them; the exports stay. Changing the settings of an existing work directory is refused (--fresh restarts).

Writes --out (bench/rehearsal_7b.json): the machine, each step's wall seconds, peak RSS, output bytes and key
figures, the planned vs measured training peak and the issue's done-when checks; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
from _bench import _json_result, machine, write_json  # noqa: E402
from make_synthetic_llama import add_shape_arguments, is_complete, scaled_config  # noqa: E402

GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent
PROMPT = "What is 12 plus 30?\n"
STATE = "rehearsal_state.json"
RSS_LIMIT = 20 * GiB  # the machine has 24 GiB; every step must stay under this


def _has(marker: str) -> Callable[[Path], bool]:
    """Complete once `marker`, the file its verb writes last (or renames into place with the rest), exists."""
    return lambda out: (out / marker).is_file()


def _json_written(out: Path) -> bool:
    return out.is_file() and _json_result(out.read_text()) is not None


@dataclass
class Step:
    """One pipeline step: a command writing `output` (a directory, or the JSON file of a step that writes none)."""

    name: str
    argv: list[str]
    output: Path
    complete_when: Callable[[Path], bool]
    needs: tuple[str, ...] = ()
    intermediate: bool = False  # deleted (without --keep) once no later step needs it
    json_file: bool = False     # `output` is the step's stdout

    def complete(self) -> bool:
        return self.complete_when(self.output)


@dataclass
class Settings:
    shape: str
    config: dict
    rank: int
    steps: int
    seq_len: int
    export_check: bool
    cuda_export: bool
    seed: int

    def key(self) -> dict:
        """What must match for an existing work directory to be continued (cuda_export may be added later)."""
        return {"shape": self.shape, "config": self.config, "rank": self.rank, "steps": self.steps,
                "seq_len": self.seq_len, "export_check": self.export_check, "seed": self.seed}


def qosora_cmd() -> list[str]:
    script = Path(sys.executable).parent / "qosora"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qosora"]


def build_steps(args, work: Path) -> list[Step]:
    from qosora.data import DEMO_JSONL

    q = qosora_cmd()
    ckpt, prepared, run = work / "checkpoint", work / "prepared", work / "run"
    shape_flags = [f for k in ("layers", "hidden", "vocab") if getattr(args, k) is not None
                   for f in (f"--{k}", str(getattr(args, k)))]
    train_flags = ["--seq-len", str(args.seq_len), "--batch-size", "1", "--gradient-checkpointing"]
    check = [] if args.export_check else ["--no-check"]
    done = _has("qosora_config.json")  # prepare and train (train renames it into OUT last)
    steps = [
        Step("checkpoint", [sys.executable, str(Path(__file__).parent / "make_synthetic_llama.py"), str(ckpt),
                            "--shape", args.shape, *shape_flags, "--dtype", "bfloat16", "--weights", "decaying",
                            "--seed", str(args.seed), "--json"], ckpt, is_complete, intermediate=True),
        Step("prepare", [*q, "prepare", str(ckpt), "--method", "sorsa", "--rank", str(args.rank), "--device", "cpu",
                         "--seed", str(args.seed), "--out", str(prepared), "--json"], prepared, done, ("checkpoint",),
             intermediate=True),
        Step("plan", [*q, "plan", "--config", str(prepared), "--method", "sorsa", "--rank", str(args.rank),
                      *train_flags, "--device", "cpu", "--json"], work / "plan.json", _json_written, ("prepare",),
             json_file=True),
        Step("train", [*q, "train", str(prepared), "--data", str(DEMO_JSONL), "--out", str(run), "--steps",
                       str(args.steps), *train_flags, "--packing", "--seed", str(args.seed), "--json"], run, done,
             ("prepare",), intermediate=True),
        Step("merge", [*q, "merge", str(run), "--out", str(work / "merged"), "--dtype", "bfloat16", "--json"],
             work / "merged", _has("config.json"), ("train",), intermediate=True),
        Step("export", [*q, "export", str(run), "--onnx", str(work / "onnx-int4"), "--format", "int4", *check,
                        "--json"], work / "onnx-int4", _has("export_report.json"), ("train",)),
    ]
    if args.cuda_export:
        steps.append(Step("export_cuda", [*q, "export", str(run), "--onnx", str(work / "onnx-int4-cuda"), "--format",
                                          "int4", "--device", "cuda", "--no-check", "--json"],
                          work / "onnx-int4-cuda", _has("export_report.json"), ("train",)))
    steps.append(Step("generate", [*q, "generate", str(work / "onnx-int4"), "--prompt", PROMPT, "--max-new-tokens",
                                   "16", "--json"], work / "generate.json", _json_written, ("export",),
                      json_file=True))
    return steps


def steps_to_run(steps: list[Step], recorded: dict) -> list[str]:
    """The steps whose output is incomplete, except an intermediate one that was recorded (its output deleted once
    used) when no step that runs needs it."""
    must: set[str] = set()
    for s in reversed(steps):
        needed = any(s.name in d.needs for d in steps if d.name in must)
        if not s.complete() and (needed or not s.intermediate or s.name not in recorded):
            must.add(s.name)
    return [s.name for s in steps if s.name in must]


# --- measuring one child ------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def say(self, message: str) -> None:
        print(f"[rehearse {_hms(time.perf_counter() - self.t0)}] {message}", file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _rss_now(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _last_line(log: Path) -> str:
    """The newest progress line of a child's stderr (tqdm rewrites its line with \\r)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1][:160] if parts else ""


def run_measured(step: Step, logs: Path, clock: Clock, heartbeat: float) -> dict:
    """Run one step; return wall seconds, peak RSS (ru_maxrss) and its JSON result. A failure exits the rehearsal."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, log_path = logs / f"{step.name}.json", logs / f"{step.name}.log"
    env = {**os.environ, "BITSANDBYTES_NOWELCOME": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(out_path, "w") as out, open(log_path, "w") as err:
        proc = subprocess.Popen(step.argv, stdout=out, stderr=err, env=env, cwd=REPO)
        done = threading.Event()

        def beat() -> None:
            while not done.wait(heartbeat):
                rss = _rss_now(proc.pid)
                now = f", RSS {rss / GiB:.2f} GiB" if rss else ""
                clock.say(f"{step.name}: running {_hms(time.perf_counter() - start)}{now}, {_written(step.output)}"
                          f" | {_last_line(log_path)}")

        watcher = threading.Thread(target=beat, daemon=True)
        watcher.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            done.set()
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    record = {"seconds": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024, "rc": rc,
              "argv": step.argv[1:] if step.argv[0] == sys.executable else step.argv}
    if rc != 0:
        record["stderr_tail"] = log_path.read_text(errors="replace")[-3000:]
        return record
    record["result"] = _json_result(out_path.read_text())
    if step.json_file:
        shutil.copyfile(out_path, step.output)
    return record


def _written(output: Path) -> str:
    """Progress a --json child does not print: what it has written so far (verbs build their output in a hidden
    `.NAME.tmp-*` sibling), and a training run's last metrics row."""
    try:
        metrics = output / "metrics.jsonl"
        if metrics.is_file():
            return f"at step {json.loads(metrics.read_text().splitlines()[-1]).get('step')}"
        done = dir_bytes(output) + sum(dir_bytes(t) for t in output.parent.glob(f".{output.name}.tmp-*"))
    except (OSError, ValueError, IndexError):  # files come and go while the child works
        return "writing"
    return f"{done / GiB:.2f} GiB written"


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- the report ---------------------------------------------------------------------------------------------
KEY_FIGURES = {
    "checkpoint": ("params", "tensor_bytes"),
    "prepare": ("layers", "trainable_params", "mean_rel_error", "mean_rel_error_plain_nf4", "seconds"),
    "plan": ("total_bytes", "total_gib", "trainable_params"),
    "train": ("steps", "first_loss", "final_loss", "tokens_per_s", "seconds"),
    "merge": ("dtype",),
    "export": ("format", "peak_rss_mb", "timing_s"),
    "export_cuda": ("format", "peak_rss_mb", "timing_s"),
    "generate": ("text", "new_tokens", "tokens_per_s", "seconds"),
}


def key_figures(name: str, result) -> dict:
    if not isinstance(result, dict):
        return {}
    keys = {k: result[k] for k in KEY_FIGURES.get(name, ()) if k in result}
    if name.startswith("export"):
        keys["requant_mean_rel_error"] = result.get("requantization", {}).get("mean_rel_error")
        keys["onnx_bytes"] = result.get("graph", {}).get("onnx_bytes")
        if "parity" in result:
            keys["parity"] = result["parity"]["summary"]
    return keys


def _at_most(peak: int, limit: float) -> dict:
    return {"ok": peak <= limit, "peak_gib": round(peak / GiB, 3), "limit_gib": round(limit / GiB, 3)}


def done_when(records: dict, ckpt_bytes: int, plan_bytes: int | None) -> dict:
    """The issue's acceptance checks, as booleans with the numbers they compare."""
    peak = {n: r["peak_rss_bytes"] for n, r in records.items() if "peak_rss_bytes" in r}
    checks = {"all_peaks_under_20_gib": {"ok": bool(peak) and max(peak.values()) < RSS_LIMIT,
                                         "max_peak_gib": round(max(peak.values(), default=0) / GiB, 3)}}
    if "prepare" in peak:
        checks["prepare_peak_le_0.35x_checkpoint_plus_2gib"] = _at_most(peak["prepare"], 0.35 * ckpt_bytes + 2 * GiB)
    if "export" in peak:
        checks["export_peak_le_0.5x_checkpoint"] = _at_most(peak["export"], 0.5 * ckpt_bytes)
    if "train" in peak and plan_bytes:
        err = abs(peak["train"] - plan_bytes) / plan_bytes
        checks["train_peak_within_15pct_of_plan"] = {
            "ok": err <= 0.15, "relative_error": round(err, 4), "plan_gib": round(plan_bytes / GiB, 3),
            "measured_gib": round(peak["train"] / GiB, 3)}
    return checks


def table(records: dict, ckpt_bytes: int) -> str:
    rows = ["| step | wall | peak RSS | peak RSS / bf16 checkpoint | output |", "|---|---|---|---|---|"]
    for name, r in records.items():
        if "peak_rss_bytes" not in r:
            rows.append(f"| {name} | (skipped: no record) | | | |")
            continue
        out = f"{r['output_bytes'] / GiB:.2f} GiB" if r.get("output_bytes") else ""
        wall = f"{r['seconds']:.1f} s" if r["seconds"] < 600 else _hms(r["seconds"])
        rows.append(f"| {name} | {wall} | {r['peak_rss_bytes'] / GiB:.2f} GiB | "
                    f"{r['peak_rss_bytes'] / ckpt_bytes:.3f} | {out} |")
    return "\n".join(rows)


def report(settings: Settings, records: dict, steps: list[Step], ran: list[str]) -> dict:
    ckpt = records.get("checkpoint", {})
    ckpt_bytes = ckpt.get("output_bytes") or 1
    plan = records.get("plan", {}).get("result") or {}
    linear = sum(o * i for o, i in _linear_shapes(settings.config).values()) * settings.config["num_hidden_layers"]
    for r in records.values():
        if "seconds" in r:
            r["seconds_per_billion_linear_params"] = round(r["seconds"] / (linear / 1e9), 3)
    train_peak = records.get("train", {}).get("peak_rss_bytes")
    return {
        "benchmark": "rehearsal_7b", "synthetic": True, "shape": settings.shape, "config": settings.config,
        # The ratio checks mean something at full size only: a tiny model is all process baseline.
        "full_size": settings.config == scaled_config(settings.shape),
        "settings": {**settings.key(), "cuda_export": settings.cuda_export}, "machine": machine(),
        "checkpoint_bf16_bytes": ckpt_bytes, "linear_params": linear,
        "steps_run_now": ran, "steps": {s.name: records.get(s.name, {"skipped": True}) for s in steps},
        "training_peak": {"planned_bytes": plan.get("total_bytes"), "measured_bytes": train_peak,
                          "measured_over_planned": (train_peak / plan["total_bytes"]) if train_peak and
                          plan.get("total_bytes") else None},
        "checks": done_when(records, ckpt_bytes, plan.get("total_bytes")),
        "table": table({s.name: records.get(s.name, {}) for s in steps}, ckpt_bytes),
    }


def _linear_shapes(cfg: dict) -> dict:
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (m, h), "up": (m, h), "down": (h, m)}


# --- main ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap)
    ap.set_defaults(shape="llama2-7b")
    ap.add_argument("--work", default="/tmp/qosora-7b", help="where the outputs go (a folder per shape)")
    ap.add_argument("--out", default="bench/rehearsal_7b.json", help="the report")
    ap.add_argument("--rank", type=int, default=128, help="SORSA rank")
    ap.add_argument("--steps", type=int, default=2, help="training steps")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export-check", action="store_true", help="run the export's parity check (slow at 7B)")
    ap.add_argument("--cuda-export", action="store_true", help="also export --device cuda (a second int4 export)")
    ap.add_argument("--keep", action="store_true", help="keep every output (~40 GB at 7B)")
    ap.add_argument("--fresh", action="store_true", help="delete this shape's work folder first")
    ap.add_argument("--heartbeat", type=float, default=30.0, help="seconds between progress lines of a running step")
    args = ap.parse_args(argv)
    try:
        config = scaled_config(args.shape, args.layers, args.hidden, args.vocab)
    except ValueError as e:
        ap.error(str(e))
    for name in ("rank", "steps", "seq_len"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args, config


def work_dir(args) -> Path:
    tag = args.shape + "".join(f"-{k[0]}{getattr(args, k)}" for k in ("layers", "hidden", "vocab")
                               if getattr(args, k) is not None)
    return Path(args.work) / tag


def main(argv=None) -> int:
    args, config = parse_args(argv)
    settings = Settings(args.shape, config, args.rank, args.steps, args.seq_len, args.export_check, args.cuda_export,
                        args.seed)
    clock = Clock()
    work = work_dir(args)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"settings": settings.key(), "steps": {}}
    if state["settings"] != settings.key():
        diff = [k for k in settings.key() if state["settings"].get(k) != settings.key()[k]]
        print(f"rehearse_7b: {work} holds a rehearsal with other settings ({', '.join(diff)} differ): pass --fresh to "
              "start over, or another --work", file=sys.stderr)
        return 2
    records: dict = state["steps"]
    steps = build_steps(args, work)
    ran = steps_to_run(steps, records)
    c = config
    clock.say(f"SYNTHETIC {args.shape} checkpoint (random weights with a decaying spectrum, not a trained model): "
              f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, MLP {c['intermediate_size']}, "
              f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocab {c['vocab_size']}; "
              f"work {work}; to run: {', '.join(ran) or 'nothing (all complete)'}")
    by_name = {s.name: s for s in steps}
    q_path = qosora_cmd()[0]
    for i, name in enumerate(ran):
        step = by_name[name]
        remove(step.output)  # an incomplete output of a killed run (every output here is ours)
        shown = ["qosora" if a == q_path else a for a in step.argv if a != sys.executable]
        clock.say(f"{name}: started: " + shlex.join(shown).replace("\n", "\\n"))
        record = run_measured(step, work / "logs", clock, args.heartbeat)
        if record["rc"] != 0:
            clock.say(f"{name}: FAILED (exit {record['rc']}) after {_hms(record['seconds'])} (log: "
                      f"{work}/logs/{name}.log; the same command continues from this step); stderr ends:\n"
                      f"{record['stderr_tail'][-1500:]}")
            records[name] = record
            write_json(args.out, report(settings, records, steps, ran))
            return 1
        record["output_bytes"] = dir_bytes(step.output)
        record["key"] = key_figures(name, record["result"])
        records[name] = record
        state_path.write_text(json.dumps(state, indent=1))
        clock.say(f"{name}: done in {_hms(record['seconds'])}, peak RSS {record['peak_rss_bytes'] / GiB:.2f} GiB, "
                  f"output {record['output_bytes'] / GiB:.2f} GiB")
        if not args.keep:
            later = {n for s in steps for n in s.needs if s.name in ran[i + 1:]}
            for s in steps[: steps.index(step) + 1]:
                if s.intermediate and s.name not in later and s.output.exists():
                    remove(s.output)
                    clock.say(f"deleted {s.output} (no later step needs it; --keep keeps it)")
    result = report(settings, records, steps, ran)
    write_json(args.out, result)
    print(result["table"])
    print()
    for name, c in result["checks"].items():
        print(f"- {name}: {'yes' if c['ok'] else 'NO'} ({', '.join(f'{k} {v}' for k, v in c.items() if k != 'ok')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
