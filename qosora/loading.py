"""`load`: the trainable transformers model of a prepared / trained directory (no SVD runs, nothing downloaded).

    config.json -> AutoModelForCausalLM on the meta device -> targeted linears replaced by SVDAdapterLinear
                -> base.safetensors assigned -> rotary buffers rebuilt -> tied head re-tied

`load_hf`: the same for a plain Hugging Face directory (a merged model), read through our own ShardReader instead
of `from_pretrained`: safetensors only (a `.bin` pickle is refused, never unpickled), and every tensor the
architecture needs must be there with its shape (a missing one would otherwise be randomly initialised).

No custom modelling code is ever imported (`trust_remote_code=False`): only architectures transformers ships.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qosora.architectures import check_supported, read_hf_config
from qosora.errors import QosoraError
from qosora.nf4 import DTYPES
from qosora.prepared import PreparedReader
from qosora.shards import ShardReader


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
    from transformers import AutoModelForCausalLM

    reader = PreparedReader(directory)
    hf_config = _auto_config(reader.directory)
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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatch: base.safetensors and config.json disagree
        raise QosoraError(f"{directory}: base.safetensors does not fit config.json "
                          f"({str(e).strip().splitlines()[-1].strip()}): corrupt directory, re-run `qosora prepare`") from None
    if unexpected:
        raise QosoraError(f"{directory}: base.safetensors has tensors the model does not know ({unexpected[:3]}...): corrupt directory")
    return _assembled(model, hf_config, device, f"{directory}: tensors missing from base.safetensors",
                      "corrupt directory")


def _assembled(model, hf_config, device, missing: str, fix: str):
    """The last steps of building a model on the meta device: rotary buffers, the tied head, nothing left on meta."""
    _rebuild_rotary(model)
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise QosoraError(f"{missing} ({still_meta[:3]}): {fix}")
    return model.to(device).eval()


def _is_adapted_bias(name: str, modules: set[str]) -> bool:
    return name.endswith(".bias") and name[: -len(".bias")] in modules


def builtin_from_pretrained(loader, directory: Path, problem: str, fix: str):
    """`loader.from_pretrained(directory)` with classes transformers ships only (an `auto_map` to custom code is never
    followed: trust_remote_code=False); a failure is one line naming `problem` and `fix`."""
    try:
        return loader.from_pretrained(directory, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QosoraError(f"{directory}: {problem} ({first}): {fix}") from None


def _auto_config(directory: Path):
    from transformers import AutoConfig

    return builtin_from_pretrained(AutoConfig, directory, "config.json cannot be read by transformers",
                                   "qosora runs only the architectures transformers ships, never custom code")


def load_tokenizer(directory: Path):
    """The directory's tokenizer, by a class transformers ships."""
    from transformers import AutoTokenizer

    return builtin_from_pretrained(AutoTokenizer, directory, "no tokenizer transformers can load without custom code",
                                   "copy the source model's tokenizer.json and tokenizer_config.json into it")


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A plain Hugging Face model directory as a transformers model, every tensor checked before it is used.

    Refused: no safetensors (pickles are never loaded), a tensor the model needs that is missing (an untied
    lm_head included; a tied one may be absent), a tensor the model does not have, a shape that differs from
    config.json's.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    check_supported(read_hf_config(directory), str(directory))
    reader = ShardReader(directory)
    hf_config = _auto_config(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    present = set(reader.names())
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [n for n in expected if n not in present and not (tied and n == "lm_head.weight")]
    if missing:
        raise QosoraError(f"{directory}: the checkpoint lacks {len(missing)} tensor(s) the model needs "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): incomplete or foreign "
                          "checkpoint; re-download it or re-run `qosora merge`")
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise QosoraError(f"{directory}: the checkpoint has tensor(s) this {hf_config.model_type} model does not know "
                          f"({', '.join(unexpected[:3])}): config.json does not match the weights")
    for name in present:
        if tuple(reader.shape(name)) != expected[name]:
            raise QosoraError(f"{directory}: {name} has shape {tuple(reader.shape(name))}, config.json implies "
                              f"{expected[name]}: config.json does not match the weights")
    state = {n: reader.get(n) for n in present}
    state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    return _assembled(model, hf_config, device, f"{directory}: tensors missing from the checkpoint",
                      "incomplete checkpoint")
