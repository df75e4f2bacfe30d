"""Own int4 quantizers: the properties that make them fit NF4-derived weights, against direct numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from qosora.export.int4 import dequantize_int4, pack_low_first, relative_error
from qosora.export.quantizers import quantize_int4


def _nf4_like(n=32, k=256, seed=0):
    """Blocks that contain +absmax exactly, as every NF4 block does."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = w.reshape(n, -1, 32)
    idx = np.abs(blocks).argmax(-1)
    np.put_along_axis(blocks, idx[..., None], np.abs(np.take_along_axis(blocks, idx[..., None], -1)), -1)
    return blocks.reshape(n, k)


def test_sym_absmax_over_7_keeps_positive_absmax_exactly():
    w = _nf4_like()
    deq = dequantize_int4(quantize_int4(w, 32, "sym")).reshape(32, -1, 32)
    wb = w.reshape(32, -1, 32)
    np.testing.assert_allclose(deq.max(-1), wb.max(-1), rtol=1e-6)
    # onnxruntime's absmax / 8 on [-8, 7] would give 7/8 of it: the failure this scheme avoids
    s8 = np.abs(wb).max(-1, keepdims=True) / 8
    assert np.all(np.clip(np.rint(wb / s8), -8, 7).max(-1) * s8[..., 0] < 0.9 * wb.max(-1))


@pytest.mark.parametrize("k", [256, 200])  # 200: K not a multiple of the block (padded)
def test_searched_and_least_squares_schemes_never_lose_to_their_start(k):
    w = _nf4_like(k=256)[:, :k]
    err = {s: relative_error(w, dequantize_int4(quantize_int4(w, 32, s))) for s in ("sym", "sym-search", "asym", "asym-ls")}
    assert err["sym-search"] <= err["sym"] + 1e-7
    assert err["asym-ls"] <= err["asym"] + 1e-7
    assert all(0 < e < 0.15 for e in err.values())
    assert dequantize_int4(quantize_int4(w, 32, "asym-ls")).shape == w.shape


def test_asym_least_squares_recovers_an_existing_int4_grid():
    """Weights that already sit on a per-block grid s (u - z), integer z, are recovered exactly."""
    rng = np.random.default_rng(1)
    u = rng.integers(0, 16, size=(16, 4, 32)).astype(np.float32)
    u[..., 0], u[..., 1] = 0, 15  # every code range used
    s = rng.uniform(0.01, 0.1, size=(16, 4, 1)).astype(np.float32)
    z = rng.integers(1, 15, size=(16, 4, 1)).astype(np.float32)
    w = ((u - z) * s).reshape(16, 128)
    assert relative_error(w, dequantize_int4(quantize_int4(w, 32, "asym-ls"))) < 1e-5
    assert relative_error(w, dequantize_int4(quantize_int4(w, 32, "sym"))) > 1e-2


def test_pack_low_nibble_first():
    codes = np.array([[1, 2, 15, 0]], np.uint8)
    np.testing.assert_array_equal(pack_low_first(codes), np.array([[0x21, 0x0F]], np.uint8))


def test_float_zero_points_recover_an_offset_grid_that_integer_ones_cannot():
    """A Q4_1-like grid s u + m with arbitrary offset m: only a float zero point sits on it exactly."""
    rng = np.random.default_rng(2)
    u = rng.integers(0, 16, size=(16, 4, 32)).astype(np.float32)
    u[..., 0], u[..., 1] = 0, 15
    s = rng.uniform(0.01, 0.1, size=(16, 4, 1)).astype(np.float32)
    m = rng.uniform(-0.5, 0.0, size=(16, 4, 1)).astype(np.float32)
    w = (u * s + m).reshape(16, 128)
    q = quantize_int4(w, 32, "asym-ls-float")
    assert q.zero_points.dtype == np.float32
    assert relative_error(w, dequantize_int4(q)) < 1e-5
    assert relative_error(w, dequantize_int4(quantize_int4(w, 32, "asym-ls"))) > 1e-3


def test_hqq_lowers_each_blocks_mean_absolute_error_below_its_min_max_start():
    """HQQ keeps s = (max - min) / 15 and moves only the float zero point, starting from round(-min / s); every block
    ends with a mean |error| no larger than that start's (a float64 reference), and most blocks strictly lower."""
    rng = np.random.default_rng(3)
    w = (rng.standard_t(4, size=(48, 256)) * 0.02).astype(np.float32)  # heavy-tailed, like LLM weights
    q = quantize_int4(w, 64, "hqq")
    wb = w.astype(np.float64).reshape(48, -1, 64)
    lo, hi = wb.min(-1, keepdims=True), wb.max(-1, keepdims=True)
    s = (hi - lo) / 15
    np.testing.assert_allclose(q.scales, s[..., 0], rtol=1e-6)
    z0 = np.rint(-lo / s)
    start = np.abs(wb - s * (np.clip(np.rint(wb / s + z0), 0, 15) - z0)).mean(-1)
    got = np.abs(wb - dequantize_int4(q).reshape(48, -1, 64)).mean(-1)
    assert np.all(got <= start * (1 + 1e-5))
    assert np.mean(got < start * 0.999) > 0.5
    assert q.zero_points.dtype == np.float32 and not np.allclose(q.zero_points, np.rint(q.zero_points))


@pytest.mark.parametrize("scheme", ["hqq", "asym-ls-float", "sym"])
def test_parallel_row_chunks_give_the_same_result(monkeypatch, scheme):
    """Large weights are quantized in row chunks on threads; the codes must not depend on that."""
    import qosora.export.quantizers as quantizers

    w = (np.random.default_rng(4).standard_normal((300, 1024)) * 0.02).astype(np.float32)
    monkeypatch.setattr(quantizers, "_WORKERS", 3)
    a = quantize_int4(w, 32, scheme)
    monkeypatch.setattr(quantizers, "_WORKERS", 1)
    b = quantize_int4(w, 32, scheme)
    assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)
    assert (a.zero_points is None) == (b.zero_points is None) == (scheme == "sym")
    assert scheme == "sym" or np.array_equal(a.zero_points, b.zero_points)
