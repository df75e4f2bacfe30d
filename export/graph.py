"""Build a Llama-shaped decoder graph with a KV cache directly from tensors, one layer at a time.

No tracing: tracing needs the whole float32 model in memory and pins the exporter to one transformers version.
The embedding, the linears and the lm_head come from the format's registered emitters (`formats`), the attention from
`attention`. Graphs that use onnxruntime's contrib ops anyway (int4, nf4, --attention gqa) get its fused RMSNorm
ops, the residual Add folded in; the others (fp32/fp16/trt-int4 with standard attention) stay in default-domain
ops, where onnxruntime's optimizer fuses the RMSNorm pattern and trt-int4's DequantizeLinear -> MatMul (into
MatMulNBits) at session creation.

Shapes in comments: B batch, S new tokens, E hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qosora.export.attention import ATTENTION
from qosora.export.formats import FORMAT_EMITTERS
from qosora.export.linear import LinearEmitter
from qosora.export.options import ExportOptions
from qosora.export.source import WeightSource
from qosora.export.spec import LOGITS_TO_KEEP, PADDING, DecoderSpec, graph_inputs, graph_outputs
from qosora.export.writer import MS_DOMAIN, GraphWriter, value_info

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
                        progress: Callable[[int, int], None] | None = None,
                        hessians: Callable[[str], object] | None = None) -> BuildResult:
    """Write out_dir/model.onnx (+ model.onnx.data) for `src` in format `opts.format`; `hessians` (module -> its
    input Hessian, asked for in layer order) turns on calibrated int4 quantization.

        input_ids ─> embed ─> RMSNorm ─> [decoder layer i, past_i -> present_i] x L ─> lm_head ─> logits
                                          ^ attention's shared inputs (from attention_mask, and position_ids
                                            in standard graphs)
    """
    opts = opts.validate()
    spec = DecoderSpec.from_hf_config(src.hf_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = GraphWriter(out_dir / DATA_FILE)
    try:
        fmt = FORMAT_EMITTERS[opts.format]
        linear = LinearEmitter(w, src, opts, fmt.linear, fmt.fused, hessians)
        dt = opts.dtype
        norm = Norms(w, src, spec, dt, opts.fused_norms)
        with w.scope("model/embed_tokens"):
            hidden, embed_table = fmt.embedding(linear, spec)
        attend = ATTENTION[opts.attention](w, spec, linear, dt)
        with w.scope("model/layers.0/input_layernorm"):
            x = norm.first(hidden, "model.layers.0.input_layernorm")
        for i in range(spec.num_layers):
            with w.scope(f"model/layers.{i}"):
                x, hidden = _decoder_layer(w, norm, linear, x, hidden, i, attend, spec.num_layers)
            if progress:
                progress(i + 1, spec.num_layers)
        keep_logits = opts.format != "trt-int4"  # TensorRT profiles every input: keep its graph's inputs fixed
        with w.scope("lm_head"):
            fmt.lm_head(linear, spec, _last_positions(w, x) if keep_logits else x, embed_table)
        inputs = [value_info(t.name, t.dtype, t.shape) for t in graph_inputs(spec, dt, opts.attention, keep_logits)]
        outputs = [value_info(t.name, t.dtype, t.shape) for t in graph_outputs(spec, dt)]
        model_path = out_dir / MODEL_FILE
        w.finish(inputs, outputs, model_path, doc=f"qosora {opts.format} decoder ({spec.model_type})",
                 metadata={"qosora.format": opts.format, "qosora.model_type": spec.model_type,
                           "qosora.device": opts.device, "qosora.padding": PADDING[opts.attention]},
                 uses_ms_domain=w.uses_ms_domain)
    finally:
        w.close()
    return BuildResult(model_path, spec, linear.errors, dict(w.op_counts), dict(w.bytes_by_kind),
                       sorted({n.domain or "ai.onnx" for n in w.nodes}))


# -- decoder layer ---------------------------------------------------------------------------------------------

def _decoder_layer(w, norm: "Norms", linear, x, hidden, i, attend, num_layers) -> tuple[str, str]:
    """One layer, entered with x = input_layernorm(hidden) and left with the next norm applied, so each residual
    Add is fused with the RMSNorm after it (SkipSimplifiedLayerNormalization where the graph uses contrib ops):

        x ─> attention(past_i -> present_i) ─> Add(hidden) ─┬─> RMSNorm ─> SwiGLU MLP ─> Add ─┬─> next RMSNorm ─> x'
                                                            └── hidden ────────────────────────┴── hidden' ──>
    (next RMSNorm: layer i+1's input_layernorm, or model.norm after the last layer)
    """
    p = f"model.layers.{i}"
    with w.scope("self_attn"):
        a = attend(x, i)
    with w.scope("post_attention_layernorm"):
        x, hidden = norm.add_then_norm(hidden, a, f"{p}.post_attention_layernorm", f"/{p}/post_attention_layernorm")
    with w.scope("mlp"):
        m = _mlp(w, linear, x, p)
    after = f"model.layers.{i + 1}.input_layernorm" if i + 1 < num_layers else "model.norm"
    with w.scope("next_norm"):
        return norm.add_then_norm(hidden, m, after, f"/{after}")


def _last_positions(w: GraphWriter, x: str) -> str:
    """x [B, S, E] -> x[:, S - N:] for N = logits_to_keep; its default 0 keeps every position.

        logits_to_keep (input; initializer 0) ─> Neg ─> Unsqueeze ─> Slice(x, starts, [INT64_MAX], axes [1])
    """
    w.initializer(LOGITS_TO_KEEP, np.array(0, np.int64))  # an initializer named as an input: the input's default
    start = w.op("Unsqueeze", [w.op("Neg", [LOGITS_TO_KEEP]), w.const([0], np.int64)])
    return w.op("Slice", [x, start, w.const([np.iinfo(np.int64).max], np.int64), w.const([1], np.int64)])


class Norms:
    """RMSNorm y = gamma * x / sqrt(mean(x^2) + eps) (statistics in float32), alone (`first`) or after a residual
    Add (`add_then_norm`); as onnxruntime's fused ops (`fused`) or in standard ops."""

    def __init__(self, w: GraphWriter, src: WeightSource, spec: DecoderSpec, dt: str, fused: bool):
        self.w, self.src, self.eps, self.dt, self.fused = w, src, spec.rms_norm_eps, dt, fused

    def _gamma(self, module: str) -> str:
        return self.w.initializer(f"{module}.weight", self.src.tensor(f"{module}.weight").astype(self.dt), "norm")

    def first(self, x: str, module: str) -> str:
        if self.fused:  # onnxruntime's kernel lives in the default domain, as onnxruntime-genai's graphs use it
            return self.w.op("SimplifiedLayerNormalization", [x, self._gamma(module)], axis=-1, epsilon=self.eps,
                             stash_type=1)
        return _rms_norm(self.w, x, self._gamma(module), self.eps, self.dt)

    def add_then_norm(self, hidden: str, delta: str, module: str, name: str) -> tuple[str, str]:
        """(RMSNorm(hidden + delta), hidden + delta)."""
        if self.fused:
            out = self.w.op("SkipSimplifiedLayerNormalization", [hidden, delta, self._gamma(module)],
                            outputs=[f"{name}/output_0", "", "", f"{name}/output_3"], domain=MS_DOMAIN,
                            epsilon=self.eps)
            return out[0], out[3]
        total = self.w.op("Add", [hidden, delta])
        return _rms_norm(self.w, total, self._gamma(module), self.eps, self.dt), total


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
