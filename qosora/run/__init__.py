"""The deploy path: run an exported directory with onnxruntime, numpy and `tokenizers` only (no torch import).

    from qosora.run import Generator, GenerationOptions, generate
    text = generate("out/", "The capital of France is", max_new_tokens=32).text
    g = Generator("out/", provider="auto", threads=4)
    results = g.generate(["w1 w2", [{"role": "user", "content": "hi"}]], GenerationOptions(top_p=0.9), batch_size=2)

The names load on first use (PEP 562), so `qosora generate --help` reads `qosora.run.options` without importing
onnxruntime.
"""

import importlib

_HOME = {
    "ChatTemplate": "chat", "DecodeBatch": "decoder", "OnnxCausalLM": "decoder", "StepTimes": "decoder",
    "GenerationResult": "generator", "Generator": "generator", "generate": "generator", "load_tokenizer": "generator",
    "GenerationOptions": "options", "RuntimeOptions": "options", "GraphIO": "session", "session_options": "session",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'qosora.run' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qosora.run.{_HOME[name]}"), name)
