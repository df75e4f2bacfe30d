"""Export formats: how one linear layer (and the embedding / lm_head) becomes ONNX nodes, one registered emitter each.

| format   | adapted linear y = x W^T (+ b)                                       | domain        |
|----------|----------------------------------------------------------------------|---------------|
| fp32     | MatMul(x, W_merged^T)                                                | default       |
| fp16     | same, weights and activations float16                               | default       |
| int4     | MatMulNBits(x, int4(W_merged)) (+ block offsets of float zero points) | com.microsoft |
|          | --keep-principal: MatMulNBits(x, int4(W_res)) + (x A^T) B^T          |               |
| nf4      | MatMulBnb4(x, NF4(W_res)) + (x A^T) B^T   (the trained function)     | com.microsoft |
| trt-int4 | MatMul(x, DequantizeLinear(int4 W^T [K, N], scale [K/bs, N], axis 0)) | default only  |

W_merged = deq(NF4(W_res)) + B A is requantized once, here, and the error ||W_merged - deq(q(.))||_F / ||W_merged||_F
of every linear is recorded for the export report.

A format is one linear emitter registered under its name (`@register_format("name", ...)`), plus, where it differs
from the dense default, its fused projections, embedding and lm_head. The names are `options.Format`'s values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from qosora.export.int4 import Int4Blocks, concat_rows, dequantize_int4, int4_relative_error
from qosora.export.linear import EmitFused, EmitLinear, Int4Table, LinearEmitter
from qosora.export.options import FORMATS
from qosora.export.spec import DecoderSpec
from qosora.export.writer import MS_DOMAIN

EMBED, HEAD = "model.embed_tokens", "lm_head"
_BNB4_NF4 = 1  # MatMulBnb4 quant_type (0 is FP4)

Int4MatMul = Callable[[str, str, Int4Blocks], str]  # (x, name, q) -> x W^T
# (linear, spec) -> hidden [B, S, E], and the int4 table a tied head may reuse (None: none)
EmitEmbedding = Callable[[LinearEmitter, DecoderSpec], tuple[str, Int4Table | None]]
EmitHead = Callable[[LinearEmitter, DecoderSpec, str, Int4Table | None], None]  # writes "logits"


def dense_embedding(linear: LinearEmitter, spec: DecoderSpec) -> tuple[str, None]:
    """input_ids [B, S] -> Gather(table [V, E]) -> hidden [B, S, E]."""
    table = linear.src.tensor(EMBED + ".weight")  # [V, E]
    emb = linear.w.initializer(EMBED + ".weight", table.astype(linear.dtype, copy=False), "embedding")
    return linear.w.op("Gather", [emb, "input_ids"], axis=0), None


def dense_lm_head(linear: LinearEmitter, spec: DecoderSpec, hidden: str, embedding: Int4Table | None) -> None:
    """hidden [B, S, E] -> MatMul(W^T [E, V]) -> logits [B, S, V]."""
    weight_t = np.ascontiguousarray(linear.src.tensor(HEAD + ".weight").T, dtype=linear.dtype)  # one V x E copy
    linear.w.op("MatMul", [hidden, linear.w.initializer(HEAD + ".weight_t", weight_t, "dense")], outputs=["logits"])


def _tied(linear: LinearEmitter, spec: DecoderSpec) -> bool:
    return spec.tie_word_embeddings or not linear.src.has_tensor(HEAD + ".weight")


@dataclass(frozen=True)
class FormatEmitter:
    """What `graph.build_decoder_graph` asks a format for."""

    linear: EmitLinear  # one linear: x -> x W^T
    fused: EmitFused | None = None  # q/k/v and gate/up as one kernel; None: one linear each
    embedding: EmitEmbedding = dense_embedding
    lm_head: EmitHead = dense_lm_head


FORMAT_EMITTERS: dict[str, FormatEmitter] = {}


def register_format(name: str, *, fused: EmitFused | None = None, embedding: EmitEmbedding = dense_embedding,
                    lm_head: EmitHead = dense_lm_head) -> Callable[[EmitLinear], EmitLinear]:
    """`@register_format("name", ...)` on a linear emitter makes it format `name`'s, with the other parts given."""
    def register(emit: EmitLinear) -> EmitLinear:
        FORMAT_EMITTERS[name] = FormatEmitter(emit, fused, embedding, lm_head)
        return emit

    return register


# -- fp32 / fp16 ------------------------------------------------------------------------------------------------

