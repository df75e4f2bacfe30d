"""What the exported decoder looks like from outside: its shape parameters and its inputs/outputs, declared once.

The graph follows the convention optimum's ORTModelForCausalLM and onnxruntime-genai use, so one file serves
prefill (sequence_length = prompt length, past_sequence_length = 0) and decode (sequence_length = 1):

    input_ids                 int64  [batch_size, sequence_length]
    attention_mask            int64  [batch_size, total_sequence_length]     1 = attend, 0 = padding
    position_ids              int64  [batch_size, sequence_length]              standard attention only
    logits_to_keep            int64  []   optional, default 0 = all positions; N: logits of the last N positions
    past_key_values.{i}.key   T      [batch_size, num_key_value_heads, past_sequence_length, head_dim]
    past_key_values.{i}.value T      [batch_size, num_key_value_heads, past_sequence_length, head_dim]
      ->
    logits                    T      [batch_size, sequence_length (or logits_to_keep), vocab_size]
    present.{i}.key           T      [batch_size, num_key_value_heads, total_sequence_length, head_dim]
    present.{i}.value         T      [batch_size, num_key_value_heads, total_sequence_length, head_dim]

total_sequence_length = past_sequence_length + sequence_length. T is `ExportOptions.dtype`: float32, or float16 for
--format fp16, --device cuda and --io-dtype float16. Standard-attention graphs take left-padded batches and
position_ids; GroupQueryAttention graphs right-padded batches (row b's tokens first), no position_ids, and their
cache may be one buffer shared by past and present, preallocated to the maximum length (the op then writes each
row's new entries at its own length; present has the buffer's shape).
Callers (qosora.run, onnxruntime-genai) map the cache by name, never by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qosora.errors import QosoraError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")

# Named dynamic axes.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def past_key_name(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value_name(i: int) -> str:
    return f"past_key_values.{i}.value"


def present_key_name(i: int) -> str:
    return f"present.{i}.key"


def present_value_name(i: int) -> str:
    return f"present.{i}.value"


@dataclass(frozen=True)
class DecoderSpec:
    """Shape parameters of a Llama-shaped decoder, read once from config.json and validated here."""

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    inv_freq: tuple[float, ...]  # rotary inverse frequencies [head_dim / 2], scaling (llama3, linear) applied
    rope_type: str
    sliding_window: int | None  # Mistral: keys older than this many positions are masked
    max_position_embeddings: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "DecoderSpec":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise QosoraError(
                f"cannot export architecture {model_type!r}: qosora's ONNX builder supports "
                f"{', '.join(SUPPORTED_ARCHS)} (Llama-shaped decoders)"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise QosoraError(f"cannot export hidden_act={act!r}: the graph builder implements SwiGLU (silu) only")
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise QosoraError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        rope_type, inv_freq = rotary_inv_freq(cfg, head_dim)
        window = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None  # Qwen2 stores a window size but only uses it when use_sliding_window is set
        return cls(
            model_type=model_type,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            inv_freq=tuple(float(v) for v in inv_freq),
            rope_type=rope_type,
            sliding_window=int(window) if window else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )


def _rope_parameters(cfg: dict) -> dict:
    """transformers >= 5 stores `rope_parameters`; older configs have `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    return params


def rotary_inv_freq(cfg: dict, head_dim: int) -> tuple[str, np.ndarray]:
    """Rotary inverse frequencies inv_freq[j] = theta^(-2j / head_dim), with the model's scaling applied.

    llama3 scaling (Llama-3.1+): wavelengths longer than original_max / low_freq_factor are divided by `factor`,
    shorter than original_max / high_freq_factor are kept, the band between is interpolated smoothly.
    linear scaling divides every frequency by `factor`. Returns float32, like transformers computes it.
    """
    p = _rope_parameters(cfg)
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
        raise QosoraError("cannot export partial rotary embeddings (partial_rotary_factor != 1)")
    base = float(p["rope_theta"])
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(base) ** exponent)).astype(np.float32)
    rope_type = p["rope_type"]
    if rope_type == "default":
        return rope_type, inv_freq
    if rope_type == "linear":
        return rope_type, (inv_freq / np.float32(p["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_len = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return rope_type, np.where(medium, smoothed, scaled).astype(np.float32)
    raise QosoraError(
        f"cannot export rope_type={rope_type!r}: supported are default, linear and llama3 rotary embeddings"
    )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[str | int, ...]


# How each attention kind's graph takes a batch of prompts of different lengths (recorded in the model metadata).
PADDING = {"standard": "left", "gqa": "right"}


LOGITS_TO_KEEP = "logits_to_keep"


def graph_inputs(spec: DecoderSpec, dtype: str, attention: str = "standard", keep_logits: bool = False
                 ) -> list[TensorSpec]:
    """position_ids only in standard graphs: GroupQueryAttention derives each row's positions from attention_mask.
    `logits_to_keep` (optional: an initializer holds its default, 0 = every position) makes the lm_head run on the
    last N positions only: a prefill needs one row of logits, not one per prompt token."""
    kv = (BATCH, spec.num_kv_heads, PAST, spec.head_dim)
    out = [
        TensorSpec("input_ids", "int64", (BATCH, SEQ)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
    ]
    if attention == "standard":
        out.append(TensorSpec("position_ids", "int64", (BATCH, SEQ)))
    if keep_logits:
        out.append(TensorSpec(LOGITS_TO_KEEP, "int64", ()))
    for i in range(spec.num_layers):
        out += [TensorSpec(past_key_name(i), dtype, kv), TensorSpec(past_value_name(i), dtype, kv)]
    return out


def graph_outputs(spec: DecoderSpec, dtype: str) -> list[TensorSpec]:
    kv = (BATCH, spec.num_kv_heads, TOTAL, spec.head_dim)
    out = [TensorSpec("logits", dtype, (BATCH, SEQ, spec.vocab_size))]
    for i in range(spec.num_layers):
        out += [TensorSpec(present_key_name(i), dtype, kv), TensorSpec(present_value_name(i), dtype, kv)]
    return out
