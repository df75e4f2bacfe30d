"""ONNX export: merged + requantized decoder graphs with a KV cache (int4, nf4, fp16/fp32, trt-int4).

    from qosora.export import export_onnx, ExportOptions
    report = export_onnx("run/", "out/", options=ExportOptions(format="int4", block_size=32))

Modules, in pipeline order: spec (inputs/outputs, shape parameters) -> source (where tensors come from) ->
quantizers (int4) -> formats (one linear per format) -> graph (the decoder) -> writer (streamed external data) ->
check (parity vs PyTorch) -> genai (genai_config.json, TensorRT shape profile) -> api (atomic directory, report).
"""

from qosora.export.api import export_onnx
from qosora.export.formats import FORMATS, ExportOptions

__all__ = ["export_onnx", "ExportOptions", "FORMATS"]
