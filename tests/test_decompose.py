"""SVD split math against float64 references, on the shapes that break things."""

import pytest
import torch

from qosora.config import SVDConfig
from qosora.decompose import principal_split, relative_error, top_r_svd
from qosora.errors import QosoraError
from qosora.nf4 import nf4_roundtrip

SHAPES = [(48, 32), (32, 48), (40, 40)]


def reference_top_r(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 7, "min"])
def test_exact_top_r_matches_float64(shape, rank):
    torch.manual_seed(0)
    W = torch.randn(shape)
    r = min(shape) if rank == "min" else rank
    p = top_r_svd(W, r, SVDConfig(solver="exact"))
    assert p.U.shape == (shape[0], r) and p.S.shape == (r,) and p.Vh.shape == (r, shape[1])
    torch.testing.assert_close(p.dense().double(), reference_top_r(W, r), atol=1e-4, rtol=1e-4)
    assert torch.all(p.S[:-1] >= p.S[1:]), "singular values must come sorted, largest first"


def test_full_rank_reconstructs_w():
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    p = top_r_svd(W, 24, SVDConfig(solver="exact"))
    assert relative_error(p.dense(), W) < 1e-5


def test_randomized_svd_finds_the_top_subspace_of_a_low_rank_plus_noise_matrix():
    torch.manual_seed(0)
    d_out, d_in, r = 300, 200, 8
    W = torch.randn(d_out, r) @ torch.randn(r, d_in) * 3 + 0.01 * torch.randn(d_out, d_in)
    p = top_r_svd(W, r, SVDConfig(solver="randomized", oversample=8, niter=2))
    ref = reference_top_r(W, r)
    assert relative_error(p.dense(), ref.float()) < 1e-3


def test_randomized_svd_is_deterministic_for_a_seed():
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(3))
    a = top_r_svd(W, 4, SVDConfig(solver="randomized", seed=5))
    b = top_r_svd(W, 4, SVDConfig(solver="randomized", seed=5))
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_plus_stored_principal_is_w(dtype):
    torch.manual_seed(0)
    W = torch.randn(64, 48)
    p, R = principal_split(W, 5, SVDConfig(solver="randomized"), store_dtype=dtype)
    assert p.U.dtype == dtype
    torch.testing.assert_close(R + p.dense(), W, atol=1e-6, rtol=0)


def test_rank_too_large_names_the_limit():
    with pytest.raises(QosoraError, match="rank 49 is too large .* --rank <= 48"):
        top_r_svd(torch.randn(48, 64), 49)


def test_refinement_lowers_the_quantized_error():
    # A weight with a heavy-tailed spectrum, like real ones: refinement must beat one round, which beats plain NF4.
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(128, 128))
    V, _ = torch.linalg.qr(torch.randn(256, 128))
    W = (U * (torch.arange(1, 129.0) ** -1.0)) @ V.T + 0.002 * torch.randn(128, 256)

    def quantized_error(rounds):
        p, R = principal_split(W, 16, SVDConfig(solver="exact", refine_rounds=rounds), quant_roundtrip=nf4_roundtrip)
        return relative_error(nf4_roundtrip(R) + p.dense(), W)

    plain = relative_error(nf4_roundtrip(W), W)
    one, five = quantized_error(1), quantized_error(5)
    assert one < 0.8 * plain
    assert five < one
