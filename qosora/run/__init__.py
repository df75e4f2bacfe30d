"""The deploy path: run an exported directory with onnxruntime, numpy and `tokenizers` only (no torch import).

    from qosora.run import OnnxCausalLM, generate
    text = generate("out/", "The capital of France is", max_new_tokens=32)
"""

from qosora.run.decoder import OnnxCausalLM, session_options
from qosora.run.generate import GenerationResult, generate, load_tokenizer

__all__ = ["OnnxCausalLM", "GenerationResult", "generate", "load_tokenizer", "session_options"]
