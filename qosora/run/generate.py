"""Text in, text out, on the deploy host: tokenizer (`tokenizers`) + OnnxCausalLM. No torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qosora.run.decoder import OnnxCausalLM, StepTimes


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export copies tokenizer.json from the source model")
    return Tokenizer.from_file(str(path))


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
    process needs the cores; pass False when PyTorch or other sessions run alongside)."""
    model = model or OnnxCausalLM(model_dir, threads=threads, spinning=spinning)
    tok = load_tokenizer(model_dir)
    ids = tok.encode(prompt).ids
    gen = model.generation_config()
    eos = gen.get("eos_token_id", ())
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    times = StepTimes()
    new = model.generate(ids, max_new_tokens, eos_token_ids=eos, temperature=temperature, seed=seed, times=times)
    text = tok.decode([t for t in new if t not in eos])
    return GenerationResult(text, len(ids), new, times.prefill_s * 1e3, times.decode_tokens_per_s)
