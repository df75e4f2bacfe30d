"""Build a Llama-shaped decoder graph with a KV cache directly from tensors, one layer at a time.

No tracing: tracing needs the whole float32 model in memory and pins the exporter to one transformers version.
Each function below builds one subgraph in standard ONNX ops (so trt-int4 graphs stay in the default domain); the
embedding, the linears and the lm_head come from the format's registered emitters (`formats`), the attention from
`attention`. onnxruntime's own optimizer fuses the RMSNorm pattern into SimplifiedLayerNormalization and the int4
DequantizeLinear -> MatMul pattern into MatMulNBits at session creation.

Shapes in comments: B batch, S new tokens, E hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qosora.export.attention import ATTENTION, attention_mask
from qosora.export.formats import FORMAT_EMITTERS
from qosora.export.linear import LinearEmitter
from qosora.export.options import ExportOptions
from qosora.export.source import WeightSource
from qosora.export.spec import DecoderSpec, graph_inputs, graph_outputs
from qosora.export.writer import GraphWriter, value_info

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclass
class BuildResult:
    model_path: Path
    spec: DecoderSpec
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
    spec = DecoderSpec.from_hf_config(src.hf_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = GraphWriter(out_dir / DATA_FILE)
    try:
        fmt = FORMAT_EMITTERS[opts.format]
        linear = LinearEmitter(w, src, opts, fmt.linear, fmt.fused)
        dt = opts.dtype
        with w.scope("model/embed_tokens"):
            hidden, embed_table = fmt.embedding(linear, spec)
        with w.scope("model/mask"):
            mask = attention_mask(w, spec)
        attend = ATTENTION[opts.attention](w, spec, linear, mask, dt)
        for i in range(spec.num_layers):
            with w.scope(f"model/layers.{i}"):
                hidden = _decoder_layer(w, src, spec, linear, hidden, i, attend, dt)
            if progress:
                progress(i + 1, spec.num_layers)
        with w.scope("model/norm"):
            gamma = w.initializer("model.norm.weight", src.tensor("model.norm.weight").astype(dt), "norm")
            hidden = _rms_norm(w, hidden, gamma, spec.rms_norm_eps, dt)
        with w.scope("lm_head"):
            fmt.lm_head(linear, spec, hidden, embed_table)
        inputs = [value_info(t.name, t.dtype, t.shape) for t in graph_inputs(spec, dt)]
        outputs = [value_info(t.name, t.dtype, t.shape) for t in graph_outputs(spec, dt)]
        model_path = out_dir / MODEL_FILE
        w.finish(inputs, outputs, model_path, doc=f"qosora {opts.format} decoder ({spec.model_type})",
                 metadata={"qosora.format": opts.format, "qosora.model_type": spec.model_type},
                 uses_ms_domain=w.uses_ms_domain)
    finally:
        w.close()
    return BuildResult(model_path, spec, linear.errors, dict(w.op_counts), dict(w.bytes_by_kind),
                       sorted({n.domain or "ai.onnx" for n in w.nodes}))


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
    x32 = w.cast(x, "float32", src_dtype=dt)
    var = w.op("ReduceMean", [w.op("Mul", [x32, x32]), w.const([-1], np.int64)], keepdims=1)
    inv = w.op("Reciprocal", [w.op("Sqrt", [w.op("Add", [var, w.const(np.float32(eps))])])])
    return w.op("Mul", [gamma, w.cast(w.op("Mul", [x32, inv]), dt, "float32")])


def _mlp(w: GraphWriter, linear: LinearEmitter, x: str, p: str) -> str:
    """SwiGLU: down( silu(gate(x)) * up(x) ),  silu(g) = g * sigmoid(g).

        x ─┬─> gate_proj ─> Sigmoid ─> Mul(g) ─┐
           └─> up_proj ──────────────────────── Mul ─> down_proj      (int4: gate and up are one fused MatMulNBits)
    """
    g, u = linear.fused(x, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"{p}.mlp.gate_up_proj")
    act = w.op("Mul", [g, w.op("Sigmoid", [g])])
    return linear(w.op("Mul", [act, u]), f"{p}.mlp.down_proj")