def tied_dense_lm_head(linear: LinearEmitter, spec: DecoderSpec, hidden: str, embedding: Int4Table | None) -> None:
    """A tied head reads the dense embedding table, transposed at run time by MatMul's second operand."""
    if not _tied(linear, spec):
        return dense_lm_head(linear, spec, hidden, embedding)
    w = linear.w
    w.op("MatMul", [hidden, w.op("Transpose", [EMBED + ".weight"], perm=[1, 0])], outputs=["logits"])


@register_format("fp32", lm_head=tied_dense_lm_head)
@register_format("fp16", lm_head=tied_dense_lm_head)
def dense_linear(linear: LinearEmitter, x: str, module: str) -> str:
    """MatMul(x, W^T [K, N]), W the merged weight in the graph dtype."""
    weight = linear.src.dense(module)
    wt = weight.T.astype(linear.dtype)
    linear.record(module, weight, wt.T.astype(np.float32, copy=False))
    return linear.w.op("MatMul", [x, linear.w.initializer(module + ".weight_t", wt, "dense")])


# -- nf4 --------------------------------------------------------------------------------------------------------

@register_format("nf4")
def nf4_linear(linear: LinearEmitter, x: str, module: str) -> str:
    """The stored function itself; linears without an adapter are dense.

        x ──> MatMulBnb4(NF4 W_res, absmax) ─────────────┐
        │                                                 Add ──> y
        └──> MatMul(A^T [K, r]) ──> MatMul(B^T [r, N]) ──┘
    """
    if not linear.src.is_adapted(module):
        return dense_linear(linear, x, module)
    w, p = linear.w, linear.src.nf4(module)
    n, k = p.shape
    y = w.op("MatMulBnb4", [
        x,
        w.initializer(module + ".nf4", np.ascontiguousarray(p.data, dtype=np.uint8), "nf4"),
        w.initializer(module + ".absmax", p.absmax.astype(linear.dtype), "scales"),
    ], domain=MS_DOMAIN, K=k, N=n, block_size=p.blocksize, quant_type=_BNB4_NF4)
    b, a = linear.src.lowrank(module)
    linear.errors[module] = {"shape": [n, k], "rel_error": 0.0, "kept_rank": int(a.shape[0]), "note": "NF4 kept"}
    return w.op("Add", [y, linear.lowrank_branch(x, module, b, a)])


# -- int4 (MatMulNBits) and trt-int4 (DequantizeLinear) ---------------------------------------------------------

def _int4_linear(linear: LinearEmitter, x: str, module: str, matmul: Int4MatMul) -> str:
    """matmul(x, int4(W_merged)); with --keep-principal, matmul(x, int4(W_res)) + (x A^T) B^T."""
    if not (linear.opts.keep_principal and linear.src.is_adapted(module)):
        return matmul(x, module, linear.quantize_merged(module))
    res = linear.src.residual_dense(module)
    b, a = linear.src.lowrank(module)
    note: dict = {}
    q = linear.int4(res, module, note)  # the branch stays exact, so the residual's error under H is the layer's
    merged = res + b @ a
    linear.record(module, merged, dequantize_int4(q) + b @ a, kept_rank=a.shape[0])
    linear.errors[module].update(note)
    del res, merged
    return linear.w.op("Add", [matmul(x, module, q), linear.lowrank_branch(x, module, b, a)])


def fused_matmul_nbits(linear: LinearEmitter, x: str, modules: list[str], name: str, pack: bool) -> list[str]:
    """Several linears reading the same x (q/k/v, gate/up) as one MatMulNBits and a Split: one kernel launch
    instead of three, and the block-offset term of float zero points computed once.

        x ──> MatMulNBits([W_q; W_k; W_v]) (+ [b_q; b_k; b_v]) ──> Split(N_q, N_k, N_v) ──> q, k, v
                                                               └─> (pack) qkv, as GroupQueryAttention reads it

    Rows are quantized one module at a time (blocks run along K), so the codes equal the unfused export's.
    --keep-principal emits one linear per module.
    """
    if linear.opts.keep_principal:
        return [linear(x, m) for m in modules]
    w = linear.w
    parts = [linear.quantize_merged(m, fused=name) for m in modules]
    y = linear.matmul_nbits(x, name, concat_rows(parts))
    biases = [linear.src.bias(m) for m in modules]
    if any(b is not None for b in biases):
        full = [np.zeros(p.codes.shape[0], np.float32) if b is None else b for p, b in zip(parts, biases)]
        y = w.op("Add", [y, w.initializer(name + ".bias", np.concatenate(full).astype(linear.dtype), "bias")])
    if pack:
        return [y]
    sizes = [p.codes.shape[0] for p in parts]
    return w.op("Split", [y, w.const(sizes, np.int64)], len(sizes), axis=-1)


