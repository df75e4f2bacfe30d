"""A small ONNX graph writer that streams initializers to an external data file as they are made.

`onnx.save(..., save_as_external_data=True)` needs every tensor in memory first; here each initializer's bytes go
to `model.onnx.data` the moment it is added and the TensorProto keeps only (location, offset, length), so the
exporter's memory is one layer's weights, not the model's.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# numpy dtype name -> ONNX element type; the rest of the exporter names dtypes the numpy way.
_ONNX_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "uint8": TensorProto.UINT8,
    "int8": TensorProto.INT8,
    "bool": TensorProto.BOOL,
}
INT4 = TensorProto.INT4  # two signed 4-bit values a byte, low nibble first; numpy has no such dtype

OPSET = 21  # blockwise DequantizeLinear (int4, block_size) needs 21
IR_VERSION = 10  # int4 tensors need IR >= 10
MS_DOMAIN = "com.microsoft"

# External data: tensors of at least _PAGE_ALIGNED_FROM bytes start on a page (they can be mmapped), the rest on
# _ALIGN bytes; tensors of at most `inline_limit` bytes stay inside model.onnx.
_PAGE, _PAGE_ALIGNED_FROM, _ALIGN = 4096, 1 << 20, 64
_INLINE_LIMIT = 1024


def onnx_dtype(dtype) -> int:
    """The ONNX element type of a numpy dtype (or its name: "float32", "bool", ...)."""
    return _ONNX_DTYPES[np.dtype(dtype).name]


class GraphWriter:
    """Collects nodes; writes initializers to `data_path` immediately (those under `inline_limit` bytes inline)."""

    def __init__(self, data_path: Path, inline_limit: int = _INLINE_LIMIT):
        self.data_path = Path(data_path)
        self._file = open(self.data_path, "wb")
        self._offset = 0
        self.inline_limit = inline_limit
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._scope: list[str] = []
        self._counter = 0
        self.bytes_by_kind: dict[str, int] = {}
        self.op_counts: dict[str, int] = {}

    # -- initializers ---------------------------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray, kind: str = "other") -> str:
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # (ascontiguousarray makes a scalar 1-d)
        # A byte view, not array.tobytes(): a vocabulary-sized table is written without a second copy.
        raw = memoryview(array.reshape(-1)).cast("B") if array.size else b""
        return self.raw_initializer(name, onnx_dtype(array.dtype), array.shape, raw, kind)

    def raw_initializer(self, name: str, data_type: int, dims, raw, kind: str = "other") -> str:
        """An initializer from raw little-endian bytes or a byte view (used for packed INT4 tensors)."""
        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        t = TensorProto(name=name, data_type=data_type, dims=[int(d) for d in dims])
        if len(raw) <= self.inline_limit:
            t.raw_data = bytes(raw)
        else:
            align = _PAGE if len(raw) >= _PAGE_ALIGNED_FROM else _ALIGN
            pad = -self._offset % align
            if pad:
                self._file.write(b"\0" * pad)
                self._offset += pad
            self._file.write(raw)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_path.name), ("offset", str(self._offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
            self._offset += len(raw)
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + len(raw)
        self.initializers.append(t)
        return name

    def const(self, array, dtype=None) -> str:
        """A small anonymous constant (shapes, axes, scalars)."""
        a = np.asarray(array, dtype=dtype)
        self._counter += 1
        return self.initializer(f"/const_{self._counter}", a)

    # -- nodes ----------------------------------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, outputs: list[str] | None = None,
           domain: str = "", **attrs):
        """Add a node; returns its output name (or list of names when n_out > 1)."""
        self._counter += 1
        prefix = "/" + "/".join(self._scope) if self._scope else ""
        node_name = f"{prefix}/{op_type}_{self._counter}"
        if outputs is None:
            outputs = [f"{node_name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        key = f"{domain}::{op_type}" if domain else op_type
        self.op_counts[key] = self.op_counts.get(key, 0) + 1
        return outputs[0] if len(outputs) == 1 else outputs

    def cast(self, x: str, to: str, src_dtype: str) -> str:
        """Cast x (of numpy dtype name src_dtype) to `to`; no node when they agree."""
        if src_dtype == to:
            return x
        return self.op("Cast", [x], to=onnx_dtype(to))

    # -- finish ---------------------------------------------------------------------------------------------
    def finish(self, inputs, outputs, model_path: Path, *, doc: str = "", metadata: dict | None = None,
               uses_ms_domain: bool = False) -> onnx.ModelProto:
        self._file.close()
        graph = helper.make_graph(self.nodes, "qosora_decoder", inputs, outputs, initializer=self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qosora", doc_string=doc)
        model.ir_version = IR_VERSION
        for k, v in (metadata or {}).items():
            model.metadata_props.add(key=k, value=str(v))
        onnx.save_model(model, str(model_path))
        return model

    @property
    def uses_ms_domain(self) -> bool:
        return any(n.domain == MS_DOMAIN for n in self.nodes)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def value_info(name: str, dtype: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape))
