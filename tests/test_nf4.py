"""NF4 residual storage: round trip through our tensors is bit-exact and the 4-bit matmul is x @ deq(W).T."""

import pytest
import torch

from qosora.nf4 import NF4Weight, nf4_matmul, quantize_nf4


@pytest.mark.parametrize("double_quant", [True, False])
def test_serialised_nf4_dequantizes_identically(double_quant):
    torch.manual_seed(0)
    W = torch.randn(96, 128)
    q = quantize_nf4(W, 64, double_quant, "float32")
    tensors = q.to_tensors("m.nf4")
    assert tensors["m.nf4.data"].dtype == torch.uint8 and tensors["m.nf4.data"].numel() == 96 * 128 // 2
    back = NF4Weight.from_tensors(tensors, "m.nf4", 64, "float32")
    assert torch.equal(back.dequantize(), q.dequantize())
    assert back.shape == (96, 128)


def test_nf4_error_is_what_4_bits_give():
    torch.manual_seed(0)
    W = torch.randn(128, 256)
    deq = quantize_nf4(W, 64, True, "float32").dequantize()
    rel = ((deq - W).norm() / W.norm()).item()
    assert 0.05 < rel < 0.12  # NF4 on Gaussian weights: ~9-10 %


def test_absmax_fp32_is_the_block_absmax():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    q = quantize_nf4(W, 64, True, "float32")
    expected = W.reshape(-1, 64).abs().amax(dim=1)
    torch.testing.assert_close(q.absmax_fp32(), expected, rtol=2e-2, atol=1e-3)  # double quant is 8-bit


def test_matmul_equals_dequantized_dense():
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(48, 64), 64, True, "float32")
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = nf4_matmul(x, q)
    torch.testing.assert_close(y, x @ q.dequantize().T, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize().sum(0).expand(3, 5, 64), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 128), (33, 70)])  # 33 x 70 = 2310: a partial last block and an odd count
def test_searched_scale_matches_a_float64_reference(shape, double_quant):
    """scale="search": each block's stored scale is, in float64, the best of the candidate fractions of its absmax
    refitted by least squares to the levels it rounds to (then double-quantized like bitsandbytes' absmax); no
    block's error exceeds its absmax error; the codes are the nearest levels under the stored scale, and the packed
    bytes dequantize through bitsandbytes to exactly code[level] * scale."""
    from qosora.nf4 import SCALE_FRACTIONS, _bnb

    torch.manual_seed(0)
    W = torch.randn(*shape) * torch.logspace(-1, 0, shape[1])  # blocks of different scales
    q = quantize_nf4(W, 64, double_quant, "float32", scale="search")
    F = _bnb()[1]
    code = F.get_4bit_type("nf4", device="cpu").double()
    flat = torch.nn.functional.pad(W.reshape(-1).double(), (0, -W.numel() % 64)).reshape(-1, 64)

    def nearest(s):  # [blocks, 64] levels under per-block scales s [blocks, 1], by brute force
        return code[(flat / s).unsqueeze(-1).sub(code).abs().argmin(-1)]

    def block_err(s):
        return ((nearest(s) * s - flat) ** 2).sum(1)

    absmax = flat.abs().amax(1, keepdim=True)
    candidates = torch.stack([absmax * f for f in SCALE_FRACTIONS])  # [fractions, blocks, 1]
    pick = torch.stack([block_err(s) for s in candidates]).argmin(0)
    chosen = candidates[pick, torch.arange(flat.shape[0])]
    levels = nearest(chosen)
    best = ((flat * levels).sum(1) / (levels * levels).sum(1))[:, None]
    assert (block_err(best) <= block_err(absmax) * (1 + 1e-12)).all()
    best = best[:, 0]
    if double_quant:  # the chosen scales go through bitsandbytes' 8-bit blockwise map, as absmax does
        best32 = best.float()
        best = F.dequantize_blockwise(*F.quantize_blockwise(best32 - best32.mean(), blocksize=256)) + best32.mean()
    stored = q.absmax_fp32().double()
    torch.testing.assert_close(stored, best.double(), rtol=1e-5, atol=1e-7)
    expected = (nearest(stored[:, None]) * stored[:, None]).reshape(-1)[: W.numel()].reshape(shape)
    torch.testing.assert_close(q.dequantize().double(), expected, rtol=1e-6, atol=1e-6)
    absmax_error = (quantize_nf4(W, 64, double_quant, "float32").dequantize() - W).norm()
    assert (q.dequantize() - W).norm() < 0.97 * absmax_error  # the point of searching: ~6 % less error


def test_searched_scale_serialises_and_multiplies_like_absmax():
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(48, 64), 64, True, "float32", scale="search")
    back = NF4Weight.from_tensors(q.to_tensors("m"), "m", 64, "float32")
    assert torch.equal(back.dequantize(), q.dequantize())
    x = torch.randn(3, 64)
    torch.testing.assert_close(nf4_matmul(x, back), x @ q.dequantize().T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 128), (33, 70)])
def test_absmax_scale_is_bitsandbytes_quantizer_bit_for_bit(shape, double_quant, compute_dtype):
    from qosora.nf4 import DTYPES, _bnb

    F = _bnb()[1]
    torch.manual_seed(1)
    W = torch.randn(*shape) * torch.logspace(-2, 0, shape[1])
    ours = quantize_nf4(W, 64, double_quant, compute_dtype)
    data, state = F.quantize_4bit(W.to(DTYPES[compute_dtype]), blocksize=64, compress_statistics=double_quant,
                                  quant_type="nf4")
    assert torch.equal(ours.data, data) and torch.equal(ours.state.absmax, state.absmax)
    assert torch.equal(ours.dequantize(), F.dequantize_4bit(data, state))