def int4_embedding(linear: LinearEmitter, spec: DecoderSpec) -> tuple[str, Int4Table | None]:
    """input_ids [B, S] -> hidden [B, S, E] by GatherBlockQuantized over the int4 table (shared with a tied head),
    where --quantize-embedding and bs | E; else dense. GatherBlockQuantized takes uint8 zero points only, so float
    zero points add their block offsets after the gather:

        input_ids ─> GatherBlockQuantized(codes, scales, round(z)) ─> Reshape [B,S,nb,bs] ─> Add ─> Reshape [B,S,E]
                  └> Gather(offsets^T [nb, V], axis 1) ─> Transpose ─> Unsqueeze(-1) ──────┘
    """
    w, bs, e = linear.w, linear.opts.block_size, spec.hidden_size
    if not (linear.opts.quantize_embedding and e % bs == 0):
        return dense_embedding(linear, spec)
    table = linear.src.tensor(EMBED + ".weight")  # [V, E]
    q = linear.int4(table)
    linear.errors[EMBED] = {"shape": list(table.shape), "rel_error": int4_relative_error(table, q)}
    v, nb = table.shape[0], e // bs
    del table
    t = linear.int4_table(EMBED, q, gather=True)
    inputs = [w.op("Reshape", [t.data, w.const([v, e // 2], np.int64)]), "input_ids",
              w.op("Reshape", [t.scales, w.const([v, -1], np.int64)])] + ([t.zero_points] if t.zero_points else [])
    hidden = w.op("GatherBlockQuantized", inputs, domain=MS_DOMAIN, bits=4, block_size=bs, gather_axis=0,
                  quantize_axis=1)
    if t.offsets_t:  # Gather(offsets^T [nb, V], ids, axis 1) [nb, B, S] -> [B, S, nb, 1]
        off = w.op("Transpose", [w.op("Gather", [t.offsets_t, "input_ids"], axis=1)], perm=[1, 2, 0])
        blocks = w.op("Reshape", [hidden, w.const([0, 0, nb, bs], np.int64)])
        off = w.op("Unsqueeze", [off, w.const([-1], np.int64)])
        hidden = w.op("Reshape", [w.op("Add", [blocks, off]), w.const([0, 0, e], np.int64)])
    return hidden, t


def int4_lm_head(linear: LinearEmitter, spec: DecoderSpec, hidden: str, embedding: Int4Table | None) -> None:
    """hidden [B, S, E] -> MatMulNBits -> logits [B, S, V] (a third of a small model's weights); a tied head reuses
    the embedding's int4 table (MatMulNBits reads B [V, E/bs, bs/2], the same bytes), unless --calibrate gives it
    its own. --no-quantize-lm-head: dense."""
    if not linear.opts.quantize_lm_head:
        return dense_lm_head(linear, spec, hidden, embedding)
    # With calibration data a tied head gets its own GPTQ table (from the final norm's Hessian; the embedding's
    # stays data-free): +V*E/2 bytes, for the largest error of a small model's int4 graph.
    calibrated = linear.hessians is not None and linear.hessians(HEAD) is not None
    if embedding is not None and _tied(linear, spec) and not calibrated:
        linear.w.op("Identity", [linear.apply_int4(hidden, embedding)], outputs=["logits"])
        linear.errors[HEAD] = dict(linear.errors[EMBED], note="shared with embedding")
        return
    linear.w.op("Identity", [linear.matmul_nbits(hidden, HEAD, linear.quantize_merged(HEAD))], outputs=["logits"])


def dequantized_lm_head(linear: LinearEmitter, spec: DecoderSpec, hidden: str, embedding: Int4Table | None) -> None:
    """hidden [B, S, E] -> MatMul(DequantizeLinear(int4 W^T)) -> logits [B, S, V]; --no-quantize-lm-head: dense."""
    if not linear.opts.quantize_lm_head:
        return dense_lm_head(linear, spec, hidden, embedding)
    weight_t = linear.dequantize_linear(HEAD, linear.quantize_merged(HEAD))
    linear.w.op("MatMul", [hidden, weight_t], outputs=["logits"])


@register_format("int4", fused=fused_matmul_nbits, embedding=int4_embedding, lm_head=int4_lm_head)
def matmul_nbits_linear(linear: LinearEmitter, x: str, module: str) -> str:
    return _int4_linear(linear, x, module, linear.matmul_nbits)


@register_format("trt-int4", lm_head=dequantized_lm_head)
def dequantized_linear(linear: LinearEmitter, x: str, module: str) -> str:
    return _int4_linear(linear, x, module, linear.dequantized_matmul)


assert set(FORMAT_EMITTERS) == set(FORMATS), f"formats registered {sorted(FORMAT_EMITTERS)} != options.Format"
