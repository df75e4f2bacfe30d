"""Build a Llama-shaped decoder graph with a KV cache directly from tensors, one layer at a time.

No tracing: tracing needs the whole float32 model in memory and pins the exporter to one transformers version.
Each function below builds one subgraph in standard ONNX ops (so trt-int4 graphs stay in the default domain); the
linears come from `formats.LinearEmitter`, which is where the formats differ. onnxruntime's own optimizer fuses the
RMSNorm pattern into SimplifiedLayerNormalization and the int4 DequantizeLinear -> MatMul pattern into MatMulNBits
at session creation.

Shapes in comments: B batch, S new tokens, P past tokens, T = P + S, H heads, Hkv kv heads, G = H / Hkv, D head dim,
E hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qosora.export import spec as io
from qosora.export.formats import ExportOptions, Int4Table, LinearEmitter
from qosora.export.quantizers import int4_relative_error, quantize_int4
from qosora.export.source import WeightSource
from qosora.export.writer import MS_DOMAIN, GraphWriter, value_info

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass
class BuildResult:
    model_path: Path
    spec: io.DecoderSpec
    layer_errors: dict[str, dict] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)


def build_decoder_graph(src: WeightSource, opts: ExportOptions, out_dir: Path,
                        progress: Callable[[int, int], None] | None = None) -> BuildResult:
    """Write out_dir/model.onnx (+ model.onnx.data) for `src` in format `opts.format`.

        input_ids ─> embed ─> [decoder layer i, past_i -> present_i] x L ─> RMSNorm ─> lm_head ─> logits
                               ^ rotary cos/sin (from position_ids), additive mask (attention_mask, causal)
    """
    opts = opts.validate()
    spec = io.DecoderSpec.from_hf_config(src.hf_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = GraphWriter(out_dir / DATA_FILE)
    try:
        linear = LinearEmitter(w, src, opts)
        dt = opts.dtype
        embed_q = None
        with w.scope("model/embed_tokens"):
            hidden, embed_q = _embedding(w, src, opts, spec, linear)
        with w.scope("model/mask"):
            mask = _attention_mask(w, spec)
        if opts.attention == "gqa":
            with w.scope("model/gqa"):
                attend = _gqa_inputs(w, spec, linear, mask, dt)
        else:
            with w.scope("model/rotary"):
                cos, sin = _rotary_tables(w, spec, dt)
            attend = lambda x, i: _attention(w, spec, linear, x, i, cos, sin, mask, dt)  # noqa: E731
        for i in range(spec.num_layers):
            with w.scope(f"model/layers.{i}"):
                hidden = _decoder_layer(w, src, spec, linear, hidden, i, attend, dt)
            if progress:
                progress(i + 1, spec.num_layers)
        with w.scope("model/norm"):
            hidden = _rms_norm(w, hidden, w.initializer("model.norm.weight", src.tensor("model.norm.weight").astype(dt), "norm"),
                               spec.rms_norm_eps, dt)
        with w.scope("lm_head"):
            _lm_head(w, src, opts, spec, linear, hidden, embed_q)
        inputs = [value_info(t.name, t.dtype, t.shape) for t in io.graph_inputs(spec, dt)]
        outputs = [value_info(t.name, t.dtype, t.shape) for t in io.graph_outputs(spec, dt)]
        model_path = out_dir / MODEL_FILE
        w.finish(inputs, outputs, model_path, doc=f"qosora {opts.format} decoder ({spec.model_type})",
                 metadata={"qosora.format": opts.format, "qosora.model_type": spec.model_type},
                 uses_ms_domain=w.uses_ms_domain)
    finally:
        w.close()
    return BuildResult(model_path, spec, linear.errors, dict(w.op_counts), dict(w.bytes_by_kind),
                       sorted({n.domain or "ai.onnx" for n in w.nodes}))


# -- embedding and lm_head ------------------------------------------------------------------------------------

def _embedding(w: GraphWriter, src: WeightSource, opts: ExportOptions, spec: io.DecoderSpec, linear: LinearEmitter):
    """input_ids [B, S] -> hidden [B, S, E].

    int4 with --quantize-embedding: GatherBlockQuantized over the int4 table (shared with a tied lm_head);
    otherwise a plain Gather over the dense table. GatherBlockQuantized takes uint8 zero points only, so float
    zero points add their block offsets after the gather:

        input_ids ─> GatherBlockQuantized(codes, scales, round(z)) ─> Reshape [B,S,nb,bs] ─> Add ─> Reshape [B,S,E]
                  └> Gather(offsets^T [nb, V], axis 1) ─> Transpose ─> Unsqueeze(-1) ──────┘
    """
    table = src.tensor("model.embed_tokens.weight")  # [V, E]
    bs = opts.block_size
    if opts.format == "int4" and opts.quantize_embedding and spec.hidden_size % bs == 0:
        q = quantize_int4(table, bs, opts.int4_scheme)
        linear.errors["model.embed_tokens"] = {"shape": list(table.shape),
                                               "rel_error": int4_relative_error(table, q)}
        v, nb = table.shape[0], spec.hidden_size // bs
        del table
        t = linear.int4_table("model.embed_tokens", q)
        inputs = [w.op("Reshape", [t.data, w.const([v, spec.hidden_size // 2], np.int64)]), "input_ids",
                  w.op("Reshape", [t.scales, w.const([v, -1], np.int64)])] + ([t.zero_points] if t.zero_points else [])
        hidden = w.op("GatherBlockQuantized", inputs, domain=MS_DOMAIN, bits=4, block_size=bs,
                      gather_axis=0, quantize_axis=1)
        if t.offsets_t:  # Gather(offsets^T [nb, V], ids, axis 1) [nb, B, S] -> [B, S, nb, 1]
            off = w.op("Transpose", [w.op("Gather", [t.offsets_t, "input_ids"], axis=1)], perm=[1, 2, 0])
            blocks = w.op("Reshape", [hidden, w.const([0, 0, nb, bs], np.int64)])
            off = w.op("Unsqueeze", [off, w.const([-1], np.int64)])
            hidden = w.op("Reshape", [w.op("Add", [blocks, off]), w.const([0, 0, spec.hidden_size], np.int64)])
        return hidden, t
    emb = w.initializer("model.embed_tokens.weight", table.astype(opts.dtype, copy=False), "embedding")
    return w.op("Gather", [emb, "input_ids"], axis=0), None


def _lm_head(w: GraphWriter, src: WeightSource, opts: ExportOptions, spec: io.DecoderSpec,
             linear: LinearEmitter, hidden: str, embed_q: Int4Table | None) -> None:
    """hidden [B, S, E] -> logits [B, S, V]; int4 formats quantize it (a third of a small model's weights)."""
    tied = spec.tie_word_embeddings or not src.has_tensor("lm_head.weight")
    if opts.format in ("int4", "trt-int4") and opts.quantize_lm_head:
        if opts.format == "int4" and tied and embed_q is not None:
            # Reuse the embedding's int4 table: MatMulNBits reads B [V, E/bs, bs/2] (same bytes).
            w.op("Identity", [linear.apply_int4(hidden, embed_q)], outputs=["logits"])
            linear.errors["lm_head"] = dict(linear.errors["model.embed_tokens"], note="shared with embedding")
            return
        weight = src.tensor("lm_head.weight")
        q = linear._int4(weight, "lm_head")
        linear.errors["lm_head"] = {"shape": list(weight.shape), "rel_error": int4_relative_error(weight, q)}
        del weight
        if opts.format == "trt-int4":
            w.op("MatMul", [hidden, linear.dequantize_linear("lm_head", q)], outputs=["logits"])
        else:
            w.op("Identity", [linear.matmul_nbits(hidden, "lm_head", q)], outputs=["logits"])
        return
    if tied and opts.format in ("fp32", "fp16") and "model.embed_tokens.weight" in {t.name for t in w.initializers}:
        # Tied dense head: one table, transposed at run time by MatMul's second operand.
        w.op("MatMul", [hidden, w.op("Transpose", ["model.embed_tokens.weight"], perm=[1, 0])], outputs=["logits"])
        return
    weight_t = np.ascontiguousarray(src.tensor("lm_head.weight").T, dtype=opts.dtype)  # one copy of a V x E table
    w.op("MatMul", [hidden, w.initializer("lm_head.weight_t", weight_t, "dense")], outputs=["logits"])


# -- shared per-step tensors -----------------------------------------------------------------------------------

def _rotary_tables(w: GraphWriter, spec: io.DecoderSpec, dt: str) -> tuple[str, str]:
    """position_ids [B, S] -> cos, sin [B, 1, S, D] (float32 math, cast to the graph dtype, as transformers does).

        position_ids ─> Cast(f32) ─> Unsqueeze(-1) ─> Mul(inv_freq [D/2]) ─> Concat(f, f) ─> Cos ─> Unsqueeze(1)
                                                                                       └──> Sin ─> Unsqueeze(1)
    """
    inv_freq = w.initializer("model.rotary.inv_freq", np.asarray(spec.inv_freq, np.float32), "rotary")
    pos = w.op("Unsqueeze", [w.op("Cast", ["position_ids"], to=1), w.const([-1], np.int64)])  # [B, S, 1]
    freqs = w.op("Mul", [pos, inv_freq])  # [B, S, D/2]
    emb = w.op("Concat", [freqs, freqs], axis=-1)  # [B, S, D]
    out = []
    for fn in ("Cos", "Sin"):
        t = w.op("Unsqueeze", [w.op(fn, [emb]), w.const([1], np.int64)])  # [B, 1, S, D]
        out.append(_cast(w, t, dt, "float32"))
    return out[0], out[1]


def _attention_mask(w: GraphWriter, spec: io.DecoderSpec) -> str:
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
    pad = w.op("Unsqueeze", [w.op("Cast", ["attention_mask"], to=9), w.const([1, 2, 3], np.int64)])  # [B,1,1,1,T]
    allowed = w.op("And", [allowed, pad])  # [B, 1, 1, S, T]
    return w.op("Where", [allowed, w.const(0.0, np.float32), w.const(np.finfo(np.float32).min, np.float32)])


# -- decoder layer ---------------------------------------------------------------------------------------------

def _decoder_layer(w, src, spec, linear, hidden, i, attend, dt) -> str:
    """
        hidden ─┬─> RMSNorm ─> attention(past_i -> present_i) ─> Add ─┬─> RMSNorm ─> SwiGLU MLP ─> Add ─> out
                └──────────────────────────────────────────────────────┘└───────────────────────────────┘
    """
    p = f"model.layers.{i}"
    with w.scope("input_layernorm"):
        g = w.initializer(f"{p}.input_layernorm.weight", src.tensor(f"{p}.input_layernorm.weight").astype(dt), "norm")
        x = _rms_norm(w, hidden, g, spec.rms_norm_eps, dt)
    with w.scope("self_attn"):
        hidden = w.op("Add", [hidden, attend(x, i)])
    with w.scope("post_attention_layernorm"):
        g = w.initializer(f"{p}.post_attention_layernorm.weight",
                          src.tensor(f"{p}.post_attention_layernorm.weight").astype(dt), "norm")
        x = _rms_norm(w, hidden, g, spec.rms_norm_eps, dt)
    with w.scope("mlp"):
        return w.op("Add", [hidden, _mlp(w, linear, x, p)])


def _rms_norm(w: GraphWriter, x: str, gamma: str, eps: float, dt: str) -> str:
    """y = gamma * (x / sqrt(mean(x^2, -1) + eps)), the statistics in float32.

        x ─> Cast(f32) ─┬─> Mul(x, x) ─> ReduceMean(-1) ─> Add(eps) ─> Sqrt ─> Reciprocal ─┐
                        └─────────────────────────────────────────────────────────────── Mul ─> Cast(dt) ─> Mul(gamma)
    """
    x32 = _cast(w, x, "float32", src_dtype=dt)
    var = w.op("ReduceMean", [w.op("Mul", [x32, x32]), w.const([-1], np.int64)], keepdims=1)
    inv = w.op("Reciprocal", [w.op("Sqrt", [w.op("Add", [var, w.const(np.float32(eps))])])])
    return w.op("Mul", [gamma, _cast(w, w.op("Mul", [x32, inv]), dt, "float32")])


def _attention(w, spec: io.DecoderSpec, linear: LinearEmitter, x: str, i: int, cos: str, sin: str, mask: str,
               dt: str) -> str:
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
    k_all = w.op("Concat", [io.past_key_name(i), k], axis=2, outputs=[io.present_key_name(i)])
    v_all = w.op("Concat", [io.past_value_name(i), v], axis=2, outputs=[io.present_value_name(i)])

    q5 = w.op("Reshape", [q, w.const([0, Hkv, G, -1, D], np.int64)])  # [B, Hkv, G, S, D]
    axis2 = w.const([2], np.int64)
    k5t = w.op("Transpose", [w.op("Unsqueeze", [k_all, axis2])], perm=[0, 1, 2, 4, 3])  # [B, Hkv, 1, D, T]
    v5 = w.op("Unsqueeze", [v_all, axis2])  # [B, Hkv, 1, T, D]
    scores = w.op("Mul", [w.op("MatMul", [q5, k5t]), w.const(np.array(D ** -0.5, dtype=dt))])
    scores = w.op("Add", [_cast(w, scores, "float32", src_dtype=dt), mask])
    probs = _cast(w, w.op("Softmax", [scores], axis=-1), dt, "float32")
    ctx = w.op("MatMul", [probs, v5])  # [B, Hkv, G, S, D]
    ctx = w.op("Transpose", [w.op("Reshape", [ctx, w.const([0, H, -1, D], np.int64)])], perm=[0, 2, 1, 3])
    ctx = w.op("Reshape", [ctx, w.const([0, 0, H * D], np.int64)])  # [B, S, H*D]
    return linear(ctx, f"{p}.o_proj")


def _gqa_inputs(w: GraphWriter, spec: io.DecoderSpec, linear: LinearEmitter, mask: str, dt: str):
    """The per-step inputs of onnxruntime's fused GroupQueryAttention, built once; returns attend(x, layer).

        T = attention_mask.shape[1] ─> Cast(int32) = total_sequence_length;  Expand(T - 1, [B]) = seqlens_k
        cos/sin caches [max_positions, D/2] (rotary applied inside the op at position_ids)
        mask [B,1,1,S,T] ─> Squeeze(1) = attention_bias [B,1,S,T]   (padding and the sliding window, as in the
                                                                      standard path; the op adds causality)

    Every cache row counts as valid (seqlens_k = T - 1): padding is masked by the bias, so left padding and
    position_ids behave exactly as in the standard-op graph.
    """
    t = w.op("Gather", [w.op("Shape", ["attention_mask"]), w.const([1], np.int64)], axis=0)  # [1]
    batch = w.op("Gather", [w.op("Shape", ["attention_mask"]), w.const([0], np.int64)], axis=0)  # [1]
    total = w.op("Cast", [w.op("Squeeze", [t])], to=6)  # int32 scalar
    seqlens_k = w.op("Cast", [w.op("Expand", [w.op("Sub", [t, w.const([1], np.int64)]), batch])], to=6)  # [B]
    bias = _cast(w, w.op("Squeeze", [mask, w.const([1], np.int64)]), dt, "float32")
    positions = np.arange(spec.max_position_embeddings, dtype=np.float32)[:, None]
    freqs = positions * np.asarray(spec.inv_freq, np.float32)[None, :]  # [max_positions, D/2]
    cos = w.initializer("model.rotary.cos_cache", np.cos(freqs).astype(dt), "rotary")
    sin = w.initializer("model.rotary.sin_cache", np.sin(freqs).astype(dt), "rotary")
    return lambda x, i: _fused_attention(w, spec, linear, x, i, (seqlens_k, total, cos, sin, bias))


def _fused_attention(w: GraphWriter, spec: io.DecoderSpec, linear: LinearEmitter, x: str, i: int, shared) -> str:
    """Grouped-query attention as one com.microsoft GroupQueryAttention node (rotary inside, KV cache BNSH):

        x ─> q/k/v proj ─> GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, T, cos, sin, position_ids, bias)
                               ├─> out [B, S, H*D] ─> o_proj
                               └─> present_k, present_v [B, Hkv, T, D]
    """
    seqlens_k, total, cos, sin, bias = shared
    p = f"model.layers.{i}.self_attn"
    q, k, v = linear.fused(x, [f"{p}.q_proj", f"{p}.k_proj", f"{p}.v_proj"], f"{p}.qkv_proj")
    out = w.op("GroupQueryAttention",
               [q, k, v, io.past_key_name(i), io.past_value_name(i), seqlens_k, total, cos, sin, "position_ids", bias],
               outputs=[f"/model/layers.{i}/self_attn/attention", io.present_key_name(i), io.present_value_name(i)],
               domain=MS_DOMAIN, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1,
               scale=float(spec.head_dim ** -0.5))[0]
    return linear(out, f"{p}.o_proj")


def _rotary(w: GraphWriter, x: str, cos: str, sin: str, d: int) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., D/2:], x[..., :D/2])  (x [B, n, S, D])."""
    x1, x2 = w.op("Split", [x, w.const([d // 2, d // 2], np.int64)], 2, axis=-1)
    rotated = w.op("Concat", [w.op("Neg", [x2]), x1], axis=-1)
    return w.op("Add", [w.op("Mul", [x, cos]), w.op("Mul", [rotated, sin])])


def _mlp(w: GraphWriter, linear: LinearEmitter, x: str, p: str) -> str:
    """SwiGLU: down( silu(gate(x)) * up(x) ),  silu(g) = g * sigmoid(g).

        x ─┬─> gate_proj ─> Sigmoid ─> Mul(g) ─┐
           └─> up_proj ──────────────────────── Mul ─> down_proj      (int4: gate and up are one fused MatMulNBits)
    """
    g, u = linear.fused(x, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
    act = w.op("Mul", [g, w.op("Sigmoid", [g])])
    return linear(w.op("Mul", [act, u]), f"{p}.mlp.down_proj")


def _cast(w: GraphWriter, x: str, to: str, src_dtype: str) -> str:
    """Cast x (of dtype src_dtype) to `to`; no node when they agree."""
    if src_dtype == to:
        return x
    return w.op("Cast", [x], to=1 if to == "float32" else 10)
