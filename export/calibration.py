"""Calibration for `gptq`: the input Hessian H = sum over tokens of x x^T [K, K] (float64) of every linear of a
transformers decoder (Llama, Mistral, Qwen2), collected one decoder layer at a time.

    tokens [S, T] ─> embedding ─> h_0 ─> layer 0 (hooks: H of its linears' inputs) ─> h_1 ─> ... ─> h_L
                                                                             h_L ─> norm ─> H of lm_head's input

Why layer by layer, not one hooked full-model forward per batch: only one decoder layer runs at a time (so a 7B
model's layers could be moved to the accelerator one by one; not done yet), and layer i+1's inputs are layer i's
outputs held here, which is where GPTQ's sequential mode (layer i+1 calibrated on the quantized layer i) plugs in.
The price is one layer's activations for all samples [S, T, E], stored once: each layer's outputs replace its
inputs batch by batch (a 7B model with 128 x 2048 tokens: 4 GiB in float32, not 32 layers of it). The layer's
other arguments (rotary cos/sin, the causal mask or None under sdpa, the sliding-window masks of Mistral/Qwen2,
position ids) are whatever the model itself passes: one forward of the decoder with every layer replaced by an
identity that records its arguments, which also yields the embeddings. Linears that read the same tensor (q/k/v,
gate/up) share one H, found by identity of their input.

`load_calibration_tokens` samples fixed-length windows of token ids from a JSONL file (seeded).
"""

from __future__ import annotations

import json
import random
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from qosora.errors import QosoraError

ROW_FIELDS = '"text", "prompt" + "completion", "question" + "answer" or "messages"'
TRAINING_DATA = "train"  # `--calibrate train`: the data the directory's training run recorded


# -- calibration tokens -----------------------------------------------------------------------------------------

