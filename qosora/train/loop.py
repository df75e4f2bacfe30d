"""`qosora train`: fine-tune the adapter factors of a prepared model, as a recipe of named phases.

    finetune = set up data -> set up model -> resume -> steps -> finish
      step:  for micro_batch of this rank:                 # grad accumulation
                 with autocast(bf16): loss_sum = chunked_ce(model.model(ids), lm_head, labels)
                 (loss_sum / labelled tokens of the global batch).backward()
             all-reduce grads over ranks                    # torchrun / accelerate; no-op on one process
             clip_grad_norm_(trainable, max_grad_norm)
             grad += gamma / lr0 * grad(L_reg)              # methods whose spec has the regularizer (SORSA)
             optimizer.step(); scheduler.step()             # AdamW / 8-bit AdamW, cosine with linear warmup

Precision (qosora.precision): where the processor computes bf16 natively (CUDA sm80+, AVX512-BF16/AMX CPUs) the
NF4 residual dequantizes to bf16 and matmuls run under bf16 autocast; elsewhere everything computes in fp32, which
is several times faster there. Either way the factors are fp32 while training (AdamW's master weights) and saved
in the adapter dtype (bf16).

Determinism: the batch order is a function of (seed, step) and the RNG state is checkpointed, so on CPU a run
killed and resumed from a checkpoint ends with the same factors as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qosora.config import CONFIG_NAME, PrepareConfig, QosoraConfig
from qosora.errors import QosoraError
from qosora.evaluation import eval_loss
from qosora.layer import adapter_layers
from qosora.loading import load, load_tokenizer
from qosora.methods import METHOD_SPECS, MethodSpec
from qosora.precision import autocast_context, bf16_supported
from qosora.prepared import save_trained
from qosora.train import checkpoint, distributed, rundir
from qosora.train.config import TrainConfig, TrainResult
from qosora.train.data import BatchOrder, Example, collate, load_examples, pack, split_holdout
from qosora.train.loss import causal_lm_loss
from qosora.train.metrics import LOSS_PLOT, METRICS_FILE, MetricsLog, plot_loss
from qosora.train.optim import cosine_with_warmup, effective_optim, make_optimizer
from qosora.train.params import trainable_parameters
from qosora.train.regularizer import add_regularizer_grad, orthonormality


@dataclass
class _Run:
    """Everything the set-up phases produce and the step loop reads."""

    config: TrainConfig
    spec: MethodSpec
    info: distributed.DistInfo
    out: Path
    prepared: Path
    device: torch.device
    bf16: bool
    model: torch.nn.Module
    named: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_ex: list[Example]
    eval_ex: list[Example]
    pad_id: int
    order: BatchOrder
    total_steps: int
    progress: bool

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.named.values())

    def say(self, message: str) -> None:
        """Status lines go to stderr (also under --json, whose stdout stays one JSON object)."""
        if self.info.is_main:
            print(f"qosora train: {message}", file=sys.stderr)


def finetune(
    model_dir: str | Path,
    config: TrainConfig,
    prepare_config: PrepareConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Fine-tune a prepared directory (or a plain HF directory with `prepare_config`) and write OUT.

    OUT ends as a prepared-format directory with the trained factors, plus metrics.jsonl, loss.png,
    train_config.json and checkpoints/. `stop_after` ends the run early after that many optimizer steps (tests).
    """
    started = time.perf_counter()
    config, model_dir = config.validate(), Path(model_dir)
    if prepare_config is not None:
        prepare_config.validate()
    info = distributed.init()
    out = Path(config.out)
    rundir.check_out(out, model_dir, resume)
    with rundir.removed_on_failure(out, info):
        pad_id, train_ex, eval_ex = _setup_data(model_dir, config)  # bad data fails before any SVD runs
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier(info)
        prepared = rundir.resolve_prepared(model_dir, out, prepare_config, info, progress and info.is_main)
        run = _setup_model(prepared, config, info, out, train_ex, eval_ex, pad_id, progress)
        start_step, tokens_seen = _resume(run) if resume else (0, 0)
        if info.is_main:
            rundir.write_run_config(out, run.config, prepared)
        result = _steps(run, start_step, tokens_seen, stop_after)
    result.seconds = time.perf_counter() - started
    distributed.shutdown(info)
    return result


