"""Next-token rules against references: transformers' logits processors where importable, float64 numpy otherwise;
the sampler's draws against the distribution it claims."""

from __future__ import annotations

import numpy as np
import pytest

from qosora.run.options import GenerationOptions
from qosora.run.sampling import Sampler, apply_repetition_penalty, softmax, top_k_filter, top_p_filter


def logits(v: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, v).astype(np.float32)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    x, ids = logits(), [3, 7, 7, 20, 41]
    seen = np.zeros(50, bool)
    seen[ids] = True
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), torch.tensor(x)[None])[0].numpy()
    np.testing.assert_allclose(apply_repetition_penalty(x, seen, penalty), ref, rtol=1e-6)
    assert apply_repetition_penalty(x, seen, penalty)[0] == x[0]  # unseen ids untouched


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_keeps_the_k_largest(k):
    x = logits()
    kept = np.flatnonzero(np.isfinite(top_k_filter(x, k)))
    assert sorted(kept) == sorted(np.argsort(-x)[:k])
    assert np.array_equal(top_k_filter(x, 0), x) and np.array_equal(top_k_filter(x, 50), x)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    x = logits().astype(np.float64)
    probs = softmax(x)
    order = np.argsort(-probs)
    n = next(i + 1 for i in range(len(order)) if probs[order[: i + 1]].sum() >= p)  # float64 reference
    out = top_p_filter(probs, p)
    assert sorted(np.flatnonzero(out)) == sorted(order[:n])
    np.testing.assert_allclose(out.sum(), 1.0)
    try:
        import torch
        from transformers import TopPLogitsWarper
    except ImportError:
        return
    ref = TopPLogitsWarper(p)(None, torch.tensor(x)[None])[0].numpy()
    assert sorted(np.flatnonzero(np.isfinite(ref))) == sorted(order[:n])


def test_draws_follow_the_distribution():
    x = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    s = Sampler(GenerationOptions(temperature=0.8, seed=5), 5, [])
    draws = np.bincount([s(x) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(draws, softmax(x.astype(np.float64) / 0.8), atol=0.015)


def test_top_k_and_top_p_restrict_the_draws():
    x = np.array([2.0, 1.9, 1.8, -1.0, 0.0], np.float32)
    s = Sampler(GenerationOptions(temperature=1.0, top_k=2, seed=1), 5, [])
    assert {s(x) for _ in range(500)} == {0, 1}
    s = Sampler(GenerationOptions(temperature=1.0, top_p=0.5, seed=1), 5, [])
    assert {s(x) for _ in range(500)} == {0, 1}  # p(0) ~ 0.36 < 0.5 <= p(0) + p(1)


def test_seed_and_greedy():
    x = logits()
    a = Sampler(GenerationOptions(temperature=1.0, seed=3), 50, [])
    b = Sampler(GenerationOptions(temperature=1.0, seed=3), 50, [])
    c = Sampler(GenerationOptions(temperature=1.0, seed=4), 50, [])
    da, db, dc = ([s(x) for _ in range(30)] for s in (a, b, c))
    assert da == db and da != dc
    assert Sampler(GenerationOptions(), 50, [])(x) == int(np.argmax(x))
    greedy_penalized = Sampler(GenerationOptions(repetition_penalty=1e6), 50, [int(np.argmax(x))])(x)
    assert greedy_penalized == int(np.argsort(-x)[1]) or x[np.argmax(x)] <= 0
