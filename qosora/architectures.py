"""Which Hugging Face architectures qosora supports and where their adapted linears live.

All supported models are Llama-shaped decoders: the linears are named
`model.layers.{i}.self_attn.{q,k,v,o}_proj` and `model.layers.{i}.mlp.{gate,up,down}_proj`.
"""

from __future__ import annotations

import re

from qosora.errors import QosoraError

SUPPORTED = ("llama", "mistral", "qwen2")

_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def check_supported(hf_config: dict, where: str = "") -> str:
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED:
        raise QosoraError(
            f"unsupported architecture {model_type!r}{f' in {where}' if where else ''}: "
            f"qosora supports {', '.join(SUPPORTED)} (Llama-shaped decoders)"
        )
    return model_type


def parse_linear(module: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj` -> (3, 'up_proj'); None for anything that is not an adaptable linear."""
    m = _LINEAR.match(module)
    return (int(m.group(1)), m.group(3)) if m else None


def layer_index(tensor_name: str) -> int:
    """Decoder layer of a tensor, -1 before the layers (embeddings), a large number after (final norm, lm_head)."""
    m = re.match(r"^model\.layers\.(\d+)\.", tensor_name)
    if m:
        return int(m.group(1))
    return -1 if "embed" in tensor_name else 1 << 30
