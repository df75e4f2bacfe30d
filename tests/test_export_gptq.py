"""GPTQ on our int4 grids (qosora.export.gptq) and its calibration Hessians (qosora.export.calibration).

Oracles: the output error tr(E H E^T) computed here in float64 from the returned codes; the per-element nearest
grid point (the exact optimum when H is diagonal); a plain column-by-column OBS sweep with an explicitly updated
inverse Hessian (float64) for the lazy-batch Cholesky implementation; a full-model forward with hooks on every
linear for the streamed Hessians.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, char_tokenizer, input_ids, write_jsonl

from qosora.errors import QosoraError
from qosora.export.calibration import LayerHessians, collect_hessians, load_calibration_tokens, stream_hessians
from qosora.export.gptq import gptq_quantize, inverse_hessian
from qosora.export.int4 import Int4Blocks, dequantize_int4
from qosora.export.options import INT4_SCHEMES
from qosora.export.quantizers import QUANTIZERS, quantize_int4

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_layer(n: int = 48, k: int = 128, tokens: int = 512, seed: int = 0):
    """W [n, k] float32 and H = X X^T float64 of inputs X = A Z with a random (non-diagonal) mixing A."""
    g = torch.Generator().manual_seed(seed)
    mix = 0.3 * torch.eye(k, dtype=torch.float64) + torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5
    x = mix @ torch.randn(k, tokens, generator=g, dtype=torch.float64)
    x *= torch.linspace(0.2, 3.0, k, dtype=torch.float64)[:, None]  # uneven input scales, as in LLMs
    w = torch.randn(n, k, generator=g) * 0.05
    return w, x @ x.T


def h_error(w: torch.Tensor, q: Int4Blocks, h: torch.Tensor) -> float:
    """tr(E H E^T) in float64, E = W - deq(q)."""
    e = w.double().numpy() - dequantize_int4(q).astype(np.float64)
    return float(np.einsum("nk,kl,nl->", e, h.numpy(), e))


def grid_params(q: Int4Blocks) -> tuple[np.ndarray, np.ndarray]:
    """Per-column scale and zero point [N, K] in float64 (zero point 8 when symmetric)."""
    s = np.repeat(q.scales.astype(np.float64), q.block_size, axis=1)[:, : q.k]
    z = np.full_like(s, 8.0) if q.zero_points is None else np.repeat(
        q.zero_points.astype(np.float64), q.block_size, axis=1)[:, : q.k]
    return s, z


def nearest_codes(w: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """argmin over u in 0..15 of |w - (u - z) s|, element by element (float64, by enumeration)."""
    grid = (np.arange(16, dtype=np.float64) - z[..., None]) * s[..., None]  # [N, K, 16]
    return np.abs(np.asarray(w, np.float64)[..., None] - grid).argmin(axis=-1).astype(np.uint8)


@pytest.mark.parametrize("scheme", ["sym", "asym", "hqq"])
def test_compensation_lowers_output_error(scheme):
    w, h = correlated_layer()
    h[7, :] = h[:, 7] = 0  # a dead input: its weights count in no output error
    r = gptq_quantize(w, h, 32, scheme)
    rtn = quantize_int4(w.numpy(), 32, scheme)  # the data-free export
    s, z = grid_params(r.q)
    rtn_same_grid = Int4Blocks(
        np.concatenate([nearest_codes(w.numpy(), s, z), r.q.codes[:, r.q.k:]], axis=1), r.q.scales,
        r.q.zero_points, 32, r.q.k)
    gptq_err, rtn_err, same_grid_err = h_error(w, r.q, h), h_error(w, rtn, h), h_error(w, rtn_same_grid, h)
    assert gptq_err < 0.8 * rtn_err and gptq_err < 0.8 * same_grid_err, (gptq_err, rtn_err, same_grid_err)
    ref = float(np.einsum("nk,kl,nl->", w.double().numpy(), h.numpy(), w.double().numpy()))
    assert r.output_error == pytest.approx((gptq_err / ref) ** 0.5, rel=1e-5)
    assert r.rtn_output_error == pytest.approx((rtn_err / ref) ** 0.5, rel=1e-5)


@pytest.mark.parametrize("scheme", INT4_SCHEMES)
@pytest.mark.parametrize("shape", [(48, 128), (24, 80)], ids=["k128", "k80-padded"])
def test_diagonal_hessian_is_round_to_nearest(scheme, shape):
    """Diagonal H: no cross-column compensation, so each group's grid is the data-free scheme's and each code the
    nearest grid point (the exact optimum of a separable loss)."""
    n, k = shape
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=g) * 0.05
    h = torch.diag(torch.rand(k, generator=g, dtype=torch.float64) * 10 + 0.1)
    r = gptq_quantize(w, h, 32, scheme).q
    rtn = quantize_int4(w.numpy(), 32, scheme)
    assert r.codes.shape == rtn.codes.shape and r.codes.dtype == np.uint8 and r.scales.dtype == np.float32
    np.testing.assert_array_equal(r.scales, rtn.scales)
    if rtn.zero_points is None:
        assert r.zero_points is None
    else:
        assert r.zero_points.dtype == rtn.zero_points.dtype
        np.testing.assert_array_equal(r.zero_points, rtn.zero_points)
    np.testing.assert_array_equal(r.codes[:, :k], nearest_codes(w.numpy(), *grid_params(r)))
    np.testing.assert_array_equal(r.codes[:, k:], rtn.codes[:, k:])  # K's zero padding, as the format pads it


def plain_obs_sweep(w: np.ndarray, h: np.ndarray, block_size: int, scheme: str, damp: float, order: np.ndarray,
                    static: bool = False):
    """GPTQ without Cholesky or lazy batches (float64): quantize column p (in `order`), spread its error over the
    remaining columns with the explicit inverse Hessian, then remove p from that inverse (the paper's eq. 3).
    static: each group's grid from the weights before the sweep, else from the current ones."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    n, k = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    before = w.copy()
    hinv = np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(k))
    nb = -(-k // block_size)
    codes = np.zeros((n, k), np.uint8)
    scales, zeros = np.zeros((n, nb)), np.full((n, nb), 8.0)
    zero_dtype, seen = None, set()
    for p in order:
        g = p // block_size
        if g not in seen:  # first column of the group: its grid from the current (or the original) weights
            seen.add(g)
            block = np.zeros((n, 1, block_size), np.float32)
            cols = (before if static else w)[:, g * block_size: (g + 1) * block_size]
            block[:, 0, : cols.shape[1]] = cols
            grid = QUANTIZERS[scheme](block, block_size)
            scales[:, g] = grid.scales[:, 0]
            if grid.zero_points is not None:
                zeros[:, g], zero_dtype = grid.zero_points[:, 0], grid.zero_points.dtype
        u = nearest_codes(w[:, p], scales[:, g], zeros[:, g])
        q = (u - zeros[:, g]) * scales[:, g]
        codes[:, p] = u
        e = (w[:, p] - q) / hinv[p, p]
        w -= np.outer(e, hinv[p])
        hinv -= np.outer(hinv[:, p], hinv[p]) / hinv[p, p]
    return codes, scales.astype(np.float32), None if zero_dtype is None else zeros.astype(zero_dtype)


@pytest.mark.parametrize("grid", ["dynamic", "static"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
@pytest.mark.parametrize("scheme", ["sym", "asym", "hqq"])
def test_lazy_cholesky_sweep_matches_plain_obs(scheme, act_order, grid):
    w, h = correlated_layer(n=16, k=64, tokens=256, seed=3)
    h[5, :] = h[:, 5] = 0  # a dead input
    r = gptq_quantize(w.double(), h, 16, scheme, act_order=act_order, lazy_batch=32, errors=False, grid=grid).q
    order = np.argsort(-np.where(np.diag(h.numpy()) == 0, 1.0, np.diag(h.numpy())), kind="stable") if act_order \
        else np.arange(64)
    codes, scales, zeros = plain_obs_sweep(w.numpy(), h.numpy(), 16, scheme, 0.01, order, static=grid == "static")
    np.testing.assert_array_equal(r.codes, codes)
    np.testing.assert_array_equal(r.scales, scales)
    if zeros is None:
        assert r.zero_points is None
    else:
        np.testing.assert_array_equal(r.zero_points, zeros)
    if scheme != "hqq":  # a dead input's weights are set to 0, which integer zero points represent exactly
        assert (dequantize_int4(r)[:, 5] == 0).all()


@pytest.mark.parametrize("scheme", ["sym", "asym-ls-float", "hqq"])
def test_static_grid_is_the_data_free_grid_with_compensated_codes(scheme):
    """grid="static": the scales and zero points are the data-free export's, only the codes move, and the output
    error is below round-to-nearest on that very grid."""
    w, h = correlated_layer(seed=11)
    static = gptq_quantize(w, h, 32, scheme, grid="static")
    rtn = quantize_int4(w.numpy(), 32, scheme)
    np.testing.assert_array_equal(static.q.scales, rtn.scales)
    if rtn.zero_points is not None:
        np.testing.assert_array_equal(static.q.zero_points, rtn.zero_points)
    assert static.output_error < 0.9 * static.rtn_output_error
    with pytest.raises(ValueError, match="unknown GPTQ grid"):
        gptq_quantize(w, h, 32, scheme, grid="later")


def test_shared_inverse_hessian_and_fused_rows():
    """q/k/v read one input: one factorisation serves all three, and rows are independent given H, so quantizing
    [W_q; W_k] at once equals quantizing each (what a fused MatMulNBits writes)."""
    w, h = correlated_layer(n=40, seed=7)
    inv = inverse_hessian(h, act_order=True)
    parts = [gptq_quantize(w[:24], inv, 32, "asym"), gptq_quantize(w[24:], inv, 32, "asym")]
    fused = gptq_quantize(w, h, 32, "asym", act_order=True)
    np.testing.assert_array_equal(np.concatenate([p.q.codes for p in parts]), fused.q.codes)
    np.testing.assert_array_equal(np.concatenate([p.q.scales for p in parts]), fused.q.scales)
    np.testing.assert_array_equal(np.concatenate([p.q.zero_points for p in parts]), fused.q.zero_points)


def test_deterministic():
    w, h = correlated_layer(seed=5)
    for act_order in (False, True):
        a, b = (gptq_quantize(w, h, 32, "hqq", act_order=act_order) for _ in range(2))
        np.testing.assert_array_equal(a.q.codes, b.q.codes)
        np.testing.assert_array_equal(a.q.scales, b.q.scales)
        np.testing.assert_array_equal(a.q.zero_points, b.q.zero_points)
        assert a.output_error == b.output_error


# -- calibration --------------------------------------------------------------------------------------------------

def hooked_forward_hessians(model, tokens: torch.Tensor, want=None) -> dict[str, torch.Tensor]:
    """H of every linear (or every module `want(name, module)` picks) from one full-model forward, each hooked on
    its own."""
    want = want or (lambda name, module: isinstance(module, torch.nn.Linear))
    hs, handles = {}, []
    for name, module in model.named_modules():
        if want(name, module):
            def hook(_, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                hs[name] = hs.get(name, 0) + x.T @ x
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return hs


@pytest.mark.parametrize("arch,fields", [("llama", {}), ("qwen2", {}),
                                         ("mistral", {"sliding_window": 4, "attn_implementation": "eager"})],
                         ids=["llama", "qwen2-bias", "mistral-sliding-eager"])
def test_streamed_hessians_equal_full_forward(arch, fields):
    model = build_tiny_model(None, arch, weight_std=0.1, **fields)
    tokens = input_ids(5, 16)
    cal = collect_hessians(model, tokens, batch_size=2)  # 3 batches, the last one smaller
    ref = hooked_forward_hessians(model, tokens)
    assert set(cal.hessians) == set(ref)
    for name, h in ref.items():
        assert cal.hessians[name].dtype == torch.float64
        assert float((cal.hessians[name] - h).norm() / h.norm()) < 1e-6, name
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    assert cal.hessians[f"{attn}.q_proj"] is cal.hessians[f"{attn}.k_proj"] is cal.hessians[f"{attn}.v_proj"]
    assert cal.hessians[f"{mlp}.gate_proj"] is cal.hessians[f"{mlp}.up_proj"]
    assert cal.hessians[f"{attn}.o_proj"] is not cal.hessians[f"{attn}.q_proj"]
    assert cal.tokens == 5 * 16
    assert cal.peak_held_layers == 1.0  # each layer's outputs replaced its inputs


def test_layer_hessians_lookup_streams_in_layer_order():
    model = build_tiny_model(None, "llama", weight_std=0.1)
    tokens = input_ids(3, 8)
    full = collect_hessians(model, tokens).hessians
    lookup = LayerHessians(stream_hessians(model, tokens))
    assert lookup("model.embed_tokens") is None
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj",
                 "lm_head"):
        assert torch.equal(lookup(name), full[name]), name
    with pytest.raises(RuntimeError, match="layer order"):
        lookup("model.layers.0.mlp.up_proj")


def test_calibration_tokens_are_seeded_disjoint_windows(tmp_path):
    tok = char_tokenizer()
    rows = [{"text": "abc def ghi"}, {"prompt": "jk|", "completion": "kj"}, {"question": "1+1?", "answer": "2"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    path = write_jsonl(tmp_path / "cal.jsonl", rows)
    a = load_calibration_tokens(path, tok, samples=5, seq_len=8, seed=0)
    assert a.shape == (5, 8) and a.dtype == torch.long
    assert torch.equal(a, load_calibration_tokens(path, tok, samples=5, seq_len=8, seed=0))
    assert not torch.equal(a, load_calibration_tokens(path, tok, samples=5, seq_len=8, seed=1))
    texts = ["abc def ghi", "jk|kj", "Question: 1+1?\nAnswer: 2",
             tok.apply_chat_template(rows[3]["messages"], tokenize=False)] * 4
    ids = [tok(text)["input_ids"] for text in texts]
    stream = [t for row in ids for t in row + ([] if row[-1] == tok.eos_token_id else [tok.eos_token_id])]
    windows = {tuple(stream[i:i + 8]): i for i in range(0, len(stream) - 7, 8)}
    starts = [windows[tuple(row.tolist())] for row in a]  # every sample is one of the disjoint windows
    assert len(set(starts)) == 5


@pytest.mark.parametrize("content,needle", [
    ("", "has no rows"),
    ('{"text": "abc"}\n{"text": "abc"\n', "cal.jsonl:2:"),
    ('{"text": "abc"}\n\n{"body": "abc"}\n', "cal.jsonl:3: unknown row shape (keys ['body'])"),
    ('{"prompt": "abc", "completion": 3}\n', 'cal.jsonl:1: "completion" must be a string'),
    ('{"text": "abcdefgh"}\n', "--calibration-samples"),
    (None, "does not exist"),
], ids=["empty", "bad-json", "unknown-fields", "wrong-type", "too-few-tokens", "missing"])
def test_bad_calibration_file_is_one_line_error(tmp_path, content, needle):
    path = tmp_path / "cal.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(QosoraError) as e:
        load_calibration_tokens(path, char_tokenizer(), samples=4, seq_len=8, seed=0)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hessians_of_a_trained_qosora_model(tmp_path):
    """Adapted linears (SVDAdapterLinear, not nn.Linear) are calibrated under their module names."""
    import qosora
    from conftest import make_prepared

    model = qosora.load(make_prepared(tmp_path, "pissa", rank=4), dtype=torch.float32,
                        compute_dtype=torch.float32).eval()
    tokens = input_ids(3, 12, vocab=model.config.vocab_size)
    cal = collect_hessians(model, tokens, batch_size=2)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    hs = hooked_forward_hessians(model, tokens, want=lambda name, module: name.endswith(projections))
    assert set(cal.hessians) == set(hs) and len(hs) == 2 * 7 + 1
    for name, h in hs.items():
        assert float((cal.hessians[name] - h).norm() / h.norm()) < 1e-6, name