# --- set-up --------------------------------------------------------------------------------------------------
def _setup_data(model_dir: Path, config: TrainConfig) -> tuple[int, list[Example], list[Example]]:
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples = _with_labels(load_examples(config.data, tokenizer, config.seq_len), config.data, config.seq_len)
    train_ex, eval_ex = split_holdout(examples, config.eval_fraction, config.seed)
    if config.eval_data:
        eval_ex = _with_labels(load_examples(config.eval_data, tokenizer, config.seq_len), config.eval_data,
                               config.seq_len)
    if config.packing:
        train_ex = pack(train_ex, config.seq_len)
    if config.eval_batches and eval_ex:
        eval_ex = eval_ex[: config.eval_batches * config.batch_size]
    return pad_id, train_ex, eval_ex


def _with_labels(examples: list[Example], path: str, seq_len: int) -> list[Example]:
    """Drop examples with nothing to learn (every label cut by --seq-len, empty completions); none left is an error."""
    kept = [e for e in examples if e.n_label_tokens > 0]
    if not kept:
        raise QosoraError(f"{path}: no example has a completion token within --seq-len {seq_len} (empty texts, or "
                          "prompts / system prompts that fill the whole sequence): raise --seq-len or shorten them")
    if len(kept) < len(examples):
        print(f"qosora train: {path}: skipping {len(examples) - len(kept)} of {len(examples)} examples whose "
              f"completion is empty or lies past --seq-len {seq_len}", file=sys.stderr)
    return kept


def _setup_model(prepared: Path, config: TrainConfig, info, out: Path, train_ex, eval_ex, pad_id: int,
                 progress: bool) -> _Run:
    spec = METHOD_SPECS[QosoraConfig.read(prepared).prepare.method]
    config = replace(config, lr=config.lr or spec.default_lr,
                     gamma=(spec.default_gamma if config.gamma is None else config.gamma)
                     if spec.orthonormal_regularizer else 0.0)
    device = distributed.device_for(info)
    use_bf16 = bf16_supported(device) if config.bf16 is None else config.bf16
    torch.manual_seed(config.seed)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    model = load(prepared, dtype=dtype, device=device, compute_dtype=None if use_bf16 else torch.float32)
    optim_name = effective_optim(config.optim, device)
    named = trainable_parameters(model, autocast=use_bf16, fp32=optim_name == "adamw")
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    order = BatchOrder(len(train_ex), config.batch_size, config.grad_accum, info.world_size, config.seed)
    total_steps = config.steps or order.steps_for_epochs(config.epochs or 1.0)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.03 * total_steps)
    optimizer = make_optimizer(list(named.values()), optim_name, config.lr, config.weight_decay, device)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps, config.min_lr_ratio)
    run = _Run(config, spec, info, out, prepared, device, use_bf16, model, named, optimizer, scheduler, train_ex,
               eval_ex, pad_id, order, total_steps, progress)
    if optim_name != config.optim:
        run.say(f"{config.optim} needs CUDA (bitsandbytes); using torch AdamW on {device.type}")
    run.say(f"computing in {'bf16 (autocast)' if use_bf16 else 'fp32'} on {device.type}"
            f"{'' if config.bf16 is not None else ' (native bf16 ' + ('found' if use_bf16 else 'absent') + ')'}; "
            f"{torch.get_num_threads()} threads")
    return run


def _resume(run: _Run) -> tuple[int, int]:
    """Restore the newest readable checkpoint (a truncated one falls back to the one before); (step, tokens)."""
    rundir.check_resume(run.out, run.config, run.prepared)
    if rundir.is_complete(run.out, run.total_steps):
        raise QosoraError(f"the run in {run.out} already finished its {run.total_steps} steps: nothing to resume "
                          "(start a new run with another --out to train further)")
    for ckpt in reversed(checkpoint.step_dirs(run.out)):
        try:
            state = checkpoint.restore(ckpt, run.named, run.optimizer, run.scheduler)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
            run.say(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {e}); trying the previous one")
            continue
        run.say(f"resuming from {ckpt} (step {state['step']} of {run.total_steps})")
        return state["step"], state["tokens_seen"]
    run.say(f"no readable checkpoint in {run.out}: starting from step 0")
    return 0, 0


