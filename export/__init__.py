"""ONNX export: merged + requantized decoder graphs with a KV cache (int4, nf4, fp16/fp32, trt-int4).

    from qosora.export import export_onnx, ExportOptions
    report = export_onnx("run/", "out/", options=ExportOptions(format="int4", block_size=32))

Modules, in pipeline order: options (ExportOptions, no onnx) -> spec (inputs/outputs, shape parameters) -> source
(where tensors come from) -> int4 (the int4 weight format) -> quantizers (int4 schemes) -> writer (streamed external
data) -> linear (node builders of a linear) -> formats (one registered emitter per format) -> attention -> graph
(the decoder) -> check (parity vs PyTorch) -> genai (genai_config.json, TensorRT shape profile) -> api (atomic
directory, report).

`import qosora.export` loads only `options`; `export_onnx` (onnx, numpy) is imported on first use, so the CLI's
`--help` and option parsing stay light.
"""

from qosora.export.options import FORMATS, ExportOptions

__all__ = ["export_onnx", "ExportOptions", "FORMATS"]


def __getattr__(name: str):
    if name == "export_onnx":
        from qosora.export.api import export_onnx

        return export_onnx
    raise AttributeError(f"module 'qosora.export' has no attribute {name!r}")
