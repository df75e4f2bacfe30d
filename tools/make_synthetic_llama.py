"""Write a synthetic ~1.1B-parameter Llama checkpoint (random weights, fp32, sharded safetensors) to disk.

Tensors are generated and written shard by shard, so writing it never holds the model in memory. Used by the
streaming benchmarks: a prepare / export of it must peak at no more than half its fp32 size.

    python tools/make_synthetic_llama.py /tmp/llama-1b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qosora.shards import ShardedWriter

# TinyLlama-1.1B's shape: 22 layers, hidden 2048, GQA 32/4 heads, MLP 5632, vocab 32000.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
}


def tensors(cfg: dict):
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    yield "model.embed_tokens.weight", rnd(v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", torch.ones(h)
        yield f"{p}.post_attention_layernorm.weight", torch.ones(h)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield f"{p}.self_attn.{name}.weight", rnd(*shape)
        for name, shape in (("gate_proj", (m, h)), ("up_proj", (m, h)), ("down_proj", (h, m))):
            yield f"{p}.mlp.{name}.weight", rnd(*shape)
    yield "model.norm.weight", torch.ones(h)
    yield "lm_head.weight", rnd(v, h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "config.json").is_file():
        print(f"{out} exists")
        return
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(out, "model", max_shard_bytes=512 << 20)
    n = 0
    for name, t in tensors(CONFIG):
        writer.add(name, t)
        n += t.numel()
    writer.close()
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    print(f"wrote {n / 1e9:.2f}B parameters ({n * 4 / 2**30:.1f} GiB fp32) to {out}")


if __name__ == "__main__":
    main()