# --- steps ---------------------------------------------------------------------------------------------------
def _step(run: _Run, step: int) -> dict:
    """One optimizer step; returns its metrics row."""
    t0 = time.perf_counter()
    info, ex, config = run.info, run.train_ex, run.config
    micro = run.order.micro_batches(step)
    # The loss is normalised by the labelled tokens of the whole global batch, so accumulation and ranks add up.
    n_global = sum(ex[i].n_label_tokens for mb in micro for i in mb)
    n_input = sum(len(ex[i].input_ids) for mb in micro for i in mb)
    loss_sum = 0.0
    for j, mb in enumerate(micro):
        if j % info.world_size != info.rank:
            continue
        batch = collate([ex[i] for i in mb], run.pad_id).to(run.device)
        with autocast_context(run.device, run.bf16):
            loss, _ = causal_lm_loss(run.model, batch, chunked=config.chunked_loss)
        (loss / max(1, n_global)).backward()
        loss_sum += float(loss.detach())
    distributed.all_reduce_grads(run.params, info)
    loss_sum = distributed.all_reduce_sum(loss_sum, info, run.device)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    orth = add_regularizer_grad(adapter_layers(run.model), config.gamma, config.lr) \
        if run.spec.orthonormal_regularizer else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    loss = loss_sum / max(1, n_global)
    if not math.isfinite(loss):
        raise QosoraError(f"the loss became {loss} at step {step + 1}: start a new run with a lower --lr "
                          f"(now {config.lr:g})")
    row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_input / dt,
           "epoch": run.order.epoch_of(step + 1), "tokens": n_input, "seconds": dt}
    if orth is not None:
        row["orthonormality"] = orth
    return row


def _steps(run: _Run, start_step: int, tokens_seen: int, stop_after: int | None) -> TrainResult:
    config, info, out, total = run.config, run.info, run.out, run.total_steps
    metrics = MetricsLog(out / METRICS_FILE, start_step if start_step else None, info.is_main)

    def evaluate_now(step: int) -> float | None:
        if not run.eval_ex:
            return None
        loss, _ = eval_loss(run.model, run.eval_ex, run.pad_id, config.batch_size, run.bf16)
        metrics.write({"step": step, "eval_loss": loss})
        return loss

    initial_eval = evaluate_now(0) if start_step == 0 else None
    first = last = None
    run_tokens, run_seconds = 0, 0.0
    last_step = min(total, start_step + stop_after) if stop_after is not None else total
    bar = tqdm(total=total, initial=start_step, desc=f"train {run.spec.name}", unit="step",
               disable=not (run.progress and info.is_main), dynamic_ncols=True)
    for step in range(start_step, last_step):
        row = _step(run, step)
        tokens, seconds = row.pop("tokens"), row.pop("seconds")
        run_tokens, run_seconds, tokens_seen = run_tokens + tokens, run_seconds + seconds, tokens_seen + tokens
        first, last = first or row, row
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            metrics.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.update(1)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total:
            evaluate_now(step + 1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total:
            if info.is_main:
                checkpoint.save(out, step + 1, run.named, run.optimizer, run.scheduler, {"tokens_seen": tokens_seen},
                                keep=config.keep_checkpoints)
                plot_loss(metrics.rows(), out / LOSS_PLOT)
            distributed.barrier(info)
    bar.close()
    final_eval = orth = None
    if last_step == total:
        final_eval = evaluate_now(total)
        if run.spec.orthonormal_regularizer:
            orth = orthonormality(adapter_layers(run.model))
        if info.is_main:
            _save_final(run)
    if info.is_main and not plot_loss(metrics.rows(), out / LOSS_PLOT):
        run.say("matplotlib is not installed, no loss.png (pip install 'qosora[plot]')")
    distributed.barrier(info)
    return TrainResult(
        out_dir=str(out), method=run.spec.name, steps=last_step, first_loss=first and first["loss"],
        final_loss=last and last["loss"], initial_eval_loss=initial_eval, final_eval_loss=final_eval,
        orthonormality=orth, tokens_per_s=run_tokens / run_seconds if run_seconds else 0.0, seconds=0.0,
        resumed_from=start_step,
    )


def _save_final(run: _Run) -> None:
    """Make OUT itself a prepared-format directory (qosora merge/export/eval take it); config file moved last."""
    tmp = run.out / ".final"
    save_trained(run.model, run.prepared, tmp, trained_steps=run.total_steps, overwrite=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_NAME):
        os.replace(f, run.out / f.name)
    tmp.rmdir()
