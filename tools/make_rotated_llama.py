"""Write a rotated copy of a Llama checkpoint: the same function, with weights off any quantization grid.

The SmolLM2 fixture's weights went through GGUF Q4_1 once, so every 32-weight block already sits on a 16-level
grid, and an int4 quantizer of the merged weight can land back on it (BENCHMARKS.md, "Two copies of the same model"). Rotating the residual stream
by a random orthogonal Q (`qosora.fixtures.rotate_llama_state`) removes that grid and keeps the function. The
script checks the logits of both models on a few token ids.

    python tools/make_rotated_llama.py ~/.cache/qosora/smollm2-135m-instruct /tmp/smollm2-rotated
    python tools/make_rotated_llama.py --smollm2        # the cached copy the slow tests use
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qosora.fixtures import rotated_llama_copy, smollm2_dir, smollm2_rotated_dir


def max_logit_diff(a: Path, b: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 65).reshape(2, 32) * 37 % 49000
    logits = []
    for d in (a, b):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    return ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, nargs="?", help="HF Llama/Mistral directory with one model.safetensors")
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--smollm2", action="store_true", help="build the cached rotated SmolLM2 fixture")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.smollm2:
        src, out = smollm2_dir(), smollm2_rotated_dir()
    elif args.src and args.out:
        src, out = args.src, rotated_llama_copy(args.src, args.out, args.seed)
    else:
        ap.error("give SRC and OUT, or --smollm2")
    print(f"wrote {out}; max |logit difference| / max |logit| = {max_logit_diff(src, out):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
