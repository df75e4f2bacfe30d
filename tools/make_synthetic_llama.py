"""Write a synthetic Llama checkpoint (random weights, sharded safetensors, config.json, tokenizer) to disk.

Shapes: TinyLlama-1.1B (the default, fp32: the streaming benchmark's model), Llama-2-7B and Llama-3-8B, each with
the exact dimensions of the real model, or a tiny member of the same family (`--layers 2 --hidden 256`) for tests.

    python tools/make_synthetic_llama.py /tmp/llama-1b                                   # 1.1B, fp32, N(0, 0.02)
    python tools/make_synthetic_llama.py /tmp/llama2-7b --shape llama2-7b                 # 6.7B, bf16, 5 GB shards
    python tools/make_synthetic_llama.py /tmp/tiny --shape llama3-8b --layers 2 --hidden 256

Weights (`--weights`):
    gaussian   every matrix N(0, 0.02^2) i.i.d. (flat spectrum: an SVD split finds nothing to take out)
    decaying   every linear and lm_head  W = U diag(sigma) V + E   (the default for the 7-8B shapes)
                   U (d_out, k) ~ N(0, 1/d_out), V (k, d_in) ~ N(0, 1/d_in)   nearly orthonormal for k <= min(d)/2
                   sigma_j = (1 + j)^-ALPHA, j < k = min(COMPONENTS, min(d_out, d_in) / 2)   (sigma_1 = 1)
                   E ~ N(0, eps^2), eps (sqrt(d_out) + sqrt(d_in)) = sigma_k   (noise floor where the decay ends)
               so the top-r SVD of a rank-128 split keeps a power-law head and the NF4 residual is a realistic
               mix of tail directions and noise. Spectral norms ~1, except lm_head, whose rows have norm ~1 (logits
               of std ~1, so greedy decoding has clear winners); embedding rows of norm ~1, norm gains ~1.

Every tensor is generated in row blocks of BLOCK_BYTES (fp32) from its own seeded generator (seed, tensor name) and
written as it is made (`qosora.shards.ShardedWriter`), so the writer holds one tensor in the output dtype plus one
block: under 0.5 GiB for Llama-2-7B (its largest tensor is 90 MB), ~1.2 GiB for Llama-3-8B's 128256-row embedding.
The directory is written atomically; an existing complete one is left alone. config.json records
`"qosora_synthetic": true`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: the shape helpers stay light (tools/rehearse_7b.py)
    import torch

_BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
    "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02, "pretraining_tp": 1,
    "tie_word_embeddings": False, "use_cache": True, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
}
# Dimensions of the real models' config.json (qosora/data/models/ holds the same numbers for `qosora plan`).
SHAPES = {
    "tinyllama-1.1b": {**_BASE, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "max_position_embeddings": 2048, "rope_theta": 10000.0},
    "llama2-7b": {**_BASE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096, "rope_theta": 10000.0},
    "llama3-8b": {**_BASE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0},
}
DEFAULTS = {  # per shape: (dtype, weights, shard bytes) as the model is usually shipped / as the benchmark used it
    "tinyllama-1.1b": ("float32", "gaussian", 512 << 20),
    "llama2-7b": ("bfloat16", "decaying", 5 * 10**9),
    "llama3-8b": ("bfloat16", "decaying", 5 * 10**9),
}
DTYPES = ("float32", "bfloat16", "float16")
WEIGHTS = ("gaussian", "decaying")

COMPONENTS = 512       # directions of the power-law head of each spectrum (at most min(d_out, d_in) / 2)
ALPHA = 0.7            # sigma_j = (1 + j)^-ALPHA: sigma_1 / sigma_128 = 30
NORM_GAIN_STD = 0.02   # RMSNorm gains 1 + N(0, 0.02^2)
BLOCK_BYTES = 64 << 20  # fp32 working block while generating a tensor
TOKENIZER_VOCAB = 4096  # learnt ids at most (BPE on the demo data stops earlier, when it runs out of merges)
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Llama-2's tokenizer


def scaled_config(shape: str, layers: int | None = None, hidden: int | None = None, vocab: int | None = None) -> dict:
    """`shape`'s config.json, optionally shrunk to `layers` decoder layers / `hidden` width / `vocab` rows.

    A narrower model keeps the family: the MLP ratio (rounded to a multiple of 128, so int4 blocks of up to 128
    divide it), the query-to-KV head ratio (MHA stays MHA, GQA 4:1 stays 4:1) and head_dim = min(128, hidden / 4).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise ValueError("--layers must be at least 1")
        cfg["num_hidden_layers"] = layers
    if hidden is not None and hidden != cfg["hidden_size"]:
        if hidden < 64 or hidden % 64:
            raise ValueError("--hidden must be a positive multiple of 64")
        head_dim = min(128, hidden // 4)
        heads = hidden // head_dim
        group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
        ratio = cfg["intermediate_size"] / cfg["hidden_size"]
        cfg.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=max(1, heads // group),
                   intermediate_size=max(128, round(hidden * ratio / 128) * 128))
    if vocab is not None:
        if vocab < len(SPECIALS) + 256:
            raise ValueError(f"--vocab must hold the byte-level tokenizer: at least {len(SPECIALS) + 256}")
        cfg["vocab_size"] = vocab
    return cfg


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order Hugging Face writes a Llama checkpoint."""
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        out += [(f"{p}.self_attn.{n}.weight", s) for n, s in
                (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q)))]
        out += [(f"{p}.mlp.{n}.weight", s) for n, s in
                (("gate_proj", (m, h)), ("up_proj", (m, h)), ("down_proj", (h, m)))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _gaussian_tensors(cfg: dict, dtype: "torch.dtype"):
    """N(0, 0.02^2) matrices and unit norms from one generator (seed 0), drawn in the order the 1.1B streaming
    benchmark has always used."""
    import torch

    g = torch.Generator().manual_seed(0)
    for name, shape in tensor_shapes(cfg):
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(*shape, generator=g) * 0.02
        yield name, t.to(dtype)


def _generator(seed: int, name: str, device: str) -> "torch.Generator":
    import torch

    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _rows_per_block(d_in: int) -> int:
    return max(1, BLOCK_BYTES // (4 * d_in))


def decaying_matrix(d_out: int, d_in: int, g: "torch.Generator", dtype: "torch.dtype | None" = None,
                    device: str = "cpu", row_norm: float | None = None) -> "torch.Tensor":
    """W = U diag(sigma) V + E (module docstring), built in fp32 row blocks, returned in `dtype` (fp32) on the CPU.

    `row_norm` rescales W so that its rows have that mean norm instead of sigma_1 = 1 (lm_head: logits of std ~1).
    """
    import torch

    dtype = dtype or torch.float32
    k = max(1, min(COMPONENTS, min(d_out, d_in) // 2))
    sigma = (1.0 + torch.arange(k, device=device, dtype=torch.float32)) ** -ALPHA  # (k,)
    eps = float(sigma[-1]) / (math.sqrt(d_out) + math.sqrt(d_in))
    if row_norm is not None:  # ||W||_F^2 ~ sum sigma^2 + eps^2 d_out d_in, spread over d_out rows
        scale = row_norm * math.sqrt(d_out / (float((sigma**2).sum()) + eps**2 * d_out * d_in))
        sigma, eps = sigma * scale, eps * scale
    V = torch.randn(k, d_in, generator=g, device=device) / math.sqrt(d_in)       # (k, d_in)
    W = torch.empty(d_out, d_in, dtype=dtype)
    rows = _rows_per_block(d_in)
    for r0 in range(0, d_out, rows):
        n = min(rows, d_out - r0)
        U = torch.randn(n, k, generator=g, device=device) / math.sqrt(d_out)      # (n, k)
        block = (U * sigma) @ V                                                    # (n, d_in)
        block += eps * torch.randn(n, d_in, generator=g, device=device)
        W[r0:r0 + n] = block.to(dtype).cpu()
    return W


def _embedding(v: int, h: int, g: "torch.Generator", dtype: "torch.dtype", device: str) -> "torch.Tensor":
    import torch

    E = torch.empty(v, h, dtype=dtype)  # rows N(0, 1/h): norm ~1
    rows = _rows_per_block(h)
    for r0 in range(0, v, rows):
        n = min(rows, v - r0)
        E[r0:r0 + n] = (torch.randn(n, h, generator=g, device=device) / math.sqrt(h)).to(dtype).cpu()
    return E


def _decaying_tensors(cfg: dict, dtype: "torch.dtype", seed: int, device: str):
    import torch

    for name, shape in tensor_shapes(cfg):
        g = _generator(seed, name, device)
        if name.endswith("norm.weight"):
            t = 1 + NORM_GAIN_STD * torch.randn(*shape, generator=g, device=device)
            yield name, t.to(dtype).cpu()
        elif name == "model.embed_tokens.weight":
            yield name, _embedding(*shape, g, dtype, device)
        else:
            yield name, decaying_matrix(*shape, g, dtype, device, row_norm=1.0 if name == "lm_head.weight" else None)


def tensors(cfg: dict, weights: str = "decaying", dtype: "torch.dtype | None" = None, seed: int = 0,
            device: str = "cpu"):
    """Yield (name, tensor) for every tensor of the checkpoint, one at a time (bf16 unless `dtype` says)."""
    import torch

    dtype = dtype or torch.bfloat16
    if weights == "gaussian":
        return _gaussian_tensors(cfg, dtype)
    if weights == "decaying":
        return _decaying_tensors(cfg, dtype, seed, device)
    raise ValueError(f"unknown weights {weights!r}: one of {', '.join(WEIGHTS)}")


# --- tokenizer -----------------------------------------------------------------------------------------------
def tokenizer_corpus() -> list[str]:
    """What the tokenizer is trained on: the bundled demo task and the export check's prompts."""
    from qosora.data import DEMO_JSONL
    from qosora.export.check import DEFAULT_PROMPTS

    rows = [json.loads(line) for line in DEMO_JSONL.read_text().splitlines() if line.strip()]
    return [r["prompt"] + r["completion"] for r in rows] + list(DEFAULT_PROMPTS)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` (any text encodes, no unknowns) with exactly `vocab_size` ids, as a
    hub tokenizer covers its model's embedding rows: <unk> 0, <s> 1, </s> 2, the 256 byte symbols, the merges learnt
    from `tokenizer_corpus()` (up to TOKENIZER_VOCAB ids), then filler tokens `<tok1234>` that no text encodes to but
    every generated id decodes to. Encoding adds <s>, as Llama's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def byte_level(model):
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    learnt = byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, TOKENIZER_VOCAB), special_tokens=list(SPECIALS),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learnt.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(learnt.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for i in range(len(vocab), vocab_size):  # printable ASCII maps to itself in the byte-level alphabet
        vocab[f"<tok{i}>"] = i
    tok = byte_level(models.BPE(vocab, merges))
    bos = SPECIALS[1]
    tok.add_special_tokens(list(SPECIALS))  # ids 0-2 already: registers them as special (skipped when decoding)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_tokenizer(directory: Path, vocab_size: int, max_length: int) -> int:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json as the hub ships a fast tokenizer; returns
    the tokenizer's vocabulary size."""
    tok = build_tokenizer(vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    unk, bos, eos = SPECIALS
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "pad_token": None, "add_bos_token": True,
         "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": max_length}, indent=2))
    return tok.get_vocab_size()


# --- the checkpoint ------------------------------------------------------------------------------------------
def _largest_tensor_bytes(cfg: dict, dtype: "torch.dtype") -> int:
    return max(math.prod(s) for _, s in tensor_shapes(cfg)) * dtype.itemsize


def write_checkpoint(out: str | Path, cfg: dict, *, dtype: str = "bfloat16", weights: str = "decaying", seed: int = 0,
                     shard_bytes: int = 5 * 10**9, device: str = "cpu", tokenizer: bool = True,
                     log=None) -> dict:
    """Write the checkpoint of `cfg` to `out` (atomically); return a summary (parameters, bytes, seconds).

    Shards stay under `shard_bytes` (Hugging Face's `max_shard_size`): a shard is closed once it comes within one
    largest tensor of the limit. The index carries `metadata.total_size` as the hub's does.
    """
    import torch

    from qosora.files import atomic_directory
    from qosora.shards import ShardedWriter

    t0 = time.perf_counter()
    out = Path(out)
    torch_dtype = getattr(torch, dtype)
    config = {**cfg, "torch_dtype": dtype, "dtype": dtype, "qosora_synthetic": True,
              "qosora_synthetic_weights": weights if weights == "gaussian" else
              {"weights": weights, "components": COMPONENTS, "alpha": ALPHA, "seed": seed}}
    n_params = n_bytes = 0
    shapes = tensor_shapes(cfg)
    with atomic_directory(out) as tmp:
        limit = max(shard_bytes - _largest_tensor_bytes(cfg, torch_dtype), 1)
        writer = ShardedWriter(tmp, "model", max_shard_bytes=limit)
        for i, (name, t) in enumerate(tensors(cfg, weights, torch_dtype, seed, device)):
            writer.add(name, t)
            n_params, n_bytes = n_params + t.numel(), n_bytes + t.numel() * t.element_size()
            if log is not None and (name.endswith("down_proj.weight") or i == len(shapes) - 1):
                log(f"{i + 1}/{len(shapes)} tensors, {n_bytes / 2**30:.1f} GiB, {time.perf_counter() - t0:.0f} s")
        files = writer.close()
        index = tmp / "model.safetensors.index.json"
        if index.is_file():  # the hub's index records the total tensor bytes
            data = json.loads(index.read_text())
            data["metadata"] = {"total_size": n_bytes}
            index.write_text(json.dumps(data, indent=2))
        if tokenizer:
            config["tokenizer_vocab_size"] = write_tokenizer(tmp, cfg["vocab_size"], cfg["max_position_embeddings"])
            (tmp / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False,
                 "max_length": cfg["max_position_embeddings"]}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return {"dir": str(out), "params": n_params, "tensor_bytes": n_bytes, "shards": files,
            "seconds": round(time.perf_counter() - t0, 2), "synthetic": True}


def is_complete(out: str | Path) -> bool:
    """config.json (written last) and every shard the index names."""
    out = Path(out)
    if not (out / "config.json").is_file():
        return False
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return all((out / f).is_file() for f in set(json.loads(index.read_text())["weight_map"].values()))
    return (out / "model.safetensors").is_file()


def add_shape_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama-1.1b", help="model family and dimensions")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    ap.add_argument("--hidden", type=int, help="hidden size, a multiple of 64 (default: the shape's); MLP and heads "
                    "follow")
    ap.add_argument("--vocab", type=int, help="vocabulary rows (default: the shape's)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    add_shape_arguments(ap)
    ap.add_argument("--dtype", choices=DTYPES, help="default: fp32 for tinyllama-1.1b, bf16 otherwise")
    ap.add_argument("--weights", choices=WEIGHTS, help="default: gaussian for tinyllama-1.1b, decaying otherwise")
    ap.add_argument("--shard-gb", type=float, help="largest shard in GB (default: 0.5 GiB for tinyllama-1.1b, 5 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where the decaying matrices are generated (cuda is faster)")
    ap.add_argument("--no-tokenizer", action="store_true", help="weights and config only")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    args = ap.parse_args()
    try:
        cfg = scaled_config(args.shape, args.layers, args.hidden, args.vocab)
    except ValueError as e:
        ap.error(str(e))
    dtype, weights, shard = DEFAULTS[args.shape]
    if is_complete(args.out):
        print(json.dumps({"dir": args.out, "exists": True}) if args.json else f"{args.out} exists")
        return
    print(f"writing a SYNTHETIC {args.shape} checkpoint (random weights, not a trained model) to {args.out}",
          file=sys.stderr)
    summary = write_checkpoint(args.out, cfg, dtype=args.dtype or dtype, weights=args.weights or weights,
                               seed=args.seed, shard_bytes=int(args.shard_gb * 1e9) if args.shard_gb else shard,
                               device=args.device, tokenizer=not args.no_tokenizer,
                               log=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary))
        return
    n = summary["params"]
    size = f"{summary['tensor_bytes'] / 2**30:.1f} GiB {args.dtype or dtype}"
    print(f"wrote {n / 1e6:.1f}M parameters ({size}, synthetic) to {args.out}")


if __name__ == "__main__":
    main()
