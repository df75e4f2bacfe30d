"""Shared fixtures: tiny Llama-shaped models built in code (no hub), seeded random weights."""

from __future__ import annotations

import os

os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(arch: str = "llama", tied: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=tied)
    if arch == "mistral":
        return MistralConfig(**TINY, tie_word_embeddings=tied, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=tied)  # q/k/v carry biases
    raise ValueError(arch)


def build_tiny_model(path, arch: str = "llama", tied: bool = False, seed: int = 0):
    """Save a tiny model with seeded random weights (biases non-zero so that losing them would show)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture
def tiny_llama(tmp_path):
    path = tmp_path / "llama"
    model = build_tiny_model(path, "llama")
    return path, model


@pytest.fixture(params=[("llama", True), ("qwen2", False), ("mistral", False)], ids=["llama-tied", "qwen2-bias", "mistral"])
def tiny_model(request, tmp_path):
    arch, tied = request.param
    path = tmp_path / arch
    model = build_tiny_model(path, arch, tied)
    return path, model


def input_ids(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
