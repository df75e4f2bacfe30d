"""genai_config.json: what onnxruntime-genai needs to run the exported directory.

GroupQueryAttention graphs take one cache buffer for past and present (`past_present_share_buffer`, preallocated
to max_length, as onnxruntime-genai's own builder writes them); standard-attention graphs concatenate the cache
(present = past + new) and take position_ids. `--device cuda` asks for the CUDA execution provider.
"""

from __future__ import annotations

from qosora.export.spec import DecoderSpec, graph_inputs


def genai_config(spec: DecoderSpec, hf_config: dict, generation_config: dict, context_length: int,
                 attention: str = "standard", device: str = "cpu") -> dict:
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if attention == "standard":
        inputs["position_ids"] = "position_ids"
    inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    providers = [{"cuda": {}}] if device == "cuda" else []
    eos = generation_config.get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is None or eos == []:
        eos = -1  # no EOS: onnxruntime-genai refuses null and -1 alike, the latter with a message that says why
    pad = generation_config.get("pad_token_id", hf_config.get("pad_token_id"))
    bos = hf_config.get("bos_token_id")
    return {
        "model": {
            **({"bos_token_id": bos} if bos is not None else {}),  # onnxruntime-genai refuses null ids
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": "model.onnx",
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": attention == "gqa",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def tensorrt_shape_profile(spec: DecoderSpec, max_batch: int, max_context: int) -> dict:
    """min / opt / max shapes of every dynamic input for one TensorRT optimization profile (decode-optimal),
    plus the same as trtexec flags."""
    def dims(name: str, b: int, s: int, p: int) -> list[int]:
        if name in ("input_ids", "position_ids"):
            return [b, s]
        if name == "attention_mask":
            return [b, p + s]
        return [b, spec.num_kv_heads, p, spec.head_dim]

    names = [t.name for t in graph_inputs(spec, "float32")]
    points = {"min": (1, 1, 0), "opt": (1, 1, max_context // 2), "max": (max_batch, max_context, max_context - 1)}
    profile = {n: {k: dims(n, *v) for k, v in points.items()} for n in names}
    # max: prefill of max_context tokens (past 0) and decode at past max_context - 1 are both inside the box,
    # but attention_mask's max must cover past + seq: clamp it to the context.
    for n in names:
        if n == "attention_mask":
            profile[n]["max"] = [max_batch, max_context]
    flags = {k: ",".join(f"{n}:{'x'.join(map(str, profile[n][k]))}" for n in names) for k in points}
    return {
        "profile": profile,
        "trtexec": f"--minShapes={flags['min']} --optShapes={flags['opt']} --maxShapes={flags['max']}",
        "max_batch": max_batch,
        "max_context": max_context,
    }
