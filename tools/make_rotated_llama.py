"""Write a rotated copy of a Llama checkpoint: the same function, with weights off any quantization grid.

The SmolLM2 fixture's weights went through GGUF Q4_1 once, so every 32-weight block already sits on a 16-level
grid, and an int4 quantizer of the merged weight can land back on it (DESIGN.md §5). Rotating the residual stream
by a random orthogonal Q (QuaRot's computational invariance) removes that grid while keeping the model's function:

    h' = h Q                      embedding  E' = E Q
    readers (q, k, v, gate, up):  W' = W diag(g) Q      (the RMSNorm gain g folded in, the norm's gain set to 1)
    writers (o, down):            W' = Q^T W
    lm_head:                      H' = E diag(g_final) Q  (untied: the head now differs from the embedding)

RMSNorm(h Q) = RMSNorm(h) Q because Q keeps the norm; every linear sees the same products as before. The script
checks the logits of both models on a few token ids.

    python tools/make_rotated_llama.py ~/.cache/qosora/smollm2-135m-instruct /tmp/smollm2-rotated
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def rotate(state: dict[str, torch.Tensor], n_layers: int, Q: torch.Tensor) -> dict[str, torch.Tensor]:
    sd = {k: v.double() for k, v in state.items()}
    out = {}
    embed = sd["model.embed_tokens.weight"]
    out["model.embed_tokens.weight"] = embed @ Q
    head = sd.get("lm_head.weight", embed)
    out["lm_head.weight"] = (head * sd["model.norm.weight"]) @ Q
    out["model.norm.weight"] = torch.ones_like(sd["model.norm.weight"])
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for norm, readers in (("input_layernorm", READERS[:3]), ("post_attention_layernorm", READERS[3:])):
            g = sd[f"{p}.{norm}.weight"]
            out[f"{p}.{norm}.weight"] = torch.ones_like(g)
            for r in readers:
                out[f"{p}.{r}.weight"] = (sd[f"{p}.{r}.weight"] * g) @ Q
        for w in WRITERS:
            out[f"{p}.{w}.weight"] = Q.T @ sd[f"{p}.{w}.weight"]
    for k, v in sd.items():  # biases and anything else that does not touch the residual stream
        out.setdefault(k, v)
    return {k: v.float().contiguous() for k, v in out.items()}


def max_logit_diff(src: Path, dst: Path) -> float:
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1, 65).reshape(2, 32) * 37 % 49000
    logits = []
    for d in (src, dst):
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    return ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="HF Llama directory with one model.safetensors")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = json.loads((args.src / "config.json").read_text())
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise SystemExit(f"{args.src}: rotation is written for Llama/Mistral (no q/k/v biases), got {cfg.get('model_type')}")
    Q = random_orthogonal(cfg["hidden_size"], args.seed)
    state = rotate(load_file(args.src / "model.safetensors"), cfg["num_hidden_layers"], Q)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in args.src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy2(f, tmp / f.name)
    cfg["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    print(f"wrote {args.out}; max |logit difference| / max |logit| = {max_logit_diff(args.src, args.out):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
