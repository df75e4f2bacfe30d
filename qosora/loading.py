"""`load`: the trainable transformers model of a prepared / trained directory (no SVD runs, nothing downloaded).

    config.json -> AutoModelForCausalLM on the meta device -> targeted linears replaced by SVDAdapterLinear
                -> base.safetensors assigned -> rotary buffers rebuilt -> tied head re-tied

No custom modelling code is ever imported (`trust_remote_code=False`): only architectures transformers ships.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qosora.errors import QosoraError
from qosora.nf4 import DTYPES
from qosora.prepared import PreparedReader


def _rebuild_rotary(model: torch.nn.Module) -> None:
    # Rotary embeddings hold non-persistent buffers (inv_freq) that a meta-device model leaves empty.
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, type(module)(config=model.config))


def load(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype | str | None = None,
):
    """Build the transformers model of a prepared/trained directory, adapted linears replaced by SVDAdapterLinear.

    No SVD runs: the stored residual and factors are loaded as they are, so the model is bit-identical to the one
    that was saved. `dtype` casts the non-adapted weights (embeddings, norms); the factors keep their stored dtype.
    `compute_dtype` overrides the adapted layers' compute dtype (default: the prepared one, bf16); float32 evaluates
    the stored function exactly, deq(W_res) x + B (A x), as the ONNX export's parity check needs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = PreparedReader(directory)
    hf_config = AutoConfig.from_pretrained(reader.directory, trust_remote_code=False)
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype or torch.float32, trust_remote_code=False)
    if isinstance(compute_dtype, str):
        compute_dtype = DTYPES[compute_dtype]
    for module in reader.modules:
        parent_name, _, child = module.rpartition(".")
        layer = reader.layer(module)
        if compute_dtype is not None:
            layer.set_compute_dtype(compute_dtype)
        setattr(model.get_submodule(parent_name), child, layer)
    adapted = set(reader.modules)
    state = {n: reader.base_tensor(n) for n in reader.base_names() if not _is_adapted_bias(n, adapted)}
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise QosoraError(f"{directory}: base.safetensors has tensors the model does not know ({unexpected[:3]}...): corrupt directory")
    _rebuild_rotary(model)
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise QosoraError(f"{directory}: tensors missing from base.safetensors ({still_meta[:3]}): corrupt directory")
    return model.to(device).eval()


def _is_adapted_bias(name: str, modules: set[str]) -> bool:
    return name.endswith(".bias") and name[: -len(".bias")] in modules
