"""Rerun every benchmark that BENCHMARKS.md quotes, one at a time, then regenerate its tables from the new JSON.

    python tools/bench_all.py --dry-run                 # print the commands, run nothing
    python tools/bench_all.py                           # all of them: hours on a 2-core machine
    python tools/bench_all.py --only train,finetune     # or: --skip decode

BENCHMARKS below is the list BENCHMARKS.md shows, command for command (tests/test_bench_tables.py checks that each
command appears there and that each generated table's JSON has one). Each runs in bash from the repository root,
under `flock /tmp/qosora-heavy.lock` (so it never overlaps another heavy job on this machine), with
OMP_WAIT_POLICY=PASSIVE and this interpreter's folder first on PATH (`python` and `qosora` are this venv's);
bench_demo.py still clears OMP_* for its children, as the demo measures a user's environment. Steps run in order
and the first failure stops the run: later steps read what earlier ones wrote (the export runs share
/tmp/qosora-bench-export, the rotated ones need /tmp/smollm2-rotated). Extra environments are checked before anything
runs, and each missing one is named with the command that provides it.

The Export speed and cost tables and two README headline rows read bench/export.json, a run of bench_export.py
from before issue #11 renamed its rows (`int4` is now the `asym` CPU default): after that step reruns,
bench_tables.py refuses the new JSON, with an error saying so, until those render functions follow the new names.

Not run by default: tools/reproduce.py (the reproduction study, a separate and much longer run with its own
resumable cache and report; `--only reproduce` runs it). Not here: `qosora plan` (instant; no JSON of its output is
kept).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
LOCK = "/tmp/qosora-heavy.lock"
OPTIMUM_PYTHON = "/tmp/optenv/bin/python"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@dataclass(frozen=True)
class Need:
    """Something a benchmark needs from outside the project's venv, and the command that provides it."""
    what: str
    fix: str
    kind: Literal["path", "module", "command"] = "path"

    def present(self) -> bool:
        if self.kind == "module":
            return importlib.util.find_spec(self.what) is not None
        if self.kind == "command":
            return shutil.which(self.what) is not None
        return Path(self.what).exists()


@dataclass(frozen=True)
class Benchmark:
    name: str
    command: str  # as BENCHMARKS.md quotes it
    out: str | None  # the JSON it writes (repository-relative), None for a preparation step
    needs: tuple[Need, ...] = ()


_FLOCK = Need("flock", "apt-get install util-linux", kind="command")  # every benchmark runs under it
_OPTIMUM = Need(OPTIMUM_PYTHON, "bash tools/setup_optimum_env.sh /tmp/optenv")
_GENAI = Need("onnxruntime_genai", "pip install onnxruntime-genai (and its model builder's dependencies)",
              kind="module")
_GSM8K = Need(str(GSM8K), "put GSM8K's train.jsonl there (it is never committed)")
_EXPORT = "OMP_WAIT_POLICY=PASSIVE python tools/bench_export.py"

