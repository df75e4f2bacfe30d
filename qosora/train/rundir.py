"""The run directory OUT of `qosora train`: what may be written there, where its prepared model comes from, and
whether a `--resume` continues the same run.

    OUT/train_config.json   the TrainConfig + `prepared`: {method, rank, targets, quant, svd, fingerprint}
    OUT/prepared/           when MODEL is a plain Hugging Face directory (prepared on the fly, ours to replace)
    OUT/checkpoints/        resumable states (qosora.train.checkpoint)
    OUT/metrics.jsonl, loss.png
    OUT/qosora_config.json, adapter.safetensors, residual*, base*   the trained model, written last

A run refuses an OUT that holds something else, an OUT that is (or lies inside) its input, and a resume whose
options or prepared model differ from the run it would continue.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from qosora.config import CONFIG_NAME, PrepareConfig, QosoraConfig
from qosora.errors import QosoraError
from qosora.files import check_directory_path
from qosora.prepared import is_prepared
from qosora.train import distributed
from qosora.train.checkpoint import CHECKPOINTS
from qosora.train.config import TRAIN_CONFIG, TrainConfig

PREPARED = "prepared"
# Options that may change between a run and its --resume (they do not change the trained function).
_RESUMABLE = {"out", "save_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches"}


def check_out(out: Path, model_dir: Path, resume: bool) -> None:
    """Refuse an OUT that would overwrite the input or a directory that is not a qosora run."""
    resolved, src = out.resolve(), model_dir.resolve()
    if resolved == src or src in resolved.parents:
        raise QosoraError(f"--out {out} is (or lies inside) the input {model_dir}: training writes its adapter there "
                          "and would overwrite the input's; choose another --out")
    if resolved in src.parents and not (src.parent == resolved and src.name == PREPARED):
        raise QosoraError(f"--out {out} contains the input {model_dir}: choose another --out")
    check_directory_path(out)
    if (out / TRAIN_CONFIG).is_file():
        if not resume:
            raise QosoraError(f"{out} already holds a training run: pass --resume to continue it or choose another --out")
    elif resume:
        raise QosoraError(f"--resume: {out} holds no training run ({TRAIN_CONFIG} missing): drop --resume")
    elif out.is_dir() and any(p.name != PREPARED and not p.name.startswith(".") for p in out.iterdir()):
        raise QosoraError(f"--out {out} is a non-empty directory that is not a qosora run: choose another --out")


@contextmanager
def removed_on_failure(out: Path, info: distributed.DistInfo) -> Iterator[None]:
    """If this run created OUT and fails before writing a checkpoint, remove OUT (nothing half-written stays)."""
    created = not out.exists()
    try:
        yield
    except BaseException:
        if created and info.is_main and out.is_dir() and not (out / CHECKPOINTS).is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise


def prepared_fingerprint(directory: Path) -> dict:
    """What identifies a prepared model: its PrepareConfig and a sha256 of its frozen files (residual and base).

    The whole content is hashed (~1 GB/s: seconds for a 7B model, once at start and once at resume): two prepared
    directories of the same shapes differ only in their numbers.
    """
    cfg = QosoraConfig.read(directory)
    h = hashlib.sha256()
    for f in sorted(directory.glob("residual*.safetensors")) + sorted(directory.glob("base*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return {"config": json.loads(json.dumps(asdict(cfg.prepare))), "source": cfg.source.get("fingerprint"),
            "frozen_sha256": h.hexdigest()}


def resolve_prepared(model_dir: Path, out: Path, prepare_config: PrepareConfig | None,
                     info: distributed.DistInfo, progress: bool) -> Path:
    """A prepared directory as given, or prepare a plain HF directory into OUT/prepared (rank 0, once).

    An OUT/prepared left by an earlier run is reused only when its settings and source model are the ones asked
    for now; otherwise it is prepared again (it is ours).
    """
    if is_prepared(model_dir):
        if prepare_config is not None:
            cfg = QosoraConfig.read(model_dir).prepare
            if (prepare_config.method, prepare_config.rank) != (cfg.method, cfg.rank):
                raise QosoraError(f"{model_dir} is already prepared ({cfg.method}, rank {cfg.rank}): drop --method/--rank "
                                  "or pass the original Hugging Face model directory")
        return model_dir
    if prepare_config is None:
        raise QosoraError(f"{model_dir} is not a prepared directory: pass --method and --rank to prepare it on the fly, "
                          "or run `qosora prepare` first")
    target = out / PREPARED
    if info.is_main and not _matches(target, model_dir, prepare_config):
        from qosora.preparation import prepare

        prepare(model_dir, target, prepare_config, overwrite=True, progress=progress)
    distributed.barrier(info)
    return target


def _matches(target: Path, model_dir: Path, config: PrepareConfig) -> bool:
    if not is_prepared(target):
        return False
    try:
        saved = QosoraConfig.read(target)
    except QosoraError:
        return False
    from qosora.shards import ShardReader

    wanted = replace(config, targets=PrepareConfig.normalize_targets(config.targets))
    return saved.prepare == wanted and saved.source.get("fingerprint") == ShardReader(model_dir).fingerprint()


def write_run_config(out: Path, config: TrainConfig, prepared: Path) -> None:
    record = {**asdict(config), "prepared": prepared_fingerprint(prepared)}
    (out / TRAIN_CONFIG).write_text(json.dumps(record, indent=1))


def check_resume(out: Path, config: TrainConfig, prepared: Path) -> None:
    """The options and the prepared model of a resumed run must be the ones it started with."""
    try:
        saved = json.loads((out / TRAIN_CONFIG).read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise QosoraError(f"{out / TRAIN_CONFIG} is corrupt ({e}): start a new run with another --out") from None
    changed = [k for k, v in asdict(config).items() if k not in _RESUMABLE and saved.get(k) != v]
    if changed:
        raise QosoraError(f"--resume with different options than the run in {out} ({', '.join(changed)}): "
                          "use the original options or another --out")
    before, now = saved.get("prepared"), prepared_fingerprint(prepared)
    if before is not None and before != now:
        what = [k for k in now if before.get(k) != now[k]]
        raise QosoraError(f"--resume: the prepared model differs from the one the run in {out} started from "
                          f"({', '.join(what)} changed): resume with the original prepared directory")


def is_complete(out: Path, total_steps: int) -> bool:
    if not (out / CONFIG_NAME).is_file():
        return False
    try:
        return QosoraConfig.read(out).trained_steps >= total_steps
    except QosoraError:
        return False
