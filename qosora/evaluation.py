"""Held-out evaluation: token-weighted loss, perplexity, and GSM8K-style exact match.

    loss = sum of next-token cross-entropy over labelled tokens / number of labelled tokens
    ppl  = exp(loss)
    exact-match: greedy-generate after the prompt, compare the number after `#### ` (or, failing that, the last
                 number in the output) with the reference answer's `#### n`.

Works on a prepared/trained directory (`qosora.load`) or a plain Hugging Face directory (a merged model, read by
`qosora.loading.load_hf`: safetensors only, every tensor present). Options are `EvalOptions`, validated once;
the CLI derives its flags from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from qosora.errors import QosoraError
from qosora.options import check, option, same_option
from qosora.train.config import TrainConfig

if TYPE_CHECKING:
    from qosora.train.data import Example

# torch, transformers and the training data code load inside the functions: `qosora eval --help` (which reads
# EvalOptions) stays as light as the other verbs' help.

Metric = Literal["loss", "ppl", "exact-match"]
METRICS: tuple[str, ...] = get_args(Metric)


@dataclass(frozen=True)
class EvalOptions:
    """What `qosora eval` measures, on which data, in which batches."""

    data: str = option(help="JSONL in any `qosora train` format")
    metric: Metric = option("loss", "loss, ppl, or exact-match (GSM8K-style)")
    seq_len: int = same_option(TrainConfig, "seq_len", default=1024)
    batch_size: int = same_option(TrainConfig, "batch_size")
    limit: int | None = option(None, "evaluate only the first N records", min=1)
    max_new_tokens: int = option(256, "exact-match generation length", min=1)
    device: str | None = option(None, "default: cuda if present, else cpu")

    def validate(self) -> "EvalOptions":
        check(self)
        return self


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 4, autocast: bool = False,
              progress: bool = False) -> tuple[float, int]:
    """(mean loss per labelled token, labelled tokens) over `examples`."""
    import torch
    from tqdm.auto import tqdm

    from qosora.precision import autocast_context
    from qosora.train.data import collate
    from qosora.train.loss import causal_lm_loss

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = collate([examples[i] for i in idx], pad_id).to(device)
        with torch.no_grad(), autocast_context(device, autocast):
            loss, n = causal_lm_loss(model, batch)
        total += float(loss)
        tokens += n
    model.train(was_training)
    if tokens == 0:
        raise QosoraError("the evaluation data has no labelled tokens (every completion was truncated away?)")
    return total / tokens, tokens


def check_token_ids(model, max_id: int) -> None:
    """A tokenizer that does not belong to the model would index past its embedding (an IndexError mid-run)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if max_id >= rows:
        raise QosoraError(f"the tokenizer produced token id {max_id}, but the model's embedding has {rows} rows: "
                          "the tokenizer files do not belong to this model; copy the source model's tokenizer")


def extract_answer(text: str) -> str | None:
    """The number after `#### `, else the last number in `text`; commas removed, `7.0` -> `7`."""
    m = re.search(r"####\s*(" + _NUMBER.pattern + ")", text)
    found = m.group(1) if m else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    found = found.replace(",", "").rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", found):
        found = found.split(".")[0]
    return found


def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 256, batch_size: int = 8,
                autocast: bool = False, progress: bool = False) -> tuple[float, list[dict]]:
    """Greedy generation after each {"question"} (or {"prompt"}) and comparison of the extracted answer."""
    import torch
    from tqdm.auto import tqdm

    from qosora.precision import autocast_context
    from qosora.train.data import gsm8k_prompt

    device = next(model.parameters()).device
    model.eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for start in tqdm(range(0, len(records), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = records[start:start + batch_size]
        prompts = [gsm8k_prompt(r["question"]) if "question" in r else r["prompt"] for r in chunk]
        refs = [r.get("answer", r.get("completion", "")) for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        check_token_ids(model, int(enc["input_ids"].max()) if enc["input_ids"].numel() else 0)
        with torch.no_grad(), autocast_context(device, autocast):
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        for prompt, ref, seq in zip(prompts, refs, out[:, enc["input_ids"].shape[1]:]):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            pred, gold = extract_answer(text), extract_answer(ref)
            rows.append({"prompt": prompt, "output": text, "prediction": pred, "reference": gold,
                         "correct": pred is not None and pred == gold})
    return sum(r["correct"] for r in rows) / max(1, len(rows)), rows


@dataclass
class EvalReport:
    metric: str
    value: float
    loss: float | None
    ppl: float | None
    exact_match: float | None
    examples: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_model_and_tokenizer(directory: str | Path, device, dtype):
    from qosora.loading import load, load_hf, load_tokenizer

    directory = Path(directory)
    if (directory / "qosora_config.json").is_file():
        model = load(directory, dtype=dtype, device=device)
    elif (directory / "config.json").is_file():
        model = load_hf(directory, dtype=dtype, device=device)
    else:
        raise QosoraError(f"{directory} is neither a qosora directory nor a Hugging Face model directory "
                          "(no qosora_config.json or config.json): pass a trained, prepared or merged directory")
    return model.eval(), load_tokenizer(directory)


def evaluate(directory: str | Path, data: str | Path, metric: str = EvalOptions.metric, *,
             seq_len: int = EvalOptions.seq_len, batch_size: int = EvalOptions.batch_size,
             limit: int | None = EvalOptions.limit, max_new_tokens: int = EvalOptions.max_new_tokens,
             device: str | None = EvalOptions.device, progress: bool = True) -> EvalReport:
    """Evaluate a trained (or prepared, or merged) model on a JSONL file (keyword form of `run_eval`)."""
    options = EvalOptions(data=str(data), metric=metric, seq_len=seq_len, batch_size=batch_size, limit=limit,
                          max_new_tokens=max_new_tokens, device=device)
    return run_eval(directory, options, progress=progress)


def run_eval(directory: str | Path, options: EvalOptions, progress: bool = True) -> EvalReport:
    """Evaluate `directory` as `options` say; every option is checked before the model is loaded."""
    import torch

    from qosora.precision import resolve_device
    from qosora.precision import bf16_supported
    from qosora.train.data import load_examples, read_jsonl

    o = options.validate()
    dev = resolve_device(o.device)
    bf16 = bf16_supported(dev)
    model, tokenizer = load_model_and_tokenizer(directory, dev, torch.bfloat16 if bf16 else torch.float32)
    if o.metric == "exact-match":
        records = [r for _, r in read_jsonl(o.data)][:o.limit]
        if not records:
            raise QosoraError(f"{o.data} has no records: pass a non-empty JSONL file")
        if not all(isinstance(r, dict) and ("question" in r or "prompt" in r) for r in records):
            raise QosoraError(f"{o.data}: exact-match needs {{\"question\", \"answer\"}} or {{\"prompt\", \"completion\"}} records")
        acc, _ = exact_match(model, tokenizer, records, o.max_new_tokens, o.batch_size, bf16, progress)
        return EvalReport(o.metric, acc, None, None, acc, len(records), 0)
    examples = load_examples(o.data, tokenizer, o.seq_len)[:o.limit]
    check_token_ids(model, max((max(e.input_ids, default=0) for e in examples), default=0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loss, tokens = eval_loss(model, examples, pad, o.batch_size, bf16, progress)
    ppl = math.exp(min(loss, 700.0))
    return EvalReport(o.metric, loss if o.metric == "loss" else ppl, loss, ppl, None, len(examples), tokens)
