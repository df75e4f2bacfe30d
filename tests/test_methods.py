"""Each method's adapter against a float64 dense reference, its trainable count against the formula in methods.py."""

import pytest
import torch

from qosora.adapted import AdaptedWeight
from qosora.decompose import Principal
from qosora.layer import SVDAdapterLinear
from qosora.methods import METHOD_SPECS, orthonormality

D_OUT, D_IN, R = 24, 40, 6


def factors_for(method):
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(D_OUT, R))
    V, _ = torch.linalg.qr(torch.randn(D_IN, R))
    p = Principal(U, torch.rand(R) + 0.5, V.T.contiguous())
    f = METHOD_SPECS[method].init(p, D_OUT, D_IN, R, torch.Generator().manual_seed(0))
    # Perturb every factor so that a forward that ignores one of them (e.g. OSoRA's O) would fail.
    return {k: v + 0.1 * torch.randn_like(v) for k, v in f.items()}


def dense_delta_reference(method, f):
    f = {k: v.double() for k, v in f.items()}
    if method == "sorsa":
        return f["U"] @ torch.diag(f["S"]) @ f["Vh"]
    if method == "osora":
        return torch.diag(f["O"]) @ f["U"] @ torch.diag(f["S"]) @ f["Vh"]
    return f["B"] @ f["A"]


@pytest.mark.parametrize("method", list(METHOD_SPECS))
def test_forward_and_lowrank_match_dense_reference(method):
    spec, f = METHOD_SPECS[method], factors_for(method)
    x = torch.randn(4, D_IN)
    ref = x.double() @ dense_delta_reference(method, f).T
    torch.testing.assert_close(spec.forward(f, x).double(), ref, atol=1e-5, rtol=1e-5)
    B, A = spec.lowrank(f)
    torch.testing.assert_close((B @ A).double(), dense_delta_reference(method, f), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,expected", [
    ("sorsa", R * (D_IN + D_OUT) + R),
    ("osora", R + D_OUT),
    ("pissa", R * (D_IN + D_OUT)),
    ("qlora", R * (D_IN + D_OUT)),
])
def test_trainable_count_follows_the_formula(method, expected):
    assert METHOD_SPECS[method].trainable_count(D_OUT, D_IN, R) == expected
    layer = SVDAdapterLinear(AdaptedWeight(METHOD_SPECS[method], torch.randn(D_OUT, D_IN), factors_for(method)),
                             compute_dtype="float32")
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("method", list(METHOD_SPECS))
def test_gradients_reach_exactly_the_declared_factors(method):
    weight = AdaptedWeight(METHOD_SPECS[method], torch.randn(D_OUT, D_IN), factors_for(method), torch.randn(D_OUT))
    layer = SVDAdapterLinear(weight, compute_dtype="float32")
    layer(torch.randn(3, D_IN)).square().sum().backward()
    with_grad = {n for n, p in layer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == set(METHOD_SPECS[method].trainable)


def test_qlora_starts_at_zero_delta():
    f = METHOD_SPECS["qlora"].init(None, D_OUT, D_IN, R, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(f["B"]) == 0 and torch.count_nonzero(f["A"]) > 0


def test_orthonormality_against_float64():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(D_OUT, R))
    V, _ = torch.linalg.qr(torch.randn(D_IN, R))
    assert orthonormality(U, V.T).item() < 1e-5
    U2, Vh2 = torch.randn(D_OUT, R), torch.randn(R, D_IN)
    eye = torch.eye(R, dtype=torch.float64)
    ref = torch.linalg.norm(U2.double().T @ U2.double() - eye) + torch.linalg.norm(Vh2.double() @ Vh2.double().T - eye)
    torch.testing.assert_close(orthonormality(U2, Vh2).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(METHOD_SPECS))
def test_adapted_weight_merged_is_the_layer_function(method):
    """merged() x + bias equals the layer's forward in fp32, against a float64 reference."""
    res, f, bias = torch.randn(D_OUT, D_IN), factors_for(method), torch.randn(D_OUT)
    weight = AdaptedWeight(METHOD_SPECS[method], res, f, bias)
    x = torch.randn(5, D_IN)
    ref = x.double() @ (res.double() + dense_delta_reference(method, f)).T + bias.double()
    torch.testing.assert_close((x @ weight.merged().T + bias).double(), ref, atol=1e-5, rtol=1e-5)
    layer = SVDAdapterLinear(weight, compute_dtype="float32")
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.adapted().merged(), weight.merged())
