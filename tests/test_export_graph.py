"""ONNX decoder graphs vs PyTorch on tiny models: every format, the KV cache, padding, GQA, biases, sliding window."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export_helpers import AdaptedSource, feed, linear_modules, tiny_model
from qosora.errors import QosoraError
from qosora.export.graph import build_decoder_graph
from qosora.export.int4 import dequantize_int4
from qosora.export.options import ExportOptions
from qosora.export.quantizers import quantize_int4
from qosora.export.source import HFSource
from qosora.run.session import session_options


def _session(path) -> ort.InferenceSession:
    so = session_options(1)
    # ORT fuses trt-int4's DequantizeLinear -> MatMul into MatMulNBits with int8 activations (accuracy level 4)
    # by default; level 0 keeps the activations in float so the graph can be compared exactly.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so)


def _logits(sess, model, ids, **kw):
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name: i for i in sess.get_inputs()}
    dtype = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32
    f = feed(model.config, ids, dtype=dtype, **kw)
    return dict(zip(names, sess.run(None, {k: v for k, v in f.items() if k in inputs})))


def _torch_logits(model, ids, **kw) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), **kw).logits.double().numpy()


def _ids(batch=2, seq=9, seed=1):
    return np.random.default_rng(seed).integers(0, 128, size=(batch, seq))


def _rel(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _quantized_reference(model, opts: ExportOptions):
    """The same model with every weight the int4 export quantizes replaced by deq(q(W)): the exact reference."""
    opts = opts.validate()
    mods = dict(model.named_modules())
    embedding = opts.format == "int4" and opts.quantize_embedding and model.config.hidden_size % opts.block_size == 0
    with torch.no_grad():
        if model.lm_head.weight is model.model.embed_tokens.weight and not embedding:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # head only
        names = linear_modules(model) + (["lm_head"] if opts.quantize_lm_head else [])
        if embedding:
            names.append("model.embed_tokens")
        seen = set()
        for m in names:
            if id(mods[m].weight) in seen:  # a tied head is the embedding: quantize it once (hqq is not idempotent)
                continue
            seen.add(id(mods[m].weight))
            w = mods[m].weight.detach().float().numpy()
            mods[m].weight.copy_(torch.from_numpy(dequantize_int4(quantize_int4(w, opts.block_size, opts.int4_scheme))))
    return model


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("mistral", True)])
@pytest.mark.parametrize("attention", ["standard", "gqa"])  # standard ops, onnxruntime's fused op
def test_fp32_graph_matches_torch(tmp_path, arch, tied, attention):
    model = tiny_model(arch, tied=tied)
    result = build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp32", attention=attention), tmp_path)
    ids = _ids()
    got = _logits(_session(result.model_path), model, ids)["logits"]
    assert _rel(got, _torch_logits(model, ids)) < 1e-4
    assert result.op_counts.get("com.microsoft::GroupQueryAttention", 0) == (2 if attention == "gqa" else 0)
    if arch == "qwen2" and attention == "standard":
        assert result.op_counts["Add"] == 15 + 3 * 2  # llama has 15 Adds; plus q/k/v bias in 2 layers


@pytest.mark.parametrize("attention", ["standard", "gqa"])  # standard ops, onnxruntime's fused op
def test_rope_llama3_scaling_and_sliding_window(tmp_path, attention):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny_model("llama", rope_parameters=rope)
    result = build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp32", attention=attention), tmp_path / "l3")
    ids = _ids(seq=40)
    assert _rel(_logits(_session(result.model_path), model, ids)["logits"], _torch_logits(model, ids)) < 1e-4

    model = tiny_model("mistral", sliding_window=4)
    result = build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp32", attention=attention), tmp_path / "sw")
    ids = _ids(seq=12)
    got = _logits(_session(result.model_path), model, ids)["logits"]
    assert _rel(got, _torch_logits(model, ids)) < 1e-4
    # The window matters on these inputs: without it, the last positions would differ.
    full = tiny_model("mistral", sliding_window=None)
    assert _rel(got, _torch_logits(full, ids)) > 1e-3


@pytest.mark.parametrize("attention", ["standard", "gqa"])  # standard ops, onnxruntime's fused op
def test_prefill_then_decode_equals_full_forward(tmp_path, attention):
    model = tiny_model("llama")
    sess = _session(build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp32", attention=attention), tmp_path).model_path)
    ids = _ids(seq=10)
    full = _logits(sess, model, ids)["logits"]
    out = _logits(sess, model, ids[:, :6])
    steps = [out["logits"]]
    for t in range(6, 10):
        past = {f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(2) for k in ("key", "value")}
        out = _logits(sess, model, ids[:, t:t + 1], past=past, past_len=t)
        steps.append(out["logits"])
        assert out["present.0.key"].shape == (2, 2, t + 1, 16)
    assert _rel(np.concatenate(steps, axis=1), full) < 1e-5


def test_standard_graph_takes_left_padding(tmp_path):
    model = tiny_model("qwen2")
    opts = ExportOptions(format="fp32", attention="standard")
    sess = _session(build_decoder_graph(HFSource.from_model(model), opts, tmp_path).model_path)
    ids = _ids(seq=8)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    got = _logits(sess, model, ids, attention_mask=mask, position_ids=pos)["logits"]
    ref = _torch_logits(model, ids, attention_mask=torch.from_numpy(mask), position_ids=torch.from_numpy(pos))
    keep = mask.astype(bool)
    assert _rel(got[keep], ref[keep]) < 1e-4


def _run_shared(sess, ids, mask, buffers) -> np.ndarray:
    """One step of a gqa graph with onnxruntime-genai's shared cache: the same OrtValue is past and present."""
    io = sess.io_binding()
    io.bind_cpu_input("input_ids", ids.astype(np.int64))
    io.bind_cpu_input("attention_mask", mask.astype(np.int64))
    for (i, kind), buf in buffers.items():
        io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", buf)
        io.bind_ortvalue_output(f"present.{i}.{kind}", buf)
    io.bind_output("logits")
    sess.run_with_iobinding(io)
    return io.copy_outputs_to_cpu()[-1]


