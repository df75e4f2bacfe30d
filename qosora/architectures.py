"""Which Hugging Face architectures qosora supports, where their adapted linears live, and whether a config.json
describes the weights beside it.

All supported models are Llama-shaped decoders: the linears are named
`model.layers.{i}.self_attn.{q,k,v,o}_proj` and `model.layers.{i}.mlp.{gate,up,down}_proj`, with shapes

    q_proj (heads * head_dim, hidden)     k_proj, v_proj (kv_heads * head_dim, hidden)    o_proj (hidden, heads * head_dim)
    gate_proj, up_proj (intermediate, hidden)                                              down_proj (hidden, intermediate)
    embed_tokens (vocab, hidden)          lm_head (vocab, hidden), absent when tied to the embedding
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from qosora.errors import QosoraError

SUPPORTED = ("llama", "mistral", "qwen2")

_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_JSON_KINDS = {list: "an array", type(None): "null", str: "a string", int: "a number", float: "a number",
               bool: "a boolean"}
_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def read_hf_config(model_dir: str | Path) -> dict:
    """`model_dir/config.json` as a dict; a missing directory or file, bad JSON or a non-object is a QosoraError."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "is a file, not a directory" if model_dir.exists() else "does not exist"
        raise QosoraError(f"model directory {model_dir} {what}: pass a local Hugging Face model directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise QosoraError(f"{model_dir} has no config.json: pass a Hugging Face model directory (config.json + safetensors)")
    return read_json_object(path, "re-download the model or restore its config.json")


def read_json_object(path: Path, fix: str) -> dict:
    """A JSON file that must hold one object (config.json, generation_config.json ...)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QosoraError(f"{path} is not valid JSON ({type(e).__name__}: {e}): {fix}") from None
    if not isinstance(value, dict):
        raise QosoraError(f"{path} holds {_JSON_KINDS.get(type(value), 'a non-object')} where a JSON object belongs: {fix}")
    return value


def check_supported(hf_config: dict, where: str = "") -> str:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise QosoraError(
            f"unsupported architecture {model_type!r}{f' in {where}' if where else ''}: "
            f"qosora supports {', '.join(SUPPORTED)} (Llama-shaped decoders)"
        )
    return model_type


def config_sizes(hf_config: dict, where: str) -> dict[str, int]:
    """The sizes of a Llama-shaped config.json, each a positive integer, head_dim and kv heads filled in."""
    sizes = {}
    for key in (*_SIZES, "num_key_value_heads", "head_dim"):
        value = hf_config.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim"):
            continue
        if value is None:
            raise QosoraError(f"{where} lacks {key!r}: pass a Llama-shaped config.json")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise QosoraError(f"{where}: {key} = {value!r} is not a positive integer: fix config.json")
        sizes[key] = value
    sizes.setdefault("num_key_value_heads", sizes["num_attention_heads"])
    sizes.setdefault("head_dim", sizes["hidden_size"] // sizes["num_attention_heads"])
    return sizes


def expected_linear_shapes(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each linear of one decoder layer, from `config_sizes`."""
    h, i = sizes["hidden_size"], sizes["intermediate_size"]
    q, kv = sizes["num_attention_heads"] * sizes["head_dim"], sizes["num_key_value_heads"] * sizes["head_dim"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def check_config_matches_weights(hf_config: dict, names: list[str], shape: Callable[[str], tuple[int, ...]],
                                 where: str) -> None:
    """Refuse a config.json that does not describe the checkpoint's tensors (names, `shape(name)`).

    Checked: every layer 0..num_hidden_layers-1 has its seven linears with the shapes the config implies (hidden,
    heads * head_dim, kv heads, intermediate) and no tensor lies beyond them; the embedding is (vocab, hidden);
    an untied lm_head is present with the same shape. A mismatch would write a complete-looking directory that every
    later verb crashes on.
    """
    cfg = f"{where}/config.json"
    sizes = config_sizes(hf_config, cfg)
    fix = "the config does not belong to these weights: fix config.json or re-download the model"
    present = set(names)
    h, vocab, n_layers = sizes["hidden_size"], sizes["vocab_size"], sizes["num_hidden_layers"]
    layers = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    beyond = sorted(i for i in layers if i >= n_layers)
    if beyond:
        raise QosoraError(f"{cfg} says num_hidden_layers={n_layers} but the weights have layer {beyond[0]}: {fix}")
    shapes = expected_linear_shapes(sizes)
    for layer in range(n_layers):
        for proj, expected in shapes.items():
            name = f"model.layers.{layer}.{'mlp' if proj in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{proj}.weight"
            if name not in present:
                raise QosoraError(f"{cfg} says num_hidden_layers={n_layers} but {name} is missing: {fix}")
            if tuple(shape(name)) != expected:
                raise QosoraError(f"{name} has shape {tuple(shape(name))} but {cfg} implies {expected} "
                                  f"({_explain(proj, sizes)}): {fix}")
    for name, required in (("model.embed_tokens.weight", True),
                           ("lm_head.weight", not hf_config.get("tie_word_embeddings", False))):
        if name not in present:
            if required:
                raise QosoraError(f"{name} is missing from the weights in {where}: {fix}")
            continue
        if tuple(shape(name)) != (vocab, h):
            raise QosoraError(f"{name} has shape {tuple(shape(name))} but {cfg} says vocab_size={vocab}, "
                              f"hidden_size={h}: {fix}")


def _explain(proj: str, s: dict[str, int]) -> str:
    if proj == "q_proj" or proj == "o_proj":
        return f"num_attention_heads={s['num_attention_heads']} x head_dim={s['head_dim']}, hidden_size={s['hidden_size']}"
    if proj in ("k_proj", "v_proj"):
        return f"num_key_value_heads={s['num_key_value_heads']} x head_dim={s['head_dim']}, hidden_size={s['hidden_size']}"
    return f"intermediate_size={s['intermediate_size']}, hidden_size={s['hidden_size']}"


def parse_linear(module: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj` -> (3, 'up_proj'); None for anything that is not an adaptable linear."""
    m = _LINEAR.match(module)
    return (int(m.group(1)), m.group(3)) if m else None


def layer_index(tensor_name: str) -> int:
    """Decoder layer of a tensor, -1 before the layers (embeddings), a large number after (final norm, lm_head)."""
    m = _LAYER.match(tensor_name)
    if m:
        return int(m.group(1))
    return -1 if "embed" in tensor_name else 1 << 30
