"""Data parallelism under `torchrun --nproc_per_node N` or `accelerate launch` (both set RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR): NCCL on CUDA, gloo on CPU.

Only the adapter factors train (a few percent of the parameters), so instead of wrapping the model in
DistributedDataParallel we all-reduce their gradients ourselves, once per optimizer step, as one flat tensor.
That is what DDP with `no_sync` on the accumulation micro-batches does, without DDP's hooks on a model whose
modules it does not own. Every rank holds the full model (FSDP-style sharding of the frozen NF4 residual is not
supported by bitsandbytes' CPU path and is not implemented here).

The loss of a step is normalised by the labelled-token count of the *global* batch, which every rank computes
from the shared, seeded batch order, so summing gradients across ranks gives exactly the single-process gradient
of the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init() -> DistInfo:
    """Join the process group the launcher describes in the environment; a plain run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Sum every parameter's gradient over the ranks (missing gradients count as zero)."""
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(p.dtype)
        offset += n


def all_reduce_sum(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