@pytest.mark.parametrize("arch,kw", [("qwen2", {}), ("mistral", {"sliding_window": 4})])
def test_gqa_graph_takes_right_padding_and_a_shared_cache(tmp_path, arch, kw):
    """Rows of 8 and 5 tokens right-padded into one prefill, then two decode steps where each row's new token
    goes to its own cache row (mask = ones over each row's length): every real position equals that row run alone
    in PyTorch. Mistral's window (4 < 9 tokens) runs as GroupQueryAttention's local_window_size."""
    model = tiny_model(arch, **kw)
    sess = _session(build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp32", attention="gqa"),
                                        tmp_path).model_path)
    cfg = model.config
    shape = (2, cfg.num_key_value_heads, 12, cfg.hidden_size // cfg.num_attention_heads)
    buffers = {(i, k): ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
               for i in range(cfg.num_hidden_layers) for k in ("key", "value")}
    ids, lengths = _ids(seq=10), [8, 5]
    x = ids[:, :8].copy()
    x[1, 5:] = 0  # padding on the right
    mask = (np.arange(8)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    got = [_run_shared(sess, x, mask, buffers)]
    for step in range(2):
        nxt = np.array([[ids[b, lengths[b] + step]] for b in range(2)])
        total = max(lengths) + step + 1
        mask = (np.arange(total)[None, :] < np.array(lengths)[:, None] + step + 1).astype(np.int64)
        got.append(_run_shared(sess, nxt, mask, buffers))
    for b, n in enumerate(lengths):
        ref = _torch_logits(model, ids[b:b + 1, :n + 2])[0]
        assert _rel(got[0][b, :n], ref[:n]) < 1e-4
        assert _rel(np.stack([got[1][b, 0], got[2][b, 0]]), ref[n:n + 2]) < 1e-4


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_logits_to_keep_runs_the_head_on_the_last_positions_only(tmp_path, attention):
    model = tiny_model("llama")
    result = build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp32", attention=attention), tmp_path)
    sess, ids = _session(result.model_path), _ids()
    full = _logits(sess, model, ids)["logits"]  # not fed: the default 0 keeps every position
    f = {k: v for k, v in feed(model.config, ids).items() if k in {i.name for i in sess.get_inputs()}}
    for n in (1, 3):
        got = sess.run(["logits"], {**f, "logits_to_keep": np.array(n, np.int64)})[0]
        assert got.shape == (2, n, 128) and np.array_equal(got, full[:, -n:])
    proto = onnx.load(str(result.model_path), load_external_data=False)
    head = next(n for n in proto.graph.node if n.output[0] == "logits")
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    assert producers[head.input[0]] == "Slice"  # the head reads the sliced hidden states, not all of them


def test_gqa_graph_has_onnxruntime_genais_contract(tmp_path):
    """What onnxruntime-gpu's fast GroupQueryAttention kernels take: packed QKV (key/value empty), seqlens_k and
    total_sequence_length from attention_mask, rotary caches; no position_ids, no attention_bias; RMSNorm fused
    with the residual Add."""
    model = tiny_model("llama")
    result = build_decoder_graph(HFSource.from_model(model), ExportOptions(format="int4", device="cuda"), tmp_path)
    proto = onnx.load(str(result.model_path), load_external_data=False)
    assert [i.name for i in proto.graph.input][:2] == ["input_ids", "attention_mask"]
    assert "position_ids" not in {i.name for i in proto.graph.input}
    assert {i.type.tensor_type.elem_type for i in proto.graph.input if i.name.startswith("past")} == {
        onnx.TensorProto.FLOAT16}
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    producers = {o: n for n in proto.graph.node for o in n.output}
    for i, n in enumerate(gqa):
        assert len(n.input) == 9 and n.input[1] == n.input[2] == ""
        assert producers[n.input[0]].op_type == "MatMulNBits"  # the fused q/k/v projection, unsplit
        assert n.input[3:5] == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert n.input[7:9] == ["model.rotary.cos_cache", "model.rotary.sin_cache"]
    assert producers[gqa[0].input[5]].op_type == "Cast" and producers[gqa[0].input[6]].op_type == "Cast"
    assert {a.name: a.i for a in gqa[0].attribute if a.type == onnx.AttributeProto.INT}["do_rotary"] == 1
    counts = result.op_counts
    assert counts["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * 2 and counts["SimplifiedLayerNormalization"] == 1
    assert "ReduceMean" not in counts  # every RMSNorm fused; the only Add left is the embedding's block offsets
    assert {n.name.rsplit("/", 1)[0] for n in proto.graph.node if n.op_type == "Add"} == {"/model/embed_tokens"}
    levels = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}  # CUDA's kernels are float; the CPU default is 4


@pytest.mark.parametrize("scheme,tied,block", [("sym-search", True, 32), ("asym", False, 16), ("sym", False, 64),
                                               ("asym-ls", False, 32), ("asym-ls-float", False, 32),
                                               ("asym-ls-float", True, 32), ("asym-ls-float", False, 128),
                                               ("hqq", True, 64)])
def test_int4_matches_dequantized_reference(tmp_path, scheme, tied, block):
    model = tiny_model("llama", tied=tied)
    opts = ExportOptions(format="int4", accuracy_level=0, int4_scheme=scheme, block_size=block)
    result = build_decoder_graph(HFSource.from_model(model), opts, tmp_path)
    assert result.op_counts["com.microsoft::MatMulNBits"] == 2 * 4 + 1  # fused q/k/v and gate/up, o, down; head
    if scheme.startswith("asym"):  # packed uint8 zero points (the fast kernels), for float zero points too
        inits = {t.name: t for t in onnx.load(str(result.model_path), load_external_data=False).graph.initializer}
        assert inits["model.layers.0.self_attn.qkv_proj.qzeros"].data_type == onnx.TensorProto.UINT8
        # float zero points: the rest of z is a block-offset term, one block-sum per distinct input
        assert ("model.layers.0.self_attn.qkv_proj.block_offsets_t" in inits) == (scheme in ("asym-ls-float", "hqq"))
        if scheme in ("asym-ls-float", "hqq"):
            # per layer q/k/v, o, gate/up, down; lm_head; and GroupQueryAttention's seqlens_k
            assert result.op_counts["ReduceSum"] == 2 * 4 + 1 + 1
            assert ("model.embed_tokens.block_offsets_t" in inits) == (block <= 64)  # E = 64: 128 leaves it float
    assert result.op_counts.get("com.microsoft::GatherBlockQuantized", 0) == (block <= 64)  # needs bs | E = 64
    ids = _ids()
    original = _torch_logits(model, ids)
    got = _logits(_session(result.model_path), model, ids)["logits"]
    # Exactly the dequantized model (the packing, scales and zero points are read as we wrote them) ...
    assert _rel(got, _torch_logits(_quantized_reference(model, opts), ids)) < 1e-4
    # ... and the per-layer error the report gives is the error of what was written.
    errs = [e["rel_error"] for e in result.layer_errors.values()]
    assert 0.01 < max(errs) < 0.2
    assert _rel(got, original) > 1e-3


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_fused_int4_projections_keep_biases_and_match(tmp_path, arch):
    """q/k/v and gate/up fused into one MatMulNBits each: Qwen2's q/k/v biases ride along, Mistral's GQA splits."""
    model = tiny_model(arch)
    opts = ExportOptions(format="int4", accuracy_level=0, int4_scheme="asym-ls-float", block_size=32)
    result = build_decoder_graph(HFSource.from_model(model), opts, tmp_path)
    assert result.op_counts["com.microsoft::MatMulNBits"] == 2 * 4 + 1
    ids = _ids()
    got = _logits(_session(result.model_path), model, ids)["logits"]
    assert _rel(got, _torch_logits(_quantized_reference(model, opts), ids)) < 1e-4
    assert {e.get("fused") for m, e in result.layer_errors.items() if m.endswith("k_proj")} == {
        f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)}


def test_trt_int4_is_standard_onnx_and_matches(tmp_path):
    model = tiny_model("llama", tied=True)
    opts = ExportOptions(format="trt-int4", block_size=32)
    result = build_decoder_graph(HFSource.from_model(model), opts, tmp_path)
    proto = onnx.load(str(result.model_path))
    assert {n.domain for n in proto.graph.node} <= {""}
    assert {o.domain for o in proto.opset_import} == {""} and proto.opset_import[0].version >= 21
    onnx.checker.check_model(str(result.model_path), full_check=True)
    # strict: a shape or type the ops imply that contradicts the declared inputs/outputs raises here
    onnx.shape_inference.infer_shapes_path(str(result.model_path), str(tmp_path / "inferred.onnx"), check_type=True,
                                           strict_mode=True)
    inferred = onnx.load(str(tmp_path / "inferred.onnx"), load_external_data=False)
    typed = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    dims = lambda t: [d.dim_value or d.dim_param for d in t.shape.dim]  # noqa: E731
    assert all(o in typed for n in inferred.graph.node for o in n.output)  # every tensor's type is known
    assert typed["logits"].elem_type == onnx.TensorProto.FLOAT
    assert dims(typed["logits"]) == ["batch_size", "sequence_length", 128]
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * 7 + 1
    # each dequantized weight is float W^T [K, N]: q_proj [E, H*D], k_proj [E, Hkv*D], ..., lm_head [E, V]
    assert all(typed[n.output[0]].elem_type == onnx.TensorProto.FLOAT for n in dq)
    assert [dims(typed[n.output[0]]) for n in dq[:3]] == [[64, 64], [64, 32], [64, 32]]
    assert dims(typed[dq[-1].output[0]]) == [64, 128]
    init = {t.name: t for t in proto.graph.initializer}
    w = init[dq[0].input[0]]
    assert w.data_type == onnx.TensorProto.INT4 and len(dq[0].input) == 2  # symmetric: no zero point
    assert {a.name: a.i for a in dq[0].attribute} == {"axis": 0, "block_size": 32}
    ids = _ids()
    got = _logits(_session(result.model_path), model, ids)["logits"]
    opts_ref = ExportOptions(format="int4", accuracy_level=0, block_size=32, int4_scheme=opts.validate().int4_scheme,
                             quantize_embedding=False)  # the trt-int4 default scheme, on MatMulNBits
    assert _rel(got, _torch_logits(_quantized_reference(model, opts_ref), ids)) < 1e-4


def test_trt_int4_rejects_block_not_dividing_k(tmp_path):
    model = tiny_model("llama", hidden_size=96, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160)
    with pytest.raises(QosoraError, match="block size to divide"):
        build_decoder_graph(HFSource.from_model(model), ExportOptions(format="trt-int4", block_size=64), tmp_path)


def test_fp16_graph_close_to_torch(tmp_path):
    model = tiny_model("qwen2", tied=True)
    result = build_decoder_graph(HFSource.from_model(model), ExportOptions(format="fp16"), tmp_path)
    ids = _ids()
    out = _logits(_session(result.model_path), model, ids)
    assert out["logits"].dtype == np.float16 and out["present.1.value"].dtype == np.float16
    assert _rel(out["logits"], _torch_logits(model, ids)) < 5e-3


def test_nf4_reproduces_the_trained_function(tmp_path):
    model = tiny_model("llama")
    src = AdaptedSource(model, rank=4)  # model now computes deq(NF4(W_res)) + B A
    result = build_decoder_graph(src, ExportOptions(format="nf4"), tmp_path)
    assert result.op_counts["com.microsoft::MatMulBnb4"] == 14
    ids = _ids()
    assert _rel(_logits(_session(result.model_path), model, ids)["logits"], _torch_logits(model, ids)) < 1e-4


def test_keep_principal_reduces_requantization_error(tmp_path):
    model = tiny_model("llama")
    src = AdaptedSource(model, rank=8)
    plain = build_decoder_graph(src, ExportOptions(format="int4", accuracy_level=0, block_size=32), tmp_path / "plain")
    kept = build_decoder_graph(src, ExportOptions(format="int4", accuracy_level=0, block_size=32, keep_principal=True), tmp_path / "kept")
    mods = linear_modules(model)
    e_plain = np.mean([plain.layer_errors[m]["rel_error"] for m in mods])
    e_kept = np.mean([kept.layer_errors[m]["rel_error"] for m in mods])
    assert e_kept < 0.8 * e_plain
    ids = _ids()
    ref = _torch_logits(model, ids)
    err_plain = _rel(_logits(_session(plain.model_path), model, ids)["logits"], ref)
    err_kept = _rel(_logits(_session(kept.model_path), model, ids)["logits"], ref)
    assert err_kept < err_plain


def test_bitsandbytes_nf4_layout_is_what_matmulbnb4_reads():
    """bnb packs [N, K] row-major, first weight in the high nibble, one absmax per 64 weights; MatMulBnb4 with
    x = I_K must return deq(W)^T exactly."""
    import bitsandbytes.functional as bnbf
    from onnx import TensorProto, helper

    n, k = 48, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    deq = bnbf.dequantize_4bit(packed, st).numpy()
    node = helper.make_node("MatMulBnb4", ["x", "b", "absmax"], ["y"], domain="com.microsoft",
                            K=k, N=n, block_size=64, quant_type=1)  # 1: NF4
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
        initializer=[onnx.numpy_helper.from_array(packed.reshape(-1).numpy(), "b"),
                     onnx.numpy_helper.from_array(st.absmax.numpy(), "absmax")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": np.eye(k, dtype=np.float32)})[0]
    np.testing.assert_array_equal(y, deq.T)


def test_unsupported_architecture_fails_clearly(tmp_path):
    src = HFSource({"model_type": "gpt2", "hidden_size": 64}, {})
    with pytest.raises(QosoraError, match="cannot export architecture 'gpt2'.*llama, mistral, qwen2"):
        build_decoder_graph(src, ExportOptions(format="fp32"), tmp_path)


def test_options_are_validated():
    for scheme in ("asym", "hqq"):  # hqq has float zero points: the symmetric DequantizeLinear would drop them
        with pytest.raises(QosoraError, match="trt-int4 is symmetric"):
            ExportOptions(format="trt-int4", int4_scheme=scheme).validate()
    with pytest.raises(QosoraError, match="keep-principal"):
        ExportOptions(format="fp16", keep_principal=True).validate()
    with pytest.raises(QosoraError, match="unknown --format"):
        ExportOptions(format="int8").validate()
    with pytest.raises(QosoraError, match="--block-size"):
        ExportOptions(block_size=48).validate()
    with pytest.raises(QosoraError, match="--accuracy-level must be <= 4"):
        ExportOptions(accuracy_level=5).validate()
    resolved = ExportOptions(format="trt-int4").validate()
    assert (resolved.int4_scheme, resolved.attention) == ("sym-search", "standard")
    assert ExportOptions(format="nf4").validate().attention == "gqa"


@pytest.mark.parametrize("fmt,tol", [("int4", 5e-3), ("nf4", 3e-2), ("trt-int4", 5e-3)])
def test_float16_io_matches_float32_io(tmp_path, fmt, tol):
    """--io-dtype float16 (what onnxruntime-gpu's GroupQueryAttention needs): same weights, half-precision
    activations and cache; within fp16 rounding of the float32 graph."""
    model = tiny_model("qwen2")
    src = AdaptedSource(model, rank=4) if fmt == "nf4" else HFSource.from_model(model)
    ids = _ids()
    out = {}
    for dt in ("float32", "float16"):
        result = build_decoder_graph(src, ExportOptions(format=fmt, io_dtype=dt, accuracy_level=0), tmp_path / dt)
        out[dt] = _logits(_session(result.model_path), model, ids)
    assert out["float16"]["logits"].dtype == np.float16 and out["float16"]["present.0.key"].dtype == np.float16
    assert _rel(out["float16"]["logits"], out["float32"]["logits"].astype(np.float64)) < tol
    with pytest.raises(QosoraError, match="drop --io-dtype"):
        ExportOptions(format="fp32", io_dtype="float16").validate()
