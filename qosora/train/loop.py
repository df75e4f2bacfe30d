"""`qosora train`: fine-tune the adapter factors of a prepared model. One loop, top to bottom.

    for step in range(start, steps):
        for micro_batch of this rank:                       # grad accumulation
            with autocast(bf16):  loss_sum = chunked_ce(model.model(ids), lm_head, labels)
            (loss_sum / labelled tokens of the global batch).backward()
        all-reduce grads over ranks                          # torchrun / accelerate; no-op on one process
        clip_grad_norm_(trainable, max_grad_norm)
        grad += gamma / lr0 * grad(L_reg)                    # SORSA only, after clipping (DESIGN.md §2)
        optimizer.step(); scheduler.step()                   # AdamW / 8-bit AdamW, cosine with linear warmup
        log metrics.jsonl; checkpoint every --save-every steps (atomic)

Precision: the frozen NF4 residual dequantizes to bf16; the non-adapted weights (embeddings, norms) are bf16 and
matmuls run under bf16 autocast where the hardware has bf16 (CUDA sm80+, CPUs with AVX512-BF16/AMX), fp32
elsewhere. The trainable factors are held in fp32 while training (they are AdamW's master weights) and written
back in the adapter dtype (bf16) at the end.

Determinism: the batch order is a function of (seed, step) and the RNG state is checkpointed, so on CPU a run
killed and resumed from a checkpoint ends with the same factors as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qosora.loading import load
from qosora.prepared import save_trained
from qosora.config import CONFIG_NAME, PrepareConfig, QosoraConfig
from qosora.errors import QosoraError
from qosora.layer import adapter_layers, mark_only_adapters_trainable
from qosora.methods import METHOD_SPECS
from qosora.train import checkpoint, distributed
from qosora.train.config import TRAIN_CONFIG, TrainConfig, TrainResult, check_resume_config
from qosora.train.data import BatchOrder, collate, load_examples, pack, split_holdout
from qosora.evaluation import eval_loss
from qosora.precision import autocast_context, bf16_supported
from qosora.train.loss import causal_lm_loss
from qosora.train.metrics import LOSS_PLOT, METRICS, MetricsLog, plot_loss
from qosora.train.optim import cosine_with_warmup, effective_optim, make_optimizer
from qosora.train.regularizer import add_regularizer_grad, orthonormality

def _is_prepared(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def resolve_prepared(model_dir: str | Path, out: Path, prepare_config: PrepareConfig | None,
                     info: distributed.DistInfo, progress: bool) -> Path:
    """A prepared directory as given, or prepare a plain HF directory into OUT/prepared (rank 0, once)."""
    model_dir = Path(model_dir)
    if _is_prepared(model_dir):
        if prepare_config is not None:
            cfg = QosoraConfig.read(model_dir).prepare
            if (prepare_config.method, prepare_config.rank) != (cfg.method, cfg.rank):
                raise QosoraError(f"{model_dir} is already prepared ({cfg.method}, rank {cfg.rank}): drop --method/--rank "
                                  "or pass the original Hugging Face model directory")
        return model_dir
    if prepare_config is None:
        raise QosoraError(f"{model_dir} is not a prepared directory: pass --method and --rank to prepare it on the fly, "
                          "or run `qosora prepare` first")
    target = out / "prepared"
    if info.is_main and not _is_prepared(target):
        from qosora.preparation import prepare

        prepare(model_dir, target, prepare_config, overwrite=True, progress=progress)
    distributed.barrier(info)
    return target


def trainable_parameters(model, autocast: bool = False, fp32: bool = True) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the declared adapter parameters; return those by name.

    `fp32=True` (torch AdamW): the factors are cast to fp32 and are AdamW's master weights.
    `fp32=False` (bitsandbytes 8-bit AdamW on CUDA): they stay in the adapter dtype (bf16) and bitsandbytes
    updates them in place with fp32 math: 6 bytes a parameter instead of 10, which is what puts a 7B SORSA r=128
    run under 8 GB; an update below half a bf16 ulp of a weight is lost, so keep lr >= 1e-4 or use adamw.
    Without autocast, OSoRA's frozen U, Vh follow S and O to fp32 (a matmul needs one dtype on both sides).
    """
    mark_only_adapters_trainable(model)
    named = {}
    for lname, layer in adapter_layers(model).items():
        for fname, p in layer.adapter_params().items():
            if fp32:
                p.data = p.data.float()
            named[f"{lname}.{fname}"] = p
        if fp32 and not autocast:
            for fname in layer.spec.factors:
                if fname not in layer.spec.trainable:
                    setattr(layer, fname, getattr(layer, fname).float())
    return named


