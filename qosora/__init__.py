"""qosora: SVD-based adapters (SORSA, OSoRA, PiSSA) on an NF4 residual, from prepare to ONNX.

    prepare -> load / train -> merge -> export -> run

`import qosora` stays light: torch, bitsandbytes, onnx and onnxruntime load only when a verb that needs them is
first used (the deploy path, `qosora.run`, never imports torch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "prepare": ("qosora.preparation", "prepare"),
    "PrepareConfig": ("qosora.config", "PrepareConfig"),
    "QuantConfig": ("qosora.config", "QuantConfig"),
    "SVDConfig": ("qosora.config", "SVDConfig"),
    "load": ("qosora.loading", "load"),
    "save_trained": ("qosora.prepared", "save_trained"),
    "PreparedReader": ("qosora.prepared", "PreparedReader"),
    "AdaptedWeight": ("qosora.adapted", "AdaptedWeight"),
    "merge": ("qosora.merging", "merge"),
    "convert": ("qosora.interop.peft_out", "convert"),
    "inspect": ("qosora.inspection", "inspect"),
    "adapter_layers": ("qosora.layer", "adapter_layers"),
    "SVDAdapterLinear": ("qosora.layer", "SVDAdapterLinear"),
    "QosoraError": ("qosora.errors", "QosoraError"),
    "finetune": ("qosora.train.loop", "finetune"),
    "evaluate": ("qosora.evaluation", "evaluate"),
    "plan": ("qosora.planning", "plan"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qosora' has no attribute {name!r}")
