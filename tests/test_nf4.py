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
