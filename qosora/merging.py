"""`qosora merge`: a plain Hugging Face checkpoint whose adapted weights are the function that was trained.

    W_merged = deq(NF4(W_res)) + B A          (B A: the adapter's dense delta, fp32)

Merging into the *original* 16-bit W, or requantizing a merged NF4 weight in place (PEFT's 4-bit merge), would
change the function (peft#1080, #2105, #2321). Streamed: one module in fp32 at a time, shards flushed as they fill.
Every module's factors and residual are checked (shapes, NaN/Inf) before anything is written, and every merged
weight is checked again after the cast to `dtype` (a finite adapter can still overflow float16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qosora.architectures import layer_index
from qosora.files import atomic_directory, copy_side_files
from qosora.prepared import PreparedReader
from qosora.shards import ShardedWriter
from qosora.errors import QosoraError
from qosora.precision import all_finite
from qosora.nf4 import DTYPES


def merge(
    directory: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_bytes: int = 512 << 20,
) -> Path:
    """Write `out_dir`, loadable by `AutoModelForCausalLM.from_pretrained` with no qosora code."""
    if dtype not in DTYPES:
        raise QosoraError(f"unknown --dtype {dtype!r}: use float32, bfloat16 or float16")
    torch_dtype = DTYPES[dtype]
    reader = PreparedReader(directory)
    reader.check()
    modules = set(reader.modules)
    names = sorted([*reader.base_names(), *(f"{m}.weight" for m in modules)], key=lambda n: (layer_index(n), n))
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[reader.directory]) as tmp:
        writer = ShardedWriter(tmp, "model", max_shard_bytes)
        for name in tqdm(names, desc="merge", unit="tensor", disable=not progress):
            module = name[: -len(".weight")]
            if name.endswith(".weight") and module in modules:
                t = reader.adapted(module).merged().to(torch_dtype)
                if not all_finite(t):
                    raise QosoraError(f"module {module}: the merged weight overflows {dtype} (NaN/Inf after the cast): "
                                      "use --dtype float32 or bfloat16")
            else:
                t = reader.base_tensor(name)
                t = t.to(torch_dtype) if t.is_floating_point() else t
            writer.add(name, t)
        writer.close()
        copy_side_files(reader.directory, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)
