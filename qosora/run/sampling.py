"""Choosing the next token from the last position's logits (numpy, float32), one prompt at a time.

    l'  = l / penalty where l > 0, l * penalty elsewhere, for ids already in prompt + output   (CTRL; transformers'
          RepetitionPenaltyLogitsProcessor)
    z   = l' / temperature;  top-k: z < k-th largest -> -inf;  top-p: keep the most likely tokens until their
          probability reaches p (at least one)
    next = argmax l'  (temperature 0)   or   a draw from softmax(z) with the prompt's own generator

Each prompt owns `np.random.default_rng(seed)`: its draws do not depend on which prompts share its batch, so a
batched run samples what one-by-one runs sample, and a prompt repeated in a file gives the same text each time.
"""

from __future__ import annotations

import numpy as np

from qosora.run.options import GenerationOptions


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """logits [V] float32, seen [V] bool -> penalized copy."""
    out = logits.copy()
    hit = out[seen]
    out[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    return out


def top_k_filter(z: np.ndarray, k: int) -> np.ndarray:
    """-inf below the k-th largest value (ties with it are kept); k = 0 or k >= V keeps everything."""
    if k <= 0 or k >= z.shape[-1]:
        return z
    kth = np.partition(z, -k)[-k]
    return np.where(z < kth, -np.inf, z)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def top_p_filter(probs: np.ndarray, p: float) -> np.ndarray:
    """Zero all but the smallest set of most likely tokens whose probability sums to >= p; renormalized."""
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cum, p * cum[-1])) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


class Sampler:
    """The next-token rule of one prompt: its options, its generator and (with a repetition penalty) the ids seen."""

    def __init__(self, options: GenerationOptions, vocab_size: int, prompt_ids: list[int]):
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        self.seen = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, bool)
            self.seen[np.asarray(prompt_ids, np.int64)] = True

    def __call__(self, logits: np.ndarray) -> int:
        """logits [V] float32 of the last position -> the next id."""
        o = self.options
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, o.repetition_penalty)
        if o.greedy:
            return int(np.argmax(logits))
        probs = softmax(top_k_filter(logits.astype(np.float64) / o.temperature, o.top_k))
        cdf = np.cumsum(top_p_filter(probs, o.top_p))
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1))

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True
