"""Which device a verb runs on, which float precision it computes in natively there, and the autocast context.

bf16 autocast pays only where the hardware has bf16 arithmetic: CUDA sm80+, and CPUs with AVX512-BF16 or AMX.
On an AVX2-only CPU a bf16 matmul of SmolLM2's MLP shape took 43.9 ms against 8.1 ms in fp32 (5.4x slower), so
there the compute runs in fp32 while the factors are still stored and saved in bf16.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from qosora.errors import QosoraError


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 matmuls run natively: CUDA sm80+; a CPU with AVX512-BF16 or AMX whose kernels PyTorch uses
    (ATEN_CPU_CAPABILITY=avx2 pins them to AVX2, which then counts as no bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    capability = torch.backends.cpu.get_cpu_capability()
    return "AVX512" in capability and any(getattr(cpu, p, lambda: False)() for p in probes)


def autocast_context(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda when there is one, else cpu; a CUDA device on a machine without one is a QosoraError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise QosoraError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QosoraError(f"--device {device} but this machine has no CUDA device: use --device cpu")
    return dev


def all_finite(t) -> bool:
    """No NaN or inf in a float tensor or array, without a temporary the tensor's size: a float64 sum is
    non-finite exactly when an element is (float32 values cannot overflow a float64 sum)."""
    if hasattr(t, "is_floating_point"):
        return not t.is_floating_point() or math.isfinite(float(t.sum(dtype=torch.float64)))
    import numpy as np

    return t.dtype.kind != "f" or math.isfinite(float(np.add.reduce(t, axis=None, dtype=np.float64)))
