"""An exported decoder in onnxruntime: the step loop (`DecodeBatch`: prefill, then one token per row per step, the
cache bound on the device) and `OnnxCausalLM`, the session plus numpy-level access (`forward`, `generate`).

A decode step binds input_ids [B, 1], the mask [B, T] (a view of a buffer allocated once), position_ids [B, 1]
(standard contract) and the cache (`cache.py`), runs, and hands back the last position's logits as float32 [B, V].
Nothing in a step grows with the sequence except, for B > 1, the B * T int64 mask refill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from qosora.architectures import read_json_object
from qosora.errors import QosoraError
from qosora.run.cache import ConcatCache, Mask, SharedBufferCache
from qosora.run.options import GenerationOptions
from qosora.run.sampling import Sampler
from qosora.run.session import GraphIO, load_session


def _scalar(k: int) -> ort.OrtValue:
    """An int64 scalar as an OrtValue: `logits_to_keep` is often an input with an initializer default, which
    bind_cpu_input cannot find ("Failed to find NodeArg") but bind_ortvalue_input binds."""
    return ort.OrtValue.ortvalue_from_numpy(np.array(k, np.int64))


@dataclass
class StepTimes:
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else 0.0


class DecodeBatch:
    """One batch of prompts through the model: `prefill()` -> logits [B, V], then `step(tokens, running)` -> logits
    [B, V] for each token fed. `running[b]` False freezes row b (its mask stops growing; its logits are ignored).

    Standard contract: rows LEFT padded to S, T = S + steps for all rows, position = ones before it - 1.
    gqa contract: rows RIGHT padded, row b's length hi_b grows by one per step, T = max_b hi_b.
    """

    def __init__(self, lm: "OnnxCausalLM", rows: list[list[int]], length: int):
        io, b = lm.io, len(rows)
        self.lm, self.io, self.batch = lm, io, b
        lens = np.array([len(r) for r in rows], np.int64)
        self.lens, s = lens, int(lens.max())
        self.left = io.contract == "standard"
        self.ids = np.zeros((b, s), np.int64)
        for i, r in enumerate(rows):
            if self.left:
                self.ids[i, s - len(r):] = r
            else:
                self.ids[i, :len(r)] = r
        lo = s - lens if self.left else np.zeros(b, np.int64)
        self.mask = Mask(lo, np.full(b, s) if self.left else lens, length)
        self.width = s
        self.cache = ConcatCache(io, b) if self.left else SharedBufferCache(io, b, length)
        self.binding = lm.session.io_binding()
        self.next_ids = np.zeros((b, 1), np.int64)
        self.positions = np.zeros((b, 1), np.int64)
        self.logits = None  # preallocated [B, 1, V] decode output, made on the first step

    def prefill(self) -> np.ndarray:
        bd, s = self.binding, self.width
        bd.bind_cpu_input("input_ids", self.ids)
        mask = self.mask.view(s)
        bd.bind_cpu_input("attention_mask", mask)
        if self.left:
            bd.bind_cpu_input("position_ids", (np.cumsum(mask, axis=1) - 1).clip(min=0))
        last = np.full(self.batch, s - 1) if self.left else self.lens - 1  # last real position of each row
        keep = 1 if self.left or self.batch == 1 else s - int(self.lens.min()) + 1
        if self.io.has_logits_to_keep:
            bd.bind_ortvalue_input("logits_to_keep", _scalar(keep))
            last = last - (s - keep)
        bd.bind_output("logits", self.io.device)
        logits = self._run()[0].numpy()
        return logits[np.arange(self.batch), last].astype(np.float32)

    def step(self, tokens: np.ndarray, running: np.ndarray) -> np.ndarray:
        bd, m = self.binding, self.mask
        self.next_ids[:, 0] = tokens
        if self.left:
            self.width += 1
            m.hi[running] = self.width
            self.positions[:, 0] = m.hi - m.lo - 1
            bd.bind_cpu_input("position_ids", self.positions)
        else:
            m.hi[running] += 1
            self.width = int(m.hi.max())
        bd.bind_cpu_input("input_ids", self.next_ids)
        bd.bind_cpu_input("attention_mask", m.view(self.width))
        if self.logits is None:  # bound once: every decode step writes [B, 1, V] into the same buffer
            if self.io.has_logits_to_keep:
                bd.bind_ortvalue_input("logits_to_keep", _scalar(1))
            self.logits = self._logits_buffer()
            bd.bind_ortvalue_output("logits", self.logits[0])
        self._run(outputs=self.left)
        out = self.logits[1] if self.logits[1] is not None else self.logits[0].numpy()
        return out[:, 0].astype(np.float32, copy=False)

    def _logits_buffer(self) -> tuple[ort.OrtValue, np.ndarray | None]:
        """[B, 1, V] once: on CPU backed by a numpy array (read without a copy), on CUDA on the device."""
        shape = (self.batch, 1, self.lm.vocab_size)
        if self.io.device == "cpu":
            host = np.empty(shape, self.io.logits_dtype)
            return ort.OrtValue.ortvalue_from_numpy(host), host
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, self.io.logits_dtype, self.io.device, 0), None

    def _run(self, outputs: bool = True) -> list:
        """Run the bound step; the outputs are fetched only when something reads them (prefill logits, a
        concatenated cache): wrapping them costs more than a tiny model's step."""
        self.cache.bind(self.binding)
        self.lm.session.run_with_iobinding(self.binding)
        if self.io.device != "cpu":
            self.binding.synchronize_outputs()
        if not outputs:
            return []
        values = self.binding.get_outputs()
        self.cache.update(values)
        return values


class OnnxCausalLM:
    """`model.onnx` of an exported directory: `forward` on numpy arrays, `generate` for one prompt, `start` for a
    batch (what `qosora.run.Generator` drives)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool = False):
        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.onnx"
        self.session = load_session(path, threads, spinning, providers or ["CPUExecutionProvider"])
        self.io = GraphIO.of(self.session, path)
        self.vocab_size = int(self.session.get_outputs()[0].shape[-1]) if isinstance(
            self.session.get_outputs()[0].shape[-1], int) else self._vocab_from_config()
        self.context_length = self._context_length()

    # -- batches --------------------------------------------------------------------------------------------------

    def check_prompt(self, n_tokens: int, where: str = "the prompt") -> None:
        if n_tokens == 0:
            raise QosoraError(f"{where} encodes to no tokens: pass a non-empty --prompt")
        if self.context_length is not None and n_tokens >= self.context_length:
            raise QosoraError(f"{where} has {n_tokens} tokens but the model's context is {self.context_length} "
                              "(max_position_embeddings): shorten the prompt")

    def budget(self, n_tokens: int, max_new_tokens: int) -> int:
        """New tokens a prompt may get: the rotary tables of the graph end at the context."""
        return max_new_tokens if self.context_length is None else min(max_new_tokens, self.context_length - n_tokens)

    def start(self, rows: list[list[int]], max_new_tokens: int) -> DecodeBatch:
        """A batch whose cache fits every row's prompt + its budget (at most the context)."""
        for r in rows:
            self.check_prompt(len(r))
        budgets = [self.budget(len(r), max_new_tokens) for r in rows]
        if self.io.contract == "standard":  # every row's cache grows by one per step
            length = max(len(r) for r in rows) + max(budgets)
        else:
            length = max(len(r) + n for r, n in zip(rows, budgets))
        return DecodeBatch(self, rows, length)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: tuple[int, ...] = (),
                 temperature: float = 0.0, seed: int = 0, times: StepTimes | None = None) -> list[int]:
        """Greedy (temperature 0) or sampled continuation of one prompt; returns the new token ids (EOS included).

        Decoding stops at the model's context (config.json's max_position_embeddings). A prompt that already
        fills the context is refused."""
        if not prompt_ids:
            raise QosoraError("the prompt encodes to no tokens: pass a non-empty --prompt")
        n = self.budget(len(prompt_ids), max_new_tokens)
        batch = self.start([list(prompt_ids)], max_new_tokens)
        pick = Sampler(GenerationOptions(temperature=temperature, seed=seed), self.vocab_size, prompt_ids)
        times = times if times is not None else StepTimes()
        t0 = time.perf_counter()
        new = [pick(batch.prefill()[0])]
        times.prefill_s = time.perf_counter() - t0
        running = np.ones(1, bool)
        while len(new) < n and new[-1] not in eos_token_ids:
            t0 = time.perf_counter()
            new.append(pick(batch.step(np.array(new[-1:]), running)[0]))
            times.decode_s.append(time.perf_counter() - t0)
        return new

    # -- numpy access (parity checks, perplexity) -----------------------------------------------------------------

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None = None,
                cache: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """input_ids [B, S], attention_mask [B, P + S] -> (logits [B, S, V], new cache keyed by past_* names).

        Copies through numpy: for checks, not for decoding. position_ids default to left padding's
        cumsum(mask) - 1; graphs without that input (gqa contract) take positions from the mask themselves."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        b, s = input_ids.shape
        if cache is None:
            shape = (b, self.io.num_kv_heads, 0, self.io.head_dim)
            cache = {past: np.zeros(shape, self.io.cache_dtype) for past, _ in self.io.past_names}
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, **cache}
        if self.io.contract == "standard":
            feed["position_ids"] = position_ids if position_ids is not None else \
                (np.cumsum(attention_mask, axis=1) - 1).clip(min=0)[:, -s:]
        if self.io.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(s, np.int64)
        names = ["logits"] + [present for _, present in self.io.past_names]
        outputs = dict(zip(names, self.session.run(names, feed)))
        return outputs["logits"], {past: outputs[present] for past, present in self.io.past_names}

    # -- the directory's side files -------------------------------------------------------------------------------

    def generation_config(self) -> dict:
        path = self.model_dir / "generation_config.json"
        return read_json_object(path, "re-run `qosora export`") if path.is_file() else {}

    def config(self) -> dict:
        path = self.model_dir / "config.json"
        return read_json_object(path, "re-run `qosora export`") if path.is_file() else {}

    def _context_length(self) -> int | None:
        n = self.config().get("max_position_embeddings")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    def _vocab_from_config(self) -> int:
        n = self.config().get("vocab_size")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise QosoraError(f"{self.model_dir}: the logits' vocab axis is dynamic and config.json has no "
                              "vocab_size: re-run `qosora export`")
        return n