BENCHMARKS = (
    Benchmark("demo", "python tools/bench_demo.py --avx2 --out bench/demo.json", "bench/demo.json"),
    Benchmark("fidelity", "python tools/bench_fidelity.py --rank 64 --out bench/fidelity.json", "bench/fidelity.json"),
    Benchmark("prepare", "python tools/bench_prepare.py --rank 64 --repeats 3 --out bench/prepare.json",
              "bench/prepare.json"),
    Benchmark("streaming", "python tools/bench_streaming.py --out bench/streaming.json", "bench/streaming.json"),
    Benchmark("rehearsal_7b", "python tools/rehearse_7b.py --cuda-export --out bench/rehearsal_7b.json",
              "bench/rehearsal_7b.json"),
    Benchmark("train", "OMP_WAIT_POLICY=PASSIVE python tools/bench_train.py --steps 8 --out bench/train.json",
              "bench/train.json"),
    Benchmark("finetune", "python tools/bench_finetune.py --train 240 --eval 64 --steps 30 --out bench/finetune.json",
              "bench/finetune.json", (_GSM8K,)),
    Benchmark("decode", "python tools/bench_decode.py --out bench/decode.json", "bench/decode.json", (_GENAI,)),
    Benchmark("export", f"{_EXPORT} --repeats 2 --optimum-python {OPTIMUM_PYTHON} --out bench/export.json",
              "bench/export.json", (_OPTIMUM,)),
    Benchmark("decode_spinning",  # times the graphs the export step left in /tmp/qosora-bench-export
              "python tools/bench_decode_spinning.py --out bench/decode_spinning.json", "bench/decode_spinning.json"),
    Benchmark("export_issue11", f"{_EXPORT} --src /tmp/qosora-bench-export/prepared-r64 --repeats 1 --threads 2 "
                                "--out bench/export_issue11.json", "bench/export_issue11.json"),
    Benchmark("rotated_model", "python tools/make_rotated_llama.py ~/.cache/qosora/smollm2-135m-instruct "
                               "/tmp/smollm2-rotated", None),
    # issue #13: every quantizer, ours calibrated and onnxruntime's, in four columns; onnxruntime's GPTQ (~40 min a
    # column here: the whole graph once per MatMul input over all calibration tokens) in the first only
    Benchmark("export_calibrated", f"{_EXPORT} --calibrate --skip-speed --out bench/export_calibrated.json",
              "bench/export_calibrated.json", (_GSM8K,)),
    Benchmark("export_calibrated_bs64", f"{_EXPORT} --src /tmp/qosora-bench-export/prepared-r64 "
                                        "--work /tmp/qosora-bench-export64 --block-size 64 --calibrate --skip-speed "
                                        "--no-ort-gptq --out bench/export_calibrated_bs64.json",
              "bench/export_calibrated_bs64.json", (_GSM8K,)),
    Benchmark("export_calibrated_rotated", f"{_EXPORT} --model /tmp/smollm2-rotated --work /tmp/qosora-bench-rot "
                                           "--calibrate --skip-speed --no-ort-gptq "
                                           "--out bench/export_calibrated_rotated.json",
              "bench/export_calibrated_rotated.json", (_GSM8K,)),
    Benchmark("export_calibrated_rotated_bs64",
              f"{_EXPORT} --model /tmp/smollm2-rotated --src /tmp/qosora-bench-rot/prepared-r64 "
              "--work /tmp/qosora-bench-rot64 --block-size 64 --calibrate --skip-speed --no-ort-gptq "
              "--out bench/export_calibrated_rotated_bs64.json",
              "bench/export_calibrated_rotated_bs64.json", (_GSM8K,)),
)
# Studies with their own resumable runner and report: run only when named (`--only reproduce`), never by default.
STUDIES = (
    Benchmark("reproduce", "OMP_WAIT_POLICY=PASSIVE python tools/reproduce.py", "bench/reproduce.json", (_GSM8K,)),
)


def argv(bench: Benchmark) -> list[str]:
    """The process bench_all starts for one benchmark."""
    return ["flock", LOCK, "bash", "-c", bench.command]


def select(only: list[str], skip: list[str]) -> list[Benchmark]:
    """BENCHMARKS (or those in `only`, which may also name a study) minus `skip`."""
    names = [b.name for b in BENCHMARKS + STUDIES]
    if unknown := [n for n in only + skip if n not in names]:
        raise SystemExit(f"bench_all: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
    pool = BENCHMARKS + STUDIES if only else BENCHMARKS
    return [b for b in pool if (not only or b.name in only) and b.name not in skip]


def missing_needs(benches: list[Benchmark]) -> list[str]:
    """One line per absent prerequisite, naming the benchmark and the command that provides it."""
    return [f"{b.name}: {n.what} is missing; {n.fix}" for b in benches for n in (_FLOCK, *b.needs)
            if not n.present()]


def run(benches: list[Benchmark]) -> int:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for b in benches:
        print(f"bench_all: {b.name} -> {b.out or '(no JSON)'}", flush=True)
        rc = subprocess.run(argv(b), cwd=REPO, env=env).returncode
        if rc:
            print(f"bench_all: {b.name} failed (exit {rc}); later steps not run, tables not regenerated",
                  file=sys.stderr)
            return rc
    return subprocess.run([sys.executable, str(REPO / "tools" / "bench_tables.py")], cwd=REPO).returncode


def _names(value: str) -> list[str]:
    return [n for n in value.split(",") if n]


def main(args: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--only", type=_names, default=[], metavar="NAME[,NAME]", help="run only these benchmarks")
    ap.add_argument("--skip", type=_names, default=[], metavar="NAME[,NAME]", help="leave these out")
    opts = ap.parse_args(args)
    benches = select(opts.only, opts.skip)
    missing = missing_needs(benches)
    if opts.dry_run:
        for b in benches:
            print(f"# {b.name} -> {b.out or '(no JSON)'}\n{shlex.join(argv(b))}")
        print("# then regenerate the tables\npython tools/bench_tables.py")
        for line in missing:
            print(f"bench_all: warning: {line}", file=sys.stderr)
        return 0
    if missing:
        print("bench_all: nothing run, prerequisites missing:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    return run(benches)


if __name__ == "__main__":
    sys.exit(main())
