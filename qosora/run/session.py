"""The onnxruntime side of the deploy path: session options, the execution provider, loading `model.onnx`, and what
its inputs say about the graph (`GraphIO`: which cache contract, dtypes, shapes).

Two graph contracts exist, told apart by the inputs (see `GraphIO.contract`):

    standard  input_ids, attention_mask, position_ids, past_key_values.{i}.key/value [B, Hkv, P, D]
              present = Concat(past, new) [B, Hkv, P + S, D]: the graph grows the cache; batches are LEFT padded
    gqa       input_ids, attention_mask, past_key_values.{i}.key/value (no position_ids): onnxruntime-genai's
              contract. GroupQueryAttention reads seqlens_k = sum(attention_mask, 1) - 1 and T = mask width, and
              writes in place when past and present are the same buffer [B, Hkv, L, D]; batches are RIGHT padded

Either may carry an int64 scalar `logits_to_keep` (logits only for the last k positions; 0 = all), often as an
input with an initializer default.
"""

from __future__ import annotations

import json

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from qosora.errors import QosoraError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# What InferenceSession raises for a truncated, corrupt or incomplete model.onnx / model.onnx.data.
_LOAD_ERRORS = (ort_errors.Fail, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.NoSuchFile,
                ort_errors.InvalidArgument, ort_errors.RuntimeException, ort_errors.NotImplemented, OSError)
_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """Thread spinning is off unless asked for: with spinning on, onnxruntime's idle threads burn the cores that a
    tokenizer, PyTorch or a second session in the same process need (several-fold slowdowns measured on 2 cores
    when PyTorch and onnxruntime shared them in the parity check). A process that only decodes wants it on: +14 %
    int4 decode at 2 threads here, because the workers no longer sleep and wake between the few hundred small ops
    of a decode step (BENCHMARKS.md)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Errors only: onnxruntime warns at every load that `logits_to_keep` (an input with a default, on purpose) is
    # not folded as a constant; load and run errors still surface as exceptions.
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def resolve_providers(provider: str) -> list[str]:
    """auto -> CUDA when this onnxruntime build has it, else CPU; cpu / cuda must be available."""
    available = ort.get_available_providers()
    if provider == "auto":
        return [_PROVIDER_NAMES["cuda"], _PROVIDER_NAMES["cpu"]] if _PROVIDER_NAMES["cuda"] in available \
            else [_PROVIDER_NAMES["cpu"]]
    if provider not in _PROVIDER_NAMES:
        raise QosoraError(f"unknown --provider {provider!r}: choose one of auto, {', '.join(_PROVIDER_NAMES)}")
    name = _PROVIDER_NAMES[provider]
    if name not in available:
        raise QosoraError(f"--provider {provider}: {name} is not in this onnxruntime build (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu or pass --provider cpu")
    return [name] if provider == "cpu" else [name, _PROVIDER_NAMES["cpu"]]


def check_threads(threads) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise QosoraError(f"--threads must be a positive integer, got {threads!r}")


def load_session(path: Path, threads: int | None, spinning: bool, providers: list[str]) -> ort.InferenceSession:
    if not path.is_file():
        raise QosoraError(f"{path} not found: pass a directory written by `qosora export --onnx`")
    check_threads(threads)
    try:
        return ort.InferenceSession(str(path), session_options(threads, spinning), providers=providers)
    except _LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QosoraError(f"{path} (or its model.onnx.data) cannot be loaded by onnxruntime {ort.__version__} "
                          f"({first}): the export is truncated or incomplete (re-run `qosora export`), or needs a "
                          "newer onnxruntime (qosora needs >= 1.27)") from None


def _head_dim_from_configs(directory: Path) -> int | None:
    """The head size a graph leaves symbolic, from genai_config.json (head_size) or config.json."""
    for name, read in (("genai_config.json", lambda c: c["model"]["decoder"]["head_size"]),
                       ("config.json", lambda c: c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])):
        try:
            value = read(json.loads((directory / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class GraphIO:
    """What the session's inputs and outputs say: the cache names (matched by name, never by output position: genai
    and optimum order outputs differently), shapes and dtypes, and the contract."""

    contract: str  # "standard" | "gqa"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    cache_dtype: type  # np.float32 / np.float16
    logits_dtype: type
    has_logits_to_keep: bool
    device: str  # where the cache lives: "cuda" or "cpu"

    @property
    def past_names(self) -> list[tuple[str, str]]:
        """(past_key_values.{i}.{kind}, present.{i}.{kind}) pairs, layer by layer."""
        return [(f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in range(self.num_layers)
                for k in ("key", "value")]

    @classmethod
    def of(cls, session: ort.InferenceSession, path: Path) -> "GraphIO":
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        pasts = {n: _PAST.match(n) for n in inputs if _PAST.match(n)}
        layers = sorted({int(m.group(1)) for m in pasts.values()})
        expected = ("input_ids, attention_mask, [position_ids,] past_key_values.{i}.key/value -> logits, "
                    "present.{i}.key/value")
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs] + \
                  [n for n in ("logits",) if n not in outputs]
        missing += [f"{p}.{i}.{k}" for i in layers for k in ("key", "value")
                    for p, names in (("past_key_values", inputs), ("present", outputs)) if f"{p}.{i}.{k}" not in names]
        if missing or not layers or layers != list(range(len(layers))):
            got = ", ".join(sorted(inputs)[:5]) + (", ..." if len(inputs) > 5 else "")
            raise QosoraError(f"{path} is not a decoder with a KV cache qosora can drive (inputs {got}; missing "
                              f"{', '.join(missing[:3]) or 'past_key_values.0.key'}); expected {expected}: pass a "
                              "directory written by `qosora export --onnx`")
        first = inputs["past_key_values.0.key"]
        shape = list(first.shape)
        if len(shape) == 4 and not isinstance(shape[3], int):  # onnxruntime-genai's builder names it kv_cache_dim
            shape[3] = _head_dim_from_configs(path.parent)
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int) \
                or first.type not in _DTYPES or outputs["logits"].type not in _DTYPES:
            raise QosoraError(f"{path}: past_key_values.0.key is {first.type} {shape}; expected float/float16 "
                              "[batch, kv_heads, past, head_dim]: pass a directory written by `qosora export --onnx`")
        # logits_to_keep may be an input with an initializer default (0 = every position): not in get_inputs().
        overridable = set(inputs) | {i.name for i in session.get_overridable_initializers()}
        device = "cuda" if session.get_providers()[0] == _PROVIDER_NAMES["cuda"] else "cpu"
        return cls(contract="standard" if "position_ids" in inputs else "gqa", num_layers=len(layers),
                   num_kv_heads=int(shape[1]), head_dim=int(shape[3]), cache_dtype=_DTYPES[first.type],
                   logits_dtype=_DTYPES[outputs["logits"].type], has_logits_to_keep="logits_to_keep" in overridable,
                   device=device)
