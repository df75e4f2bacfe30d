#!/usr/bin/env bash
# The 7B training rehearsal on one CUDA GPU (H100/H200 class), offline, sized for a 10-minute run:
#   install the bitsandbytes wheel that travels with the tree, qosora itself (editable, no dependencies),
#   write the 7B-shaped synthetic checkpoint on local disk (matrices generated on the GPU),
#   qosora prepare (SORSA r128, cuda), qosora plan --device cuda, and --steps training steps with the same settings
#   (seq --seq-len, batch 1, gradient checkpointing, paged 8-bit AdamW, chunked CE), measuring
#   torch.cuda.max_memory_allocated() against the plan.
# Needs PyTorch with CUDA, transformers and tokenizers installed (no network is used).
#
#   bash tools/gpu_rehearsal.sh [--shape llama2-7b|llama3-8b] [--steps N] [--seq-len N] [--dry-run]
#   BNB_WHEEL=/path/bitsandbytes-*.whl   the wheel (default: shared/wheels/bitsandbytes-*.whl)
#   WORK=/tmp/qosora-gpu                 where the checkpoint and outputs go (~20 GB for llama2-7b)
#   OUT=dir                              gpu_rehearsal.json and the logs are written there (default: $WORK/out)
#   PYTHON=python3
# --dry-run prints the commands and touches nothing. Exit 2: bad arguments, or no bitsandbytes wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

shape=llama2-7b steps=5 seq_len=2048 dry_run=0
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) shape=${2:-}; shift 2 ;;
    --steps) steps=${2:-}; shift 2 ;;
    --seq-len) seq_len=${2:-}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_rehearsal.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$shape" in
  llama2-7b|llama3-8b) ;;
  *) echo "gpu_rehearsal.sh: --shape must be llama2-7b or llama3-8b" >&2; exit 2 ;;
esac
for n in "$steps" "$seq_len"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_rehearsal.sh: --steps and --seq-len take positive integers" >&2; exit 2; }
done

PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/qosora-gpu}
OUTDIR=${OUT:-$WORK/out}
CKPT=$WORK/$shape
PREPARED=$WORK/$shape-sorsa-r128
RUN=$WORK/$shape-run
wheel=${BNB_WHEEL:-$(ls shared/wheels/bitsandbytes-*.whl 2>/dev/null | head -n 1 || true)}
TRAIN_FLAGS=(--seq-len "$seq_len" --batch-size 1 --gradient-checkpointing --optim paged_adamw8bit)

say() { echo "[gpu_rehearsal $(date +%H:%M:%S) +$((SECONDS))s] $*" >&2; }
# Print a step; run it unless --dry-run. stdout of the step goes to $OUTDIR/NAME.json, stderr to $OUTDIR/NAME.log.
step() {
  local name=$1; shift
  echo "+ $*"
  [ "$dry_run" = 1 ] && return 0
  say "$name: started"
  local t0=$SECONDS
  if ! "$@" >"$OUTDIR/$name.json" 2>"$OUTDIR/$name.log"; then
    say "$name: FAILED; its stderr ends:"; tail -n 30 "$OUTDIR/$name.log" >&2; exit 1
  fi
  say "$name: done in $((SECONDS - t0)) s"
}

if [ "$dry_run" = 0 ]; then
  if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
    echo "gpu_rehearsal.sh: no bitsandbytes wheel (looked for ${BNB_WHEEL:-shared/wheels/bitsandbytes-*.whl}):" \
         "the GPU machine has no network; put a CUDA bitsandbytes wheel there or set BNB_WHEEL=PATH" >&2
    exit 2
  fi
  mkdir -p "$WORK" "$OUTDIR"
fi
echo "# shape $shape (SYNTHETIC weights), $steps steps, seq $seq_len, work $WORK, results $OUTDIR"

step install_bnb "$PY" -m pip install -q --no-index --no-deps "${wheel:-shared/wheels/bitsandbytes-VERSION.whl}"
# --no-build-isolation: an isolated build would fetch setuptools from the network, which is not there.
step install_qosora "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step checkpoint "$PY" tools/make_synthetic_llama.py "$CKPT" --shape "$shape" --dtype bfloat16 --weights decaying \
  --device cuda --json
step prepare "$PY" -m qosora prepare "$CKPT" --method sorsa --rank 128 --device cuda --out "$PREPARED" --overwrite \
  --json
step plan "$PY" -m qosora plan --config "$PREPARED" --method sorsa --rank 128 "${TRAIN_FLAGS[@]}" --device cuda --json
# `qosora train --json` reports no memory: train in-process and read torch's allocator peak afterwards.
step train "$PY" - "$PREPARED" "$RUN" "$steps" "${TRAIN_FLAGS[@]}" <<'EOF'
import contextlib, io, json, shutil, sys, time
import torch
from qosora.cli import main
from qosora.data import DEMO_JSONL

prepared, run, steps, *flags = sys.argv[1:]
shutil.rmtree(run, ignore_errors=True)
captured = io.StringIO()
t0 = time.perf_counter()
with contextlib.redirect_stdout(captured):  # --packing: full rows, the tokens `qosora plan` counts
    rc = main(["train", prepared, "--data", str(DEMO_JSONL), "--out", run, "--steps", steps, *flags, "--packing",
               "--json"])
if rc:
    sys.exit(rc)
free, total = torch.cuda.mem_get_info()
print(json.dumps({"train": json.loads(captured.getvalue()), "seconds": time.perf_counter() - t0,
                  "max_memory_allocated": torch.cuda.max_memory_allocated(),
                  "max_memory_reserved": torch.cuda.max_memory_reserved(),
                  "device_used_at_end": total - free, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__}))
EOF

[ "$dry_run" = 1 ] && exit 0
"$PY" - "$OUTDIR" "$shape" "$steps" "$seq_len" <<'EOF'
import json, sys
from pathlib import Path
out, shape, steps, seq_len = Path(sys.argv[1]), *sys.argv[2:]
read = lambda n: json.loads((out / f"{n}.json").read_text())
plan, train = read("plan"), read("train")
# The plan's `runtime` is the CUDA context, outside torch's allocator. bitsandbytes' paged optimizer states live in
# CUDA managed memory, also outside it: max_memory_allocated does not count them.
allocator_plan = plan["total_bytes"] - plan["components"]["runtime"]
paged = plan["components"]["optimizer_states"]
measured = train["max_memory_allocated"]
result = {"benchmark": "gpu_rehearsal", "synthetic": True, "shape": shape, "steps": int(steps),
          "seq_len": int(seq_len), "checkpoint": read("checkpoint"), "prepare": read("prepare"), "plan": plan,
          "train": train, "plan_allocator_bytes": allocator_plan,
          "plan_allocator_bytes_without_paged": allocator_plan - paged,
          "allocated_over_plan": measured / allocator_plan,
          "allocated_over_plan_without_paged": measured / (allocator_plan - paged)}
result["within_15pct"] = abs(result["allocated_over_plan_without_paged"] - 1) <= 0.15
(out / "gpu_rehearsal.json").write_text(json.dumps(result, indent=2))
gib = 2**30
print(f"plan {plan['total_bytes'] / gib:.2f} GiB (allocator {allocator_plan / gib:.2f}, of which paged optimizer "
      f"states {paged / gib:.2f}); max_memory_allocated {measured / gib:.2f} GiB, reserved "
      f"{train['max_memory_reserved'] / gib:.2f} GiB; allocated / (plan - runtime - paged) = "
      f"{result['allocated_over_plan_without_paged']:.3f}; wrote {out / 'gpu_rehearsal.json'}")
EOF