def _final_export(model, prepared: Path, out: Path, steps: int) -> None:
    """Make OUT itself a prepared-format directory (qosora merge/export/eval take it); config file moved last."""
    tmp = out / ".final"
    save_trained(model, prepared, tmp, trained_steps=steps, overwrite=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == CONFIG_NAME):
        os.replace(f, out / f.name)
    tmp.rmdir()


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
    config = config.validate()
    info = distributed.init()
    out = Path(config.out)
    if out.exists() and not resume and (out / TRAIN_CONFIG).is_file():  # every rank checks, none waits forever
        raise QosoraError(f"{out} already holds a training run: pass --resume to continue it or choose another --out")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(info)
    prepared = resolve_prepared(model_dir, out, prepare_config, info, progress and info.is_main)
    method = QosoraConfig.read(prepared).prepare.method
    spec = METHOD_SPECS[method]
    config = replace(config, lr=config.lr or spec.default_lr,
                     gamma=(spec.default_gamma if config.gamma is None else config.gamma) if spec.orthonormal_regularizer else 0.0)

    device = distributed.device_for(info)
    use_bf16 = bf16_supported(device) if config.bf16 is None else config.bf16
    torch.manual_seed(config.seed)
    model = load(prepared, dtype=torch.bfloat16 if use_bf16 else torch.float32, device=device)
    optim_name = effective_optim(config.optim, device)
    named = trainable_parameters(model, autocast=use_bf16, fp32=optim_name == "adamw")
    params = list(named.values())
    layers = adapter_layers(model)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()

    # --- data ------------------------------------------------------------------------------------------------
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    examples = load_examples(config.data, tokenizer, config.seq_len)
    train_ex, eval_ex = split_holdout(examples, config.eval_fraction, config.seed)
    if config.eval_data:
        eval_ex = load_examples(config.eval_data, tokenizer, config.seq_len)
    if config.packing:
        train_ex = pack(train_ex, config.seq_len)
    if config.eval_batches and eval_ex:
        eval_ex = eval_ex[: config.eval_batches * config.batch_size]
    order = BatchOrder(len(train_ex), config.batch_size, config.grad_accum, info.world_size, config.seed)
    total_steps = config.steps or order.steps_for_epochs(config.epochs or 1.0)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(0.03 * total_steps)

    if optim_name != config.optim and info.is_main:
        print(f"qosora train: {config.optim} needs CUDA (bitsandbytes); using torch AdamW on {device.type}")
    optimizer = make_optimizer(params, optim_name, config.lr, config.weight_decay, device)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps, config.min_lr_ratio)

    # --- resume ----------------------------------------------------------------------------------------------
    start_step, tokens_seen, resumed_from = 0, 0, 0
    if resume:
        check_resume_config(out, config)
        ckpt = checkpoint.latest(out)
        if ckpt is not None:
            state = checkpoint.restore(ckpt, named, optimizer, scheduler)
            start_step, tokens_seen, resumed_from = state["step"], state["tokens_seen"], state["step"]
            if info.is_main and progress:
                print(f"qosora train: resuming from {ckpt} (step {start_step} of {total_steps})")
        elif info.is_main and progress:
            print(f"qosora train: no checkpoint in {out}: starting from step 0")
    if info.is_main:
        (out / TRAIN_CONFIG).write_text(json.dumps(asdict(config), indent=1))
    metrics = MetricsLog(out / METRICS, start_step if resumed_from else None, info.is_main)

    def evaluate_now(step: int) -> float | None:
        if not eval_ex:
            return None
        loss, _ = eval_loss(model, eval_ex, pad_id, config.batch_size, use_bf16)
        metrics.write({"step": step, "eval_loss": loss})
        return loss

    initial_eval = evaluate_now(0) if start_step == 0 else None
    first_loss = final_loss = orth = None
    bar = tqdm(total=total_steps, initial=start_step, desc=f"train {method}", unit="step",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    run_tokens, run_seconds = 0, 0.0
    last_step = min(total_steps, start_step + stop_after) if stop_after is not None else total_steps
    step = start_step
    for step in range(start_step, last_step):
        t0 = time.perf_counter()
        micro = order.micro_batches(step)
        # The loss is normalised by the labelled tokens of the whole global batch, so accumulation and ranks add up.
        n_global = sum(train_ex[i].n_label_tokens for mb in micro for i in mb)
        n_input = sum(len(train_ex[i].input_ids) for mb in micro for i in mb)
        loss_sum = 0.0
        for j, mb in enumerate(micro):
            if j % info.world_size != info.rank:
                continue
            batch = collate([train_ex[i] for i in mb], pad_id).to(device)
            with autocast_context(device, use_bf16):
                loss, _ = causal_lm_loss(model, batch, chunked=config.chunked_loss)
            (loss / max(1, n_global)).backward()
            loss_sum += float(loss.detach())
        distributed.all_reduce_grads(params, info)
        loss_sum = distributed.all_reduce_sum(loss_sum, info, device)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        if method == "sorsa":
            orth = add_regularizer_grad(layers, config.gamma, config.lr)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        run_tokens, run_seconds = run_tokens + n_input, run_seconds + dt
        tokens_seen += n_input
        final_loss = loss_sum / max(1, n_global)
        if not math.isfinite(final_loss):
            raise QosoraError(f"the loss became {final_loss} at step {step + 1}: start a new run with a lower --lr "
                              f"(now {config.lr:g})")
        first_loss = final_loss if first_loss is None else first_loss
        row = {"step": step + 1, "loss": final_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_input / dt,
               "epoch": order.epoch_of(step + 1)}
        if orth is not None:
            row["orthonormality"] = orth
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            metrics.write(row)
        bar.set_postfix(loss=f"{final_loss:.4f}", tok_s=f"{n_input / dt:.0f}", refresh=False)
        bar.update(1)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
            evaluate_now(step + 1)
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            if info.is_main:
                checkpoint.save(out, step + 1, named, optimizer, scheduler, {"tokens_seen": tokens_seen},
                                keep=config.keep_checkpoints)
                plot_loss(metrics.rows(), out / LOSS_PLOT)
            distributed.barrier(info)
    bar.close()
    done = last_step
    final_eval = None
    if done == total_steps:
        final_eval = evaluate_now(total_steps)
        if info.is_main:
            if method == "sorsa":
                orth = orthonormality(layers)
            _final_export(model, prepared, out, total_steps)
    if info.is_main and not plot_loss(metrics.rows(), out / LOSS_PLOT) and progress:
        print("qosora train: matplotlib is not installed, no loss.png (pip install 'qosora[plot]')")
    distributed.barrier(info)
    distributed.shutdown(info)
    return TrainResult(
        out_dir=str(out), method=method, steps=done, first_loss=first_loss, final_loss=final_loss,
        initial_eval_loss=initial_eval, final_eval_loss=final_eval, orthonormality=orth,
        tokens_per_s=run_tokens / run_seconds if run_seconds else 0.0, seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )
