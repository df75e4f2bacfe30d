"""An exported decoder in onnxruntime: one forward step with a KV cache, and greedy / sampled decoding.

The cache is matched by name (`present.{i}.key` -> `past_key_values.{i}.key`), never by output position:
onnxruntime-genai and optimum order their outputs differently.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from qosora.architectures import read_json_object
from qosora.errors import QosoraError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# What InferenceSession raises for a truncated, corrupt or incomplete model.onnx / model.onnx.data.
_LOAD_ERRORS = (ort_errors.Fail, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile,
                ort_errors.InvalidArgument, ort_errors.RuntimeException, ort_errors.NotImplemented, OSError)


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Thread spinning is off unless asked for: with spinning on, onnxruntime's idle threads burn the cores that a
    tokenizer, PyTorch or a second session in the same process need (several-fold slowdowns measured on 2 cores
    when PyTorch and onnxruntime shared them in the parity check). A process that only decodes wants it on: +14 % int4 decode at 2 threads here, because
    the workers no longer sleep and wake between the few hundred small ops of a decode step (BENCHMARKS.md)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return so


@dataclass
class StepTimes:
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.decode_s) / sum(self.decode_s) if self.decode_s else 0.0


class OnnxCausalLM:
    """`model.onnx` of an exported directory. `forward` takes numpy arrays; `generate` runs a decode loop."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, providers: list[str] | None = None,
                 spinning: bool = False):
        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.onnx"
        if not path.is_file():
            raise QosoraError(f"{path} not found: pass a directory written by `qosora export --onnx`")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise QosoraError(f"--threads must be a positive integer, got {threads!r}")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads, spinning),
                                                providers=providers or ["CPUExecutionProvider"])
        except _LOAD_ERRORS as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QosoraError(f"{path} (or its model.onnx.data) cannot be loaded by onnxruntime {ort.__version__} "
                              f"({first}): the export is truncated or incomplete (re-run `qosora export`), or needs a "
                              "newer onnxruntime (qosora needs >= 1.27)") from None
        self.past_names: dict[str, tuple[int, str]] = {}
        for i in self.session.get_inputs():
            m = _PAST.match(i.name)
            if m:
                self.past_names[i.name] = (int(m.group(1)), m.group(2))
                shape = i.shape
                self.num_kv_heads, self.head_dim = int(shape[1]), int(shape[3])
                self.dtype = np.float16 if "float16" in i.type else np.float32
        self.num_layers = len(self.past_names) // 2
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = {"input_ids", "attention_mask", "position_ids"} - self.input_names
        if missing or "logits" not in self.output_names or not self.past_names:
            raise QosoraError(f"{path} is not a qosora decoder export (inputs {sorted(self.input_names)[:4]}...): "
                              "pass a directory written by `qosora export --onnx`")
        self.context_length = self._context_length()

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return {name: np.zeros(shape, self.dtype) for name in self.past_names}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None = None,
                cache: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """input_ids [B, S], attention_mask [B, P + S] -> (logits [B, S, V], new cache keyed by past_* names)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        b, s = input_ids.shape
        if cache is None:
            cache = self.empty_cache(b)
        if position_ids is None:
            # Left padding: position = number of real tokens before this one.
            position_ids = (np.cumsum(attention_mask, axis=1) - 1).clip(min=0)[:, -s:]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, **cache}
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        new_cache = {name: outputs[f"present.{i}.{kind}"] for name, (i, kind) in self.past_names.items()}
        return outputs["logits"], new_cache

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: tuple[int, ...] = (),
                 temperature: float = 0.0, seed: int = 0, times: StepTimes | None = None) -> list[int]:
        """Greedy (temperature 0) or sampled continuation of one prompt; returns the new token ids.

        Decoding stops at the model's context (config.json's max_position_embeddings): the rotary tables of the
        graph end there. A prompt that already fills the context is refused.
        """
        if not prompt_ids:
            raise QosoraError("the prompt encodes to no tokens: pass a non-empty --prompt")
        if self.context_length is not None:
            if len(prompt_ids) >= self.context_length:
                raise QosoraError(f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                                  f"{self.context_length} (max_position_embeddings): shorten the prompt")
            max_new_tokens = min(max_new_tokens, self.context_length - len(prompt_ids))
        rng = np.random.default_rng(seed)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        cache, new = None, []
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            logits, cache = self.forward(ids, mask, cache=cache)
            nxt = _pick(logits[0, -1].astype(np.float32), temperature, rng)
            if times is not None:
                if step == 0:
                    times.prefill_s = time.perf_counter() - t0
                else:
                    times.decode_s.append(time.perf_counter() - t0)
            new.append(nxt)
            if nxt in eos_token_ids:
                break
            ids = np.asarray([[nxt]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        return new

    def generation_config(self) -> dict:
        path = self.model_dir / "generation_config.json"
        return read_json_object(path, "re-run `qosora export`") if path.is_file() else {}

    def _context_length(self) -> int | None:
        path = self.model_dir / "config.json"
        if not path.is_file():
            return None
        n = read_json_object(path, "re-run `qosora export`").get("max_position_embeddings")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))
