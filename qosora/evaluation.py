"""Held-out evaluation: token-weighted loss, perplexity, and GSM8K-style exact match.

    loss = sum of next-token cross-entropy over labelled tokens / number of labelled tokens
    ppl  = exp(loss)
    exact-match: greedy-generate after the prompt, compare the number after `#### ` (or, failing that, the last
                 number in the output) with the reference answer's `#### n`.

Works on a prepared/trained directory (`qosora.load`) or a plain Hugging Face directory (a merged model).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from qosora.errors import QosoraError
from qosora.precision import autocast_context, bf16_supported
from qosora.train.data import Example, collate, gsm8k_prompt, load_examples, read_jsonl
from qosora.train.loss import causal_lm_loss

Metric = Literal["loss", "ppl", "exact-match"]
METRICS: tuple[str, ...] = ("loss", "ppl", "exact-match")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@torch.no_grad()
def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 4, autocast: bool = False,
              progress: bool = False) -> tuple[float, int]:
    """(mean loss per labelled token, labelled tokens) over `examples`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = collate([examples[i] for i in idx], pad_id).to(device)
        with autocast_context(device, autocast):
            loss, n = causal_lm_loss(model, batch)
        total += float(loss)
        tokens += n
    model.train(was_training)
    if tokens == 0:
        raise QosoraError("the evaluation data has no labelled tokens (every completion was truncated away?)")
    return total / tokens, tokens


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


@torch.no_grad()
def exact_match(model, tokenizer, records: list[dict], max_new_tokens: int = 256, batch_size: int = 8,
                autocast: bool = False, progress: bool = False) -> tuple[float, list[dict]]:
    """Greedy generation after each {"question"} (or {"prompt"}) and comparison of the extracted answer."""
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
        with autocast_context(device, autocast):
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


def load_model_and_tokenizer(directory: str | Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if (directory / "qosora_config.json").is_file():
        from qosora.loading import load

        model = load(directory, dtype=dtype, device=device)
    elif (directory / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    else:
        raise QosoraError(f"{directory} is neither a qosora directory nor a Hugging Face model directory")
    return model.eval(), AutoTokenizer.from_pretrained(directory)


def evaluate(directory: str | Path, data: str | Path, metric: str = "loss", *, seq_len: int = 1024,
             batch_size: int = 4, limit: int | None = None, max_new_tokens: int = 256,
             device: str | None = None, progress: bool = True) -> EvalReport:
    """Evaluate a trained (or prepared, or merged) model on a JSONL file."""
    if metric not in METRICS:
        raise QosoraError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = bf16_supported(dev)
    model, tokenizer = load_model_and_tokenizer(directory, dev, torch.bfloat16 if bf16 else torch.float32)
    if metric == "exact-match":
        records = [r for _, r in read_jsonl(data)][:limit]
        if not all("question" in r or "prompt" in r for r in records):
            raise QosoraError(f"{data}: exact-match needs {{\"question\", \"answer\"}} or {{\"prompt\", \"completion\"}} records")
        acc, _ = exact_match(model, tokenizer, records, max_new_tokens, batch_size, bf16, progress)
        return EvalReport(metric, acc, None, None, acc, len(records), 0)
    examples = load_examples(data, tokenizer, seq_len)[:limit]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    loss, tokens = eval_loss(model, examples, pad, batch_size, bf16, progress)
    ppl = math.exp(min(loss, 700.0))
    return EvalReport(metric, loss if metric == "loss" else ppl, loss, ppl, None, len(examples), tokens)
