"""Text in, text out, on the deploy host: tokenizer (`tokenizers`) + OnnxCausalLM. No torch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qosora.errors import QosoraError
from qosora.run.decoder import OnnxCausalLM, StepTimes


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise QosoraError(f"{path} not found: copy tokenizer.json from the source model into {model_dir} "
                          "(`qosora export` copies it when the source has one)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QosoraError(f"{path} cannot be read ({first}): copy tokenizer.json again from the source model") from None


def check_generation_options(prompt: str, max_new_tokens: int, temperature: float) -> None:
    if not isinstance(prompt, str) or not prompt:
        raise QosoraError("--prompt is empty: pass the text to continue")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QosoraError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise QosoraError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: list[int]
    prefill_ms: float
    decode_tokens_per_s: float


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, threads: int | None = None, model: OnnxCausalLM | None = None,
             spinning: bool = True) -> GenerationResult:
    """Continue `prompt` with the exported model in `model_dir` (greedy by default); stops at the EOS token(s).

    `spinning` keeps onnxruntime's worker threads spinning between ops (faster decode when nothing else in the
    process needs the cores; pass False when PyTorch or other sessions run alongside). Bad options, a missing or
    corrupt file, an empty prompt or one that fills the context raise QosoraError."""
    check_generation_options(prompt, max_new_tokens, temperature)
    tok = load_tokenizer(model_dir)
    model = model or OnnxCausalLM(model_dir, threads=threads, spinning=spinning)
    ids = tok.encode(prompt).ids
    gen = model.generation_config()
    eos = gen.get("eos_token_id", ())
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    times = StepTimes()
    new = model.generate(ids, max_new_tokens, eos_token_ids=eos, temperature=temperature, seed=seed, times=times)
    text = tok.decode([t for t in new if t not in eos])
    return GenerationResult(text, len(ids), new, times.prefill_s * 1e3, times.decode_tokens_per_s)
