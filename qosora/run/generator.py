"""Text in, text out, on the deploy host: `Generator` = tokenizer (`tokenizers`) + chat template + `OnnxCausalLM`,
one session per directory. No torch.

    g = Generator("out/")
    for piece in g.stream("The capital of France is", GenerationOptions(max_new_tokens=32)):
        print(piece, end="", flush=True)
    results = g.generate(prompts, GenerationOptions(temperature=0.7), batch_size=4)   # input order kept

A prompt is a string (raw continuation), a list of token ids, or a list of chat messages [{"role", "content"}]
(rendered with the model's chat template). A row stops at an EOS id of generation_config.json, at a stop string
(cut from the text), or at max_new_tokens / the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from qosora.errors import QosoraError
from qosora.run.chat import ChatTemplate
from qosora.run.decoder import OnnxCausalLM
from qosora.run.options import GenerationOptions, RuntimeOptions
from qosora.run.sampling import Sampler
from qosora.run.session import resolve_providers
from qosora.run.text import TextStream

Prompt = Union[str, list]  # text, token ids, or chat messages


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


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: list[int]  # the generated ids (the EOS id included when it ended the row)
    prefill_ms: float  # the prefill of the row's batch
    decode_tokens_per_s: float  # tokens after the first / time of the steps until the row finished
    stop_reason: str = "length"  # "eos" | "stop" | "length"

    def to_dict(self) -> dict:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens, "new_tokens": len(self.new_tokens),
                "token_ids": self.new_tokens, "prefill_ms": self.prefill_ms,
                "decode_tokens_per_s": self.decode_tokens_per_s, "stop_reason": self.stop_reason}


class _Row:
    """One prompt in a batch: its sampler, its text stream, where it stopped."""

    def __init__(self, ids: list[int], options: GenerationOptions, vocab: int, tokenizer, budget: int,
                 streamed: bool):
        self.ids, self.budget, self.new = ids, budget, []
        self.pick = Sampler(options, vocab, ids)
        self.text = TextStream(tokenizer, options.stop, incremental=streamed)
        self.reason, self.decode_s = None, 0.0


class Generator:
    """One session per exported directory; `model` reuses an OnnxCausalLM already loaded from it."""

    def __init__(self, model_dir: str | Path, provider: str = "auto", threads: int | None = None,
                 spinning: bool = True, model: OnnxCausalLM | None = None):
        RuntimeOptions(provider=provider, threads=threads, spinning=spinning).validate()
        self.model_dir = Path(model_dir)
        if model is None and not (self.model_dir / "model.onnx").is_file():
            raise QosoraError(f"{model_dir} has no model.onnx: pass a directory written by `qosora export --onnx`")
        providers = resolve_providers(provider) if model is None else None
        self.tokenizer = load_tokenizer(self.model_dir)
        self.lm = model or OnnxCausalLM(self.model_dir, threads=threads, providers=providers, spinning=spinning)
        eos = self.lm.generation_config().get("eos_token_id", self.lm.config().get("eos_token_id"))
        self.eos = frozenset(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self._chat: ChatTemplate | None = None

    @property
    def chat_template(self) -> ChatTemplate:
        if self._chat is None:
            self._chat = ChatTemplate.load(self.model_dir)
        return self._chat

    def encode(self, prompt: Prompt, where: str = "the prompt") -> list[int]:
        """Token ids of a prompt; raw text gets the tokenizer's special tokens (BOS), a rendered chat template
        carries its own."""
        if isinstance(prompt, str):
            if not prompt:
                raise QosoraError(f"{where}: --prompt is empty: pass the text to continue")
            ids = self.tokenizer.encode(prompt).ids
        elif isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt) and prompt:
            ids = self.tokenizer.encode(self.chat_template.render(prompt), add_special_tokens=False).ids
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= self.lm.vocab_size for t in ids):
                raise QosoraError(f"{where}: token ids must be in [0, {self.lm.vocab_size})")
        else:
            raise QosoraError(f"{where}: a prompt is a string, a list of token ids or a list of messages")
        self.lm.check_prompt(len(ids), where)
        return ids

    def stream(self, prompt: Prompt, options: GenerationOptions = GenerationOptions()) -> Iterator[str]:
        """Text pieces of one prompt's continuation as they become final; "".join(...) == generate(...)[0].text."""
        for _, piece in self._decode([self.encode(prompt)], options.validate(), [], streamed=True):
            yield piece

    def generate(self, prompts: list[Prompt], options: GenerationOptions = GenerationOptions(),
                 batch_size: int = 1) -> list[GenerationResult]:
        """Every prompt's result, in input order; `batch_size` prompts are decoded together."""
        options = options.validate()
        RuntimeOptions(batch_size=batch_size).validate()
        ids = [self.encode(p, f"prompt {i + 1}" if len(prompts) > 1 else "the prompt") for i, p in enumerate(prompts)]
        results: list[GenerationResult] = []
        for start in range(0, len(ids), batch_size):
            for _ in self._decode(ids[start:start + batch_size], options, results):
                pass
        return results

    def _decode(self, rows: list[list[int]], options: GenerationOptions, results: list,
                streamed: bool = False) -> Iterator[tuple[int, str]]:
        """Prefill then step until every row stopped; yields (row, text piece), appends the rows' results."""
        lm, eos = self.lm, frozenset() if options.ignore_eos else self.eos
        state = [_Row(r, options, lm.vocab_size, self.tokenizer, lm.budget(len(r), options.max_new_tokens), streamed)
                 for r in rows]
        batch = lm.start(rows, options.max_new_tokens)
        greedy = options.greedy and options.repetition_penalty == 1.0
        running = np.ones(len(rows), bool)
        t0 = time.perf_counter()
        logits = batch.prefill()
        prefill_s, step_s = time.perf_counter() - t0, 0.0
        while True:
            t0 = time.perf_counter()
            tokens = logits.argmax(-1) if greedy else np.array(
                [row.pick(logits[i]) if running[i] else 0 for i, row in enumerate(state)])
            for i, row in enumerate(state):
                if not running[i]:
                    continue
                row.decode_s += step_s
                token = int(tokens[i])
                row.new.append(token)
                row.pick.observe(token)
                if token in eos:
                    row.reason = "eos"
                else:
                    piece = row.text.push(token)
                    if row.text.stopped:
                        row.reason = "stop"
                    if piece:
                        yield i, piece
                if row.reason is None and len(row.new) >= row.budget:
                    row.reason = "length"
                if row.reason is not None:
                    running[i] = False
                    piece = row.text.finish()
                    if piece:
                        yield i, piece
            if not running.any():
                break
            logits = batch.step(tokens, running)
            step_s = time.perf_counter() - t0
        for row in state:
            n = len(row.new) - 1
            results.append(GenerationResult(row.text.text, len(row.ids), row.new, prefill_s * 1e3,
                                            n / row.decode_s if n and row.decode_s else 0.0, row.reason))


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, threads: int | None = None, model: OnnxCausalLM | None = None,
             spinning: bool = True, provider: str = "auto", **options) -> GenerationResult:
    """Continue `prompt` with the exported model in `model_dir` (greedy by default); stops at the EOS token(s).

    `spinning` keeps onnxruntime's worker threads spinning between ops (faster decode when nothing else in the
    process needs the cores; pass False when PyTorch or other sessions run alongside). `options`: the other
    GenerationOptions fields (top_k, top_p, repetition_penalty, stop). `model` reuses a loaded OnnxCausalLM.
    Bad options, a missing or corrupt file, an empty prompt or one that fills the context raise QosoraError."""
    opts = GenerationOptions(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, **options).validate()
    return Generator(model_dir, provider, threads, spinning, model=model).generate([prompt], opts)[0]
