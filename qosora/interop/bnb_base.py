"""The frozen NF4 residual model in transformers' own bitsandbytes 4-bit serialization: the same bits, not requantized.

`AutoModelForCausalLM.from_pretrained(OUT/base)` reads `quantization_config` from config.json, builds
`bitsandbytes.nn.Linear4bit` layers and fills each from these tensors (transformers' `Bnb4bitDeserialize` ->
`Params4bit.from_prequantized`). The names are the ones `save_pretrained` writes for a `BitsAndBytesConfig(
load_in_4bit=True)` model; per adapted linear {m}, next to our own names (qosora/nf4.py):

    {m}.weight                                uint8 (d_out*d_in/2, 1)   packed NF4 codes            {m}.nf4.data
    {m}.weight.absmax                         uint8 (n_blocks,)         8-bit block scales          {m}.nf4.absmax
    {m}.weight.nested_absmax                  fp32  (n_blocks/256,)     scales of the block scales  {m}.nf4.absmax_scale
    {m}.weight.nested_quant_map               fp32  (256,)              their 8-bit code            {m}.nf4.absmax_code
    {m}.weight.quant_map                      fp32  (16,)               the NF4 levels
    {m}.weight.quant_state.bitsandbytes__nf4  uint8 (JSON bytes)        quant_type, blocksize, dtype, shape,
                                                                        nested_blocksize, nested_dtype, nested_offset
                                                                        (= {m}.nf4.absmax_offset)

Without double quantization `absmax` is fp32 and the nested entries are absent. The JSON `dtype` is what the codes
dequantize to; bitsandbytes computes in the activations' dtype, so the model's `dtype` decides the compute.
Every other tensor (embeddings, norms, lm_head, adapted linears' biases, linears left unadapted) is written as it is,
cast to `dtype`; the unadapted linears and lm_head are named in `llm_int8_skip_modules` so they stay dense. A
residual kept dense (`quant_type="none"`) is written as a plain weight, and config.json gets no quantization_config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qosora.architectures import layer_index, parse_linear
from qosora.config import QuantConfig
from qosora.files import copy_side_files
from qosora.nf4 import DTYPES, NF4Weight
from qosora.prepared import PreparedReader
from qosora.shards import ShardedWriter

_PACKED_STATE = "weight.quant_state.bitsandbytes__nf4"


def quantization_config(quant: QuantConfig, dtype: str, skip: list[str]) -> dict:
    """config.json's `quantization_config`, as transformers' BitsAndBytesConfig(load_in_4bit=True, nf4).to_dict()."""
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
        "_load_in_8bit": False, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": quant.double_quant,
        "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    }


def bnb_tensors(module: str, weight: NF4Weight, dtype: str) -> dict[str, torch.Tensor]:
    """One NF4 residual under transformers' names (table above): our stored tensors, renamed, nothing recomputed."""
    state = weight.state
    packed = {"quant_type": "nf4", "blocksize": int(state.blocksize), "dtype": dtype,
              "shape": [int(s) for s in weight.shape]}
    out = {f"{module}.weight": weight.data.reshape(-1, 1), f"{module}.weight.absmax": state.absmax,
           f"{module}.weight.quant_map": state.code.float()}
    if state.nested:
        out[f"{module}.weight.nested_absmax"] = state.state2.absmax.float()
        out[f"{module}.weight.nested_quant_map"] = state.state2.code.float()
        packed.update(nested_blocksize=int(state.state2.blocksize), nested_dtype="float32",
                      nested_offset=float(state.offset))
    out[f"{module}.{_PACKED_STATE}"] = torch.tensor(list(json.dumps(packed).encode()), dtype=torch.uint8)
    return out


def write_base(reader: PreparedReader, out: Path, dtype: str, *, progress: bool = False,
               max_shard_bytes: int = 512 << 20) -> None:
    """Write the residual model of `reader` into `out` (config.json, model*.safetensors, tokenizer and side files)."""
    cast = DTYPES[dtype]
    out.mkdir(parents=True, exist_ok=True)
    adapted = set(reader.modules)
    writer = ShardedWriter(out, "model", max_shard_bytes)
    order = sorted([*reader.base_names(), *adapted], key=lambda n: (layer_index(n), n))
    for name in tqdm(order, desc="base", unit="tensor", disable=not progress):
        if name in adapted:
            residual = reader.residual(name)
            tensors = (bnb_tensors(name, residual, dtype) if isinstance(residual, NF4Weight)
                       else {f"{name}.weight": residual.to(cast)})
        else:
            t = reader.base_tensor(name)
            tensors = {name: t.to(cast) if t.is_floating_point() else t}
        for key, t in tensors.items():
            writer.add(key, t)
    writer.close()
    copy_side_files(reader.directory, out)
    config = {k: v for k, v in reader.hf_config.items() if k not in ("torch_dtype", "quantization_config")}
    config["dtype"] = dtype
    if reader.is_quantized():
        dense_linears = sorted(n[: -len(".weight")] for n in reader.base_names()
                               if n.endswith(".weight") and parse_linear(n[: -len(".weight")]) is not None)
        config["quantization_config"] = quantization_config(reader.config.prepare.quant, dtype,
                                                            ["lm_head", *dense_linears])
    (out / "config.json").write_text(json.dumps(config, indent=2))
