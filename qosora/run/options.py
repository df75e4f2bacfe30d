"""The options of the deploy path, declared once: what to generate (`GenerationOptions`) and how to run the session
(`RuntimeOptions`). `qosora generate` and `qosora bench` derive their flags from these fields; the Python API takes
the same dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from qosora.errors import QosoraError
from qosora.options import check, option

Provider = Literal["auto", "cpu", "cuda"]
PROVIDERS: tuple[str, ...] = get_args(Provider)
STOP_HELP = "stop when the text contains S (repeatable; S is cut from the text)"


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding of one prompt: greedy at temperature 0, else sampled (repetition penalty -> temperature -> top-k ->
    top-p). Each prompt draws from its own `np.random.default_rng(seed)`, so its text does not depend on the other
    prompts of its batch."""

    max_new_tokens: int = option(64, "tokens to generate at most (also capped by the model's context)", min=1)
    temperature: float = option(0.0, "sampling temperature; 0 = greedy", min=0)
    top_k: int = option(0, "sample from the k most likely tokens only; 0 = off", min=0)
    top_p: float = option(1.0, "sample from the smallest set of tokens whose probability reaches p", gt=0, max=1)
    repetition_penalty: float = option(1.0, "divide positive logits (multiply negative ones) of tokens already in "
                                            "the prompt or the output by this (CTRL; 1 = off)", gt=0)
    stop: tuple[str, ...] = option((), STOP_HELP, flag="--stop", cli=False)  # a repeatable flag: the verbs add it
    seed: int = option(0, "seed of each prompt's sampler")
    ignore_eos: bool = option(False, "keep generating past the EOS token (benchmarks)", cli=False)

    def validate(self) -> "GenerationOptions":
        check(self)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise QosoraError(f"--stop takes non-empty strings, got {self.stop!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class BenchOptions:
    """What `qosora bench` measures; the lists are comma-separated on the command line."""

    prompt_len: tuple[int, ...] = option((64, 512), "prompt lengths in tokens (comma-separated)", cli=False)
    gen_len: tuple[int, ...] = option((128,), "tokens generated per run (comma-separated)", cli=False)
    batch_size: tuple[int, ...] = option((1, 4), "sequences decoded together (comma-separated)", cli=False)
    repeats: int = option(3, "runs per point; the median is reported", min=1)
    against_genai: bool = option(False, "also run onnxruntime-genai's Generator on the directory")

    def validate(self) -> "BenchOptions":
        check(self)
        for name in ("prompt_len", "gen_len", "batch_size"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise QosoraError(f"--{name.replace('_', '-')} takes positive integers, got {values!r}")
        return self


@dataclass(frozen=True)
class RuntimeOptions:
    """The onnxruntime session and how prompts are grouped."""

    provider: Provider = option("auto", "execution provider; auto = CUDA when onnxruntime has it, else CPU")
    threads: int | None = option(None, "onnxruntime intra-op threads (default: all cores)", min=1)
    batch_size: int = option(1, "prompts decoded together (--input)", min=1)
    spinning: bool = option(True, "let onnxruntime's idle threads sleep (slower decode; for machines shared with "
                                  "other work)", flag="--no-spinning")

    def validate(self) -> "RuntimeOptions":
        check(self)
        return self
