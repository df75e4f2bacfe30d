"""Which device a verb runs on, which float precision it computes in natively there, and the autocast context.

bf16 autocast pays only where the hardware has bf16 arithmetic: CUDA sm80+, and CPUs with AVX512-BF16 or AMX.
On an AVX2-only CPU a bf16 matmul of SmolLM2's MLP shape took 43.9 ms against 8.1 ms in fp32 (5.4x slower), so
there the compute runs in fp32 while the factors are still stored and saved in bf16.
"""

from __future__ import annotations

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


_FINITE_CHUNK = 1 << 20  # elements checked at a time: 1 MB of temporaries, whatever the tensor's size


def all_finite(t) -> bool:
    """No NaN or inf in a float tensor or array, checked a chunk at a time (a whole-tensor isfinite of a 7B
    embedding would allocate its size again; a float64 sum would allocate eight times it)."""
    if hasattr(t, "is_floating_point"):
        if not t.is_floating_point():
            return True
        flat = t.reshape(-1)
        return all(bool(torch.isfinite(c).all()) for c in flat.split(_FINITE_CHUNK))
    import numpy as np

    if t.dtype.kind != "f":
        return True
    flat = t.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + _FINITE_CHUNK]).all()) for i in range(0, flat.size, _FINITE_CHUNK))
