"""Training data: JSONL records -> token ids with a loss mask -> fixed-order batches.

One record a line, in one of four formats (detected per line from its keys):

    {"text": "..."}                                      loss on every token
    {"prompt": "...", "completion": "..."}               loss on the completion (+ EOS) only
    {"messages": [{"role": "user", "content": "..."}, ...]}   chat template; loss on assistant turns only
    {"question": "...", "answer": "..."}                 GSM8K; rendered as a prompt/completion pair

`labels` hold the token id where the loss counts and -100 where it does not (the Hugging Face convention); the
shift by one happens in the loss. A line that is not JSON, or has none of these shapes, is reported as
`FILE:LINE: ...` so the user can fix it.

Order is a pure function of (seed, epoch, position): a resumed run or another rank can re-derive the exact batch
of any step without saved iterator state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from qosora.errors import QosoraError

IGNORE = -100
FORMATS = ("text", "prompt_completion", "messages", "question_answer")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)  # position 0 is never predicted


def gsm8k_prompt(question: str) -> str:
    """The prompt a {"question", "answer"} record trains on; `qosora eval --metric exact-match` generates after it."""
    return f"Question: {question.strip()}\nAnswer: "


def detect_format(record: object) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise ValueError('"messages" must be a non-empty list of {"role": str, "content": str}')
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError('"messages" has no assistant turn: nothing to train on')
        return "messages"
    for fmt, keys in (("prompt_completion", ("prompt", "completion")), ("question_answer", ("question", "answer")),
                      ("text", ("text",))):
        if all(k in record for k in keys):
            bad = [k for k in keys if not isinstance(record[k], str)]
            if bad:
                raise ValueError(f'"{bad[0]}" must be a string')
            return fmt
    raise ValueError(
        f"unknown record shape (keys {sorted(record)}): use {{\"text\"}}, {{\"prompt\", \"completion\"}}, "
        "{\"messages\"} or {\"question\", \"answer\"}"
    )


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; the first bad line raises `FILE:LINE: why`."""
    path = Path(path)
    if not path.is_file():
        raise QosoraError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                detect_format(record)
            except (json.JSONDecodeError, ValueError) as e:
                raise QosoraError(f"{path}:{lineno}: {e}") from None
            records.append((lineno, record))
    if not records:
        raise QosoraError(f"{path} has no records: expected one JSON object a line")
    return records


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _segments_to_example(tokenizer, segments: list[tuple[str, bool]], add_eos: bool) -> Example:
    """Tokenize (text, trained?) segments one by one so the mask boundary is exact; the first gets BOS if the
    tokenizer adds one."""
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(segments):
        seg = _ids(tokenizer, text, special=(i == 0))
        if i == 0 and tokenizer.eos_token_id is not None and seg[-1:] == [tokenizer.eos_token_id] and text:
            seg = seg[:-1]  # some tokenizers append EOS with special tokens: keep it for the end only
        ids += seg
        labels += seg if trained else [IGNORE] * len(seg)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels)


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the chat-template rendering into (text, is_assistant_content) spans by rendering prefixes."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError('the tokenizer has no chat template: use {"prompt", "completion"} records instead')
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    segments: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already assigned
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render(messages[:i], True) if i else ""
        end = render(messages[: i + 1], False)
        if not (full.startswith(start) and full.startswith(end) and len(start) >= done):
            raise ValueError("the chat template does not render conversations prefix by prefix: cannot mask turns")
        segments += [(full[done:len(start)], False), (full[len(start):len(end)], True)]
        done = len(end)
    segments.append((full[done:], False))
    return [(t, trained) for t, trained in segments if t]


def encode(record: dict, tokenizer) -> Example:
    fmt = detect_format(record)
    if fmt == "text":
        return _segments_to_example(tokenizer, [(record["text"], True)], add_eos=True)
    if fmt == "prompt_completion":
        return _segments_to_example(tokenizer, [(record["prompt"], False), (record["completion"], True)], add_eos=True)
    if fmt == "question_answer":
        segments = [(gsm8k_prompt(record["question"]), False), (record["answer"].strip(), True)]
        return _segments_to_example(tokenizer, segments, add_eos=True)
    # The template already closes each turn (e.g. <|im_end|>), and that closing token is part of the assistant span.
    return _segments_to_example(tokenizer, _chat_segments(tokenizer, record["messages"]), add_eos=False)


def load_examples(path: str | Path, tokenizer, seq_len: int) -> list[Example]:
    """Read, encode and truncate every record of a JSONL file (errors name FILE:LINE)."""
    out = []
    for lineno, record in read_jsonl(path):
        try:
            ex = encode(record, tokenizer)
        except ValueError as e:
            raise QosoraError(f"{path}:{lineno}: {e}") from None
        out.append(Example(ex.input_ids[:seq_len], ex.labels[:seq_len]))
    return out


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples (in order) into rows of exactly `seq_len` tokens; the tail row may be shorter.

    This is constant-length packing (as in TRL): attention crosses example boundaries, which costs a little
    quality and saves all padding. Each example keeps its own loss mask.
    """
    rows, ids, labels = [], [], []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
        while len(ids) >= seq_len:
            rows.append(Example(ids[:seq_len], labels[:seq_len]))
            ids, labels = ids[seq_len:], labels[seq_len:]
    if ids:
        rows.append(Example(ids, labels))
    return rows


def split_holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random `fraction` of the examples held out for evaluation (at least one when fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise QosoraError(f"--eval-fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return examples, []
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise QosoraError(f"--eval-fraction {fraction} leaves no training examples out of {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    labels: torch.Tensor          # (B, T) int64, IGNORE on masked and padded positions

    @property
    def n_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad to the longest example of the batch."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return Batch(ids, mask, labels)


class BatchOrder:
    """Which examples form micro-batch `k` of optimizer step `step`, as a pure function of the seed.

    The examples are shuffled once per epoch (torch.randperm seeded with seed + epoch) and consumed as one stream.
    Optimizer step `s` takes the `per_step = batch_size * grad_accum * world_size` next examples; its micro-batch
    `j` (0 <= j < grad_accum * world_size) runs on rank `j % world_size`. With 2 ranks and grad_accum 1 the
    global batch is therefore exactly the one of 1 rank and grad_accum 2.
    """

    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, world_size: int, seed: int):
        if n_examples < 1:
            raise QosoraError("no training examples")
        self.n, self.bs, self.ga, self.ws, self.seed = n_examples, batch_size, grad_accum, world_size, seed
        self._perm_epoch, self._perm = -1, None

    @property
    def per_step(self) -> int:
        return self.bs * self.ga * self.ws

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n / self.per_step))

    def epoch_of(self, step: int) -> float:
        return step * self.per_step / self.n

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[i]

    def micro_batches(self, step: int) -> list[list[int]]:
        """All grad_accum * world_size micro-batches of `step` (every rank can see every batch)."""
        start = step * self.per_step
        idx = [self._index(start + i) for i in range(self.per_step)]
        return [idx[j * self.bs:(j + 1) * self.bs] for j in range(self.ga * self.ws)]

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        return [mb for j, mb in enumerate(self.micro_batches(step)) if j % self.ws == rank]