def calibration_file(calibrate: str | Path, src_dir: Path) -> Path:
    """The JSONL `--calibrate` names: a path, or `train` for the training data recorded in the `qosora train` run
    directory's train_config.json (the text the adapter was fitted on, at hand right after training)."""
    if str(calibrate) != TRAINING_DATA or Path(calibrate).exists():
        return Path(calibrate)
    record = src_dir / "train_config.json"
    if not record.is_file():
        raise QosoraError(f"--calibrate train: {src_dir} records no training data (no train_config.json: not a "
                          "`qosora train` run directory): pass --calibrate DATA.jsonl")
    try:
        data = Path(json.loads(record.read_text())["data"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QosoraError(f"--calibrate train: {record} is unreadable ({e}): pass --calibrate DATA.jsonl") from None
    if not data.is_file():
        raise QosoraError(f"--calibrate train: the training data {data} recorded in {record} is not there (moved, or "
                          "a relative path from another working directory): pass --calibrate DATA.jsonl")
    return data


def load_calibration_tokens(path: str | Path, tokenizer, samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`samples` windows of `seq_len` token ids [samples, seq_len] (int64) from a JSONL file.

    Every row is rendered to text ({"text"}; {"prompt", "completion"} and {"question", "answer"} concatenated;
    {"messages"} through the tokenizer's chat template, or the contents joined by newlines without one),
    tokenized with the tokenizer's special tokens (+ EOS where the text does not end with it), and the rows
    concatenated in file order; the stream is cut into disjoint windows and `samples` of them are drawn with
    `seed`, so no token is counted twice.
    """
    path = Path(path)
    if samples < 1 or seq_len < 1:
        raise QosoraError(f"calibration needs samples >= 1 and seq_len >= 1, got {samples} and {seq_len}")
    stream: list[int] = []
    for text in _row_texts(path, tokenizer):
        stream += list(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None and stream[-1:] != [tokenizer.eos_token_id]:
            stream.append(tokenizer.eos_token_id)
    windows = len(stream) // seq_len
    if windows < samples:
        raise QosoraError(f"{path}: {len(stream)} tokens make {windows} disjoint windows of {seq_len}, {samples} "
                          "requested: add calibration text or lower --calibration-samples / --calibration-seq-len")
    picked = random.Random(seed).sample(range(windows), samples)
    ids = torch.tensor(stream[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return ids[picked]


def _row_texts(path: Path, tokenizer) -> Iterator[str]:
    """The text of every non-blank row; the first bad row raises `FILE:LINE: why`."""
    if not path.is_file():
        raise QosoraError(f"calibration file {path} does not exist")
    rows = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = _row_text(json.loads(line), tokenizer)
            except (json.JSONDecodeError, ValueError) as e:
                raise QosoraError(f"{path}:{lineno}: {e}") from None
            rows += 1
            yield text
    if not rows:
        raise QosoraError(f"{path} has no rows: expected one JSON object a line with {ROW_FIELDS}")


def _row_text(row: object, tokenizer) -> str:
    from qosora.train.data import gsm8k_prompt

    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with {ROW_FIELDS}, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
            raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(msgs, tokenize=False)
        return "\n".join(m["content"] for m in msgs)
    for keys, render in ((("text",), lambda r: r["text"]),
                         (("prompt", "completion"), lambda r: r["prompt"] + r["completion"]),
                         (("question", "answer"), lambda r: gsm8k_prompt(r["question"]) + r["answer"].strip())):
        if all(k in row for k in keys):
            bad = [k for k in keys if not isinstance(row[k], str)]
            if bad:
                raise ValueError(f'"{bad[0]}" must be a string')
            return render(row)
    raise ValueError(f"unknown row shape (keys {sorted(row)}): calibration rows need {ROW_FIELDS}")


# -- Hessians ---------------------------------------------------------------------------------------------------

@dataclass
class StreamStats:
    """What a `stream_hessians` run measured.

    tokens            calibration tokens seen by every linear (samples x seq_len)
    layers            decoder layers done
    peak_held_layers  peak bytes of stored activations / one layer's activations, measured after every batch of
                      every layer: 1.0 when each layer's outputs replace its inputs (streamed)
    file              the calibration JSONL (set by the caller, for the report)
    """

    file: str = ""
    tokens: int = 0
    peak_held_layers: float = 0.0
    layers: int = 0


@dataclass
class Calibration:
    """hessians: linear name -> H float64 [K, K] (names reading the same input share one tensor); tokens: the
    calibration tokens summed into each H; peak_held_layers: as in `StreamStats`."""

    hessians: dict[str, torch.Tensor]
    tokens: int
    peak_held_layers: float


def collect_hessians(model, tokens: torch.Tensor, *, batch_size: int = 4, hessian_device="cpu",
                     progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Every linear's input Hessian of `model` on `tokens` [S, T] (see `stream_hessians`), as one dict. For large
    models prefer `stream_hessians`: a 7B model's Hessians are ~1.4 GB a layer in float64."""
    stats = StreamStats()
    hessians: dict[str, torch.Tensor] = {}
    for layer in stream_hessians(model, tokens, batch_size=batch_size, hessian_device=hessian_device, stats=stats,
                                 progress=progress):
        hessians.update(layer)
    return Calibration(hessians, stats.tokens, stats.peak_held_layers)


@torch.no_grad()
def stream_hessians(model, tokens: torch.Tensor, *, batch_size: int = 4, hessian_device="cpu",
                    stats: StreamStats | None = None, progress: Callable[[int, int], None] | None = None
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {linear name: H} for decoder layer 0, 1, ..., then {"lm_head": H} of the final norm's output.

    `model` is a transformers *ForCausalLM (its decoder `model.get_decoder()` with `.layers` and `.norm`); names
    are the model's module names (model.layers.0.self_attn.q_proj, lm_head). tokens [S, T] int64, run in batches of
    `batch_size` on the model's device; each H is accumulated there in float64 and handed over on
    `hessian_device`. `stats` (optional) is filled as the stream runs; `progress(done, total)` after each layer.
    """
    stats = stats if stats is not None else StreamStats()
    decoder = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    device = decoder.embed_tokens.weight.device
    batches = [tokens[i:i + batch_size].to(device) for i in range(0, tokens.shape[0], batch_size)]
    was_training = model.training
    model.eval()
    try:
        hidden, layer_args = _layer_inputs(decoder, batches)  # hidden: the embeddings, one tensor per batch
        held = _HeldActivations(hidden)
        stats.tokens = int(tokens.numel())
        for i, layer in enumerate(decoder.layers):
            hooks = _InputHessians({names[id(m)]: m for m in _linears(layer)})
            with hooks.attached():
                for b in range(len(hidden)):
                    args, kwargs = layer_args[tuple(hidden[b].shape)][i]
                    out = layer(hidden[b], *args, **kwargs)
                    hidden[b] = held.track(out[0] if isinstance(out, tuple) else out)  # the inputs are freed here
                    hooks.end_of_forward()
                    stats.peak_held_layers = max(stats.peak_held_layers, held.sets())
            stats.layers = i + 1
            if progress:
                progress(i + 1, len(decoder.layers))
            yield hooks.hessians(hessian_device)
        head = model.get_output_embeddings()
        h_head = None
        for b in range(len(hidden)):
            x = decoder.norm(hidden[b])
            hidden[b] = None
            h_head = _accumulate(h_head, x)
        yield {names[id(head)]: h_head.to(hessian_device)}
    finally:
        model.train(was_training)


class LayerHessians:
    """`stream_hessians` as the exporter asks for it, in layer order: `hessians(module)` is the module's H, or None
    for a module that has none (the embedding). Asking for a later layer advances the stream and drops every earlier
    layer's Hessians, so one layer's are held at a time; asking for a dropped layer is an error."""

    def __init__(self, stream: Iterator[dict[str, torch.Tensor]]):
        self._stream = stream
        self._current: dict[str, torch.Tensor] = {}
        self._index = -1  # `architectures.layer_index` of the current layer (1 << 30: lm_head)
        self._exhausted = False

    def __call__(self, module: str) -> torch.Tensor | None:
        from qosora.architectures import layer_index

        want = layer_index(module)
        if want < 0:
            return None
        while self._index < want and not self._exhausted:
            self._current = {}  # drop the finished layer before the next one is computed
            nxt = next(self._stream, None)
            if nxt is None:
                self._exhausted = True
            else:
                self._current, self._index = nxt, layer_index(next(iter(nxt)))
        if want < self._index:
            raise RuntimeError(f"{module}: the Hessians of its layer were dropped; ask for modules in layer order")
        return self._current.get(module) if want == self._index else None


def _linears(layer: torch.nn.Module) -> list[torch.nn.Module]:
    """The layer's outermost linear-like modules: nn.Linear, or anything with in_features / out_features (qosora's
    SVDAdapterLinear, a bitsandbytes or PEFT linear), not the modules inside one of them."""
    found: list[str] = []
    out = []
    for name, m in layer.named_modules():
        inside = any(name.startswith(f + ".") for f in found)
        linear_like = isinstance(m, torch.nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features"))
        if linear_like and not inside:
            found.append(name)
            out.append(m)
    return out


def _accumulate(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """h += x^T x over all tokens of x [..., K], in float64."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if h is None:
        h = torch.zeros(x2.shape[1], x2.shape[1], dtype=torch.float64, device=x2.device)
    return h.addmm_(x2.T, x2)


class _InputHessians:
    """Forward pre-hooks on a layer's linears; consecutive linears called on the same tensor object (q/k/v,
    gate/up) share the H of the first. The grouping is read on the first forward and checked on the others."""

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.linears = linears
        self.leader: dict[str, str] = {}  # linear name -> name of the linear whose H it shares
        self.h: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, str] | None = None  # the latest input and its leader, this forward only

    def _hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            lead = self._last[1] if self._last is not None and self._last[0] is x else name
            if self.leader.setdefault(name, lead) != lead:
                raise RuntimeError(f"{name} read a different input than on the first calibration batch")
            self._last = (x, lead)
            if lead == name:
                self.h[name] = _accumulate(self.h.get(name), x)
        return pre_hook

    @contextmanager
    def attached(self):
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._last = None

    def end_of_forward(self) -> None:
        self._last = None  # keep no activation past its layer's forward

    def hessians(self, device) -> dict[str, torch.Tensor]:
        moved = {lead: h.to(device) for lead, h in self.h.items()}
        return {name: moved[lead] for name, lead in self.leader.items()}


@contextmanager
def _recording_layers(layers):
    """Replace every layer's forward by an identity that records (hidden_states, other args, kwargs)."""
    records: list[list[tuple]] = [[] for _ in layers]

    def recorder(i: int):
        def forward(hidden_states, *args, **kwargs):
            records[i].append((hidden_states, args, kwargs))
            return hidden_states
        return forward

    saved = [layer.__dict__.get("forward") for layer in layers]  # accelerate may have set an instance forward
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield records
    finally:
        for layer, original in zip(layers, saved):
            if original is None:
                del layer.forward
            else:
                layer.forward = original


def _layer_inputs(decoder, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[tuple, list[tuple]]]:
    """The embeddings of each batch, and per hidden-state shape each layer's other arguments as the decoder passes
    them (they depend on the shape only: no padding, positions 0 .. T-1)."""
    hidden: list[torch.Tensor] = []
    layer_args: dict[tuple, list[tuple]] = {}
    for batch in batches:
        with _recording_layers(decoder.layers) as records:
            decoder(input_ids=batch, use_cache=False)
        hidden.append(records[0][0][0])
        shape = tuple(hidden[-1].shape)
        if shape not in layer_args:
            layer_args[shape] = [(args, kwargs) for _, args, kwargs in (r[0] for r in records)]
    return hidden, layer_args


class _HeldActivations:
    """Weak references to the stored activations: how many layers' worth of them are still alive, one layer's
    worth being the embeddings of all batches."""

    def __init__(self, first: list[torch.Tensor]):
        self._refs = [weakref.ref(t) for t in first]
        self._set_numel = sum(t.numel() for t in first)

    def track(self, t: torch.Tensor) -> torch.Tensor:
        self._refs.append(weakref.ref(t))
        return t

    def sets(self) -> float:
        alive = [r() for r in self._refs]
        self._refs = [r for r, t in zip(self._refs, alive) if t is not None]
        return sum(t.numel() for t in alive if t is not None) / self._set_numel
