"""Which tensors train, and in which dtype: the adapter's declared parameters, everything else frozen."""

from __future__ import annotations

import torch

from qosora.layer import adapter_layers, mark_only_adapters_trainable


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
