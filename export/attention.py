"""Attention subgraphs: the additive mask, rotary embeddings, and grouped-query attention with a KV cache, either in
standard ONNX ops ("standard", any runtime, TensorRT) or as onnxruntime's fused GroupQueryAttention ("gqa").

`ATTENTION[opts.attention](w, spec, linear, dt)` builds the tensors every layer shares (mask and rotary tables, or the
fused op's per-step inputs) and returns `attend(x, layer) -> out`, the attention of one decoder layer before the
residual Add. The two differ in their padding contract: standard graphs take left-padded batches and position_ids
(as optimum and transformers), gqa graphs right-padded ones and no position_ids (as onnxruntime-genai).

Shapes: B batch, S new tokens, P past tokens, T = P + S, H heads, Hkv kv heads, G = H / Hkv, D head dim, E hidden.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from qosora.export.linear import LinearEmitter
from qosora.export.options import ATTENTIONS
from qosora.export.spec import DecoderSpec, past_key_name, past_value_name, present_key_name, present_value_name
from qosora.export.writer import MS_DOMAIN, GraphWriter, onnx_dtype

Attend = Callable[[str, int], str]  # (x [B, S, E], layer) -> attention output [B, S, E], o_proj applied


def attention_mask(w: GraphWriter, spec: DecoderSpec) -> str:
    """Additive float32 mask [B, 1, 1, S, T]: 0 where query s may attend key t, -inf-like elsewhere.

        q_idx = Range(P, T)  [S]      k_idx = Range(0, T)  [T]        (P = T - S, from the input shapes)
        allowed = (k_idx <= q_idx) & (q_idx - k_idx < window) & attention_mask[b, t]
        mask = Where(allowed, 0, finfo(float32).min)

    Causality is by index in the sequence (as transformers' cache_position), padding by attention_mask.
    """
    s = w.op("Gather", [w.op("Shape", ["input_ids"]), w.const(1, np.int64)], axis=0)  # scalar S
    t = w.op("Gather", [w.op("Shape", ["attention_mask"]), w.const(1, np.int64)], axis=0)  # scalar T
    one = w.const(1, np.int64)
    q_idx = w.op("Unsqueeze", [w.op("Range", [w.op("Sub", [t, s]), t, one]), w.const([1], np.int64)])  # [S, 1]
    k_idx = w.op("Range", [w.const(0, np.int64), t, one])  # [T]
    allowed = w.op("LessOrEqual", [k_idx, q_idx])  # [S, T]
    if spec.sliding_window:
        in_window = w.op("Less", [w.op("Sub", [q_idx, k_idx]), w.const(spec.sliding_window, np.int64)])
        allowed = w.op("And", [allowed, in_window])
    pad = w.op("Cast", ["attention_mask"], to=onnx_dtype("bool"))
    pad = w.op("Unsqueeze", [pad, w.const([1, 2, 3], np.int64)])  # [B, 1, 1, 1, T]
    allowed = w.op("And", [allowed, pad])  # [B, 1, 1, S, T]
    return w.op("Where", [allowed, w.const(0.0, np.float32), w.const(np.finfo(np.float32).min, np.float32)])


def standard_attention(w: GraphWriter, spec: DecoderSpec, linear: LinearEmitter, dt: str) -> Attend:
    """The additive mask and the rotary tables, built once; each layer's attention in standard ops (`_attention`).
    Batches may be left-padded (position_ids say where each row's tokens are)."""
    with w.scope("model/mask"):
        mask = attention_mask(w, spec)
    with w.scope("model/rotary"):
        cos, sin = _rotary_tables(w, spec, dt)
    return lambda x, i: _attention(w, spec, linear, x, i, cos, sin, mask, dt)


def _rotary_tables(w: GraphWriter, spec: DecoderSpec, dt: str) -> tuple[str, str]:
    """position_ids [B, S] -> cos, sin [B, 1, S, D] (float32 math, cast to the graph dtype, as transformers does).

        position_ids ─> Cast(f32) ─> Unsqueeze(-1) ─> Mul(inv_freq [D/2]) ─> Concat(f, f) ─> Cos ─> Unsqueeze(1)
                                                                                       └──> Sin ─> Unsqueeze(1)
    """
    inv_freq = w.initializer("model.rotary.inv_freq", np.asarray(spec.inv_freq, np.float32), "rotary")
    pos = w.op("Cast", ["position_ids"], to=onnx_dtype("float32"))
    pos = w.op("Unsqueeze", [pos, w.const([-1], np.int64)])  # [B, S, 1]
    freqs = w.op("Mul", [pos, inv_freq])  # [B, S, D/2]
    emb = w.op("Concat", [freqs, freqs], axis=-1)  # [B, S, D]
    out = []
    for fn in ("Cos", "Sin"):
        t = w.op("Unsqueeze", [w.op(fn, [emb]), w.const([1], np.int64)])  # [B, 1, S, D]
        out.append(w.cast(t, dt, "float32"))
    return out[0], out[1]


def _attention(w: GraphWriter, spec: DecoderSpec, linear: LinearEmitter, x: str, i: int, cos: str, sin: str,
               mask: str, dt: str) -> str:
    """Grouped-query attention with a KV cache, in standard ops.

        x [B,S,E] ─> q_proj ─> [B,H,S,D] ─> rotary ─> Reshape [B,Hkv,G,S,D] ─┐
                  ─> k_proj ─> [B,Hkv,S,D] ─> rotary ─> Concat(past_k, ., axis 2) = present_k [B,Hkv,T,D]
                  ─> v_proj ─> [B,Hkv,S,D] ─────────> Concat(past_v, ., axis 2) = present_v [B,Hkv,T,D]
        scores = q5 @ present_k[:, :, None]^T * D^-0.5 + mask    [B,Hkv,G,S,T]   (softmax in float32)
        out    = softmax(scores) @ present_v[:, :, None]         [B,Hkv,G,S,D] ─> [B,S,H*D] ─> o_proj

    Query head h reads kv head h // G, as transformers' repeat_kv; the broadcast in MatMul avoids copying K/V G times.
    """
    H, Hkv, D, G = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size
    p = f"model.layers.{i}.self_attn"

    def heads(t: str, n: int) -> str:  # [B, S, n*D] -> [B, n, S, D]
        return w.op("Transpose", [w.op("Reshape", [t, w.const([0, 0, n, D], np.int64)])], perm=[0, 2, 1, 3])

    q, k, v = linear.fused(x, [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"], f"{p}.qkv_proj")
    q = _rotary(w, heads(q, H), cos, sin, D)
    k = _rotary(w, heads(k, Hkv), cos, sin, D)
    v = heads(v, Hkv)
    k_all = w.op("Concat", [past_key_name(i), k], axis=2, outputs=[present_key_name(i)])
    v_all = w.op("Concat", [past_value_name(i), v], axis=2, outputs=[present_value_name(i)])

    q5 = w.op("Reshape", [q, w.const([0, Hkv, G, -1, D], np.int64)])  # [B, Hkv, G, S, D]
    axis2 = w.const([2], np.int64)
    k5t = w.op("Transpose", [w.op("Unsqueeze", [k_all, axis2])], perm=[0, 1, 2, 4, 3])  # [B, Hkv, 1, D, T]
    v5 = w.op("Unsqueeze", [v_all, axis2])  # [B, Hkv, 1, T, D]
    scores = w.op("Mul", [w.op("MatMul", [q5, k5t]), w.const(np.array(D ** -0.5, dtype=dt))])
    scores = w.op("Add", [w.cast(scores, "float32", src_dtype=dt), mask])
    probs = w.cast(w.op("Softmax", [scores], axis=-1), dt, "float32")
    ctx = w.op("MatMul", [probs, v5])  # [B, Hkv, G, S, D]
    ctx = w.op("Transpose", [w.op("Reshape", [ctx, w.const([0, H, -1, D], np.int64)])], perm=[0, 2, 1, 3])
    ctx = w.op("Reshape", [ctx, w.const([0, 0, H * D], np.int64)])  # [B, S, H*D]
    return linear(ctx, f"{p}.o_proj")


def _rotary(w: GraphWriter, x: str, cos: str, sin: str, d: int) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., D/2:], x[..., :D/2])  (x [B, n, S, D])."""
    x1, x2 = w.op("Split", [x, w.const([d // 2, d // 2], np.int64)], 2, axis=-1)
    rotated = w.op("Concat", [w.op("Neg", [x2]), x1], axis=-1)
    return w.op("Add", [w.op("Mul", [x, cos]), w.op("Mul", [rotated, sin])])


def gqa_attention(w: GraphWriter, spec: DecoderSpec, linear: LinearEmitter, dt: str) -> Attend:
    """The per-step inputs of onnxruntime's fused GroupQueryAttention, built once (scope model/gqa); each layer's
    attention is one GroupQueryAttention node (`_fused_attention`). The contract onnxruntime-genai's builder and
    onnxruntime's CUDA kernels are made for (no attention_bias, no position_ids: the flash / memory-efficient path):

        seqlens_k = ReduceSum(attention_mask, 1) - 1 (int32 [B])     total_sequence_length = attention_mask.shape[1]
        cos/sin caches [max_positions, D/2] (rotary applied inside the op at each row's own positions)

    Batches are right-padded: row b's tokens are the first seqlens_k[b] + 1 columns of attention_mask, its
    new token goes to cache row seqlens_k[b]. The cache may be one buffer shared by past and present
    (onnxruntime-genai's past_present_share_buffer), preallocated to the maximum length.
    """
    with w.scope("model/gqa"):
        lengths = w.op("ReduceSum", ["attention_mask", w.const([1], np.int64)], keepdims=0)  # [B]
        seqlens_k = w.op("Cast", [w.op("Sub", [lengths, w.const(1, np.int64)])], to=onnx_dtype("int32"))
        t = w.op("Gather", [w.op("Shape", ["attention_mask"]), w.const(1, np.int64)], axis=0)  # scalar T
        total = w.op("Cast", [t], to=onnx_dtype("int32"))
        positions = np.arange(spec.max_position_embeddings, dtype=np.float32)[:, None]
        freqs = positions * np.asarray(spec.inv_freq, np.float32)[None, :]  # [max_positions, D/2]
        cos = w.initializer("model.rotary.cos_cache", np.cos(freqs).astype(dt), "rotary")
        sin = w.initializer("model.rotary.sin_cache", np.sin(freqs).astype(dt), "rotary")
    return lambda x, i: _fused_attention(w, spec, linear, x, i, (seqlens_k, total, cos, sin))


def _fused_attention(w: GraphWriter, spec: DecoderSpec, linear: LinearEmitter, x: str, i: int, shared) -> str:
    """Grouped-query attention as one com.microsoft GroupQueryAttention node fed the packed QKV projection
    (rotary inside, KV cache BNSH; a sliding window as `local_window_size`):

        x ─> qkv_proj [B, S, (H + 2 Hkv) D] ─> GroupQueryAttention(qkv, -, -, past_k, past_v, seqlens_k, T, cos, sin)
                                                  ├─> out [B, S, H*D] ─> o_proj
                                                  └─> present_k, present_v [B, Hkv, T or the buffer's length, D]
    """
    seqlens_k, total, cos, sin = shared
    p = f"model.layers.{i}.self_attn"
    qkv = linear.packed(x, [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"], f"{p}.qkv_proj")
    out = w.op("GroupQueryAttention",
               [qkv, "", "", past_key_name(i), past_value_name(i), seqlens_k, total, cos, sin],
               outputs=[f"/model/layers.{i}/self_attn/attention", present_key_name(i), present_value_name(i)],
               domain=MS_DOMAIN, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1,
               local_window_size=spec.sliding_window or -1, scale=float(spec.head_dim ** -0.5))[0]
    return linear(out, f"{p}.o_proj")


ATTENTION: dict[str, Callable[[GraphWriter, DecoderSpec, LinearEmitter, str], Attend]] = {
    "standard": standard_attention,
    "gqa": gqa_attention,
}
assert set(ATTENTION) == set(ATTENTIONS), f"attention kinds {sorted(ATTENTION)} != options.Attention"
