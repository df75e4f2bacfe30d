"""Export formats: how one linear layer (and the embedding / lm_head) becomes ONNX nodes.

| format   | adapted linear y = x W^T (+ b)                                       | domain        |
|----------|----------------------------------------------------------------------|---------------|
| fp32     | MatMul(x, W_merged^T)                                                | default       |
| fp16     | same, weights and activations float16                               | default       |
| int4     | MatMulNBits(x, int4(W_merged)) (+ block offsets of float zero points) | com.microsoft |
|          | --keep-principal: MatMulNBits(x, int4(W_res)) + (x A^T) B^T          |               |
| nf4      | MatMulBnb4(x, NF4(W_res)) + (x A^T) B^T   (the trained function)     | com.microsoft |
| trt-int4 | MatMul(x, DequantizeLinear(int4 W^T [K, N], scale [K/bs, N], axis 0)) | default only  |

W_merged = deq(NF4(W_res)) + B A is requantized once, here, and the error ||W_merged - deq(q(.))||_F / ||W_merged||_F
of every linear is recorded for the export report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
from onnx import TensorProto

from qosora.export.quantizers import (INT4_SCHEMES, Int4Blocks, Int4Scheme, concat_rows, dequantize_int4,
                                      int4_relative_error, pack_low_first, quantize_int4, relative_error,
                                      split_float_zero_points)
from qosora.export.source import WeightSource
from qosora.export.writer import MS_DOMAIN, GraphWriter
from qosora.errors import QosoraError

Format = Literal["int4", "nf4", "fp16", "fp32", "trt-int4"]
FORMATS: tuple[str, ...] = ("int4", "nf4", "fp16", "fp32", "trt-int4")
_NF4 = 1  # MatMulBnb4 quant_type


@dataclass(frozen=True)
class ExportOptions:
    """Every option of an export; validated once in `validate`, written into the report."""

    format: Format = "int4"
    block_size: int = 32  # int4 / trt-int4 quantization block along K
    # None: "hqq" for int4 (float zero points, ties onnxruntime's HQQ in perplexity on SmolLM2 at block 32 and 64;
    # "asym" drops the block-offset term and decodes fastest), "sym" for trt-int4 (TensorRT is symmetric;
    # "sym-search" clips NF4 outliers the same way and measured worse perplexity than absmax / 7).
    int4_scheme: Int4Scheme | None = None
    accuracy_level: int = 0  # MatMulNBits: 0 = A in float, 4 = A quantized to int8 (faster on CPU)
    keep_principal: bool = False  # int4 / trt-int4: quantize only W_res, keep B A as a float branch
    quantize_lm_head: bool = True  # int4 / trt-int4
    quantize_embedding: bool = True  # int4 only (GatherBlockQuantized)
    # "gqa": onnxruntime's fused GroupQueryAttention (rotary inside; CPU and CUDA); "standard": default-domain ops
    # only (any runtime, TensorRT). None: gqa for the com.microsoft formats (int4, nf4), standard otherwise.
    attention: Literal["gqa", "standard"] | None = None
    # Activations, KV cache and logits. None: float16 for fp16, float32 otherwise. onnxruntime-gpu's
    # GroupQueryAttention runs only in float16/bfloat16, so int4/nf4 graphs for CUDA want io_dtype="float16".
    io_dtype: Literal["float32", "float16"] | None = None

    @property
    def dtype(self) -> str:
        """Activation / cache / logits dtype of the graph."""
        return self.io_dtype or ("float16" if self.format == "fp16" else "float32")

    def validate(self) -> "ExportOptions":
        if self.format not in FORMATS:
            raise QosoraError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.int4_scheme is None:
            return replace(self, int4_scheme="sym" if self.format == "trt-int4" else "hqq").validate()
        if self.attention is None:
            return replace(self, attention="gqa" if self.format in ("int4", "nf4") else "standard").validate()
        if self.io_dtype not in (None, "float32", "float16"):
            raise QosoraError(f"unknown --io-dtype {self.io_dtype!r}; choose float32 or float16")
        if self.format in ("fp16", "fp32") and self.io_dtype not in (None, "float" + self.format[2:]):
            raise QosoraError(f"--format {self.format} fixes the graph dtype: drop --io-dtype")
        if self.attention not in ("gqa", "standard"):
            raise QosoraError(f"unknown --attention {self.attention!r}; choose gqa or standard")
        if self.attention == "gqa" and self.format == "trt-int4":
            raise QosoraError("trt-int4 is standard ONNX only (TensorRT parses no GroupQueryAttention): use --attention standard")
        if self.int4_scheme not in INT4_SCHEMES:
            raise QosoraError(f"unknown int4 scheme {self.int4_scheme!r}; choose one of {', '.join(INT4_SCHEMES)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise QosoraError(f"--block-size {self.block_size}: use a power of two between 16 and 256")
        if self.format == "trt-int4" and self.int4_scheme.startswith("asym"):
            raise QosoraError("trt-int4 is symmetric (TensorRT takes no int4 zero point): use --int4-scheme sym-search")
        if self.keep_principal and self.format not in ("int4", "trt-int4"):
            raise QosoraError("--keep-principal applies to --format int4 and trt-int4")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise QosoraError(f"--accuracy-level {self.accuracy_level}: use 0 (unset), 1, 2, 3 or 4 (int8)")
        return self

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Int4Table:
    """The initializer names of one int4 weight [N, K]; a tied lm_head reuses the embedding's."""

    q: Int4Blocks
    data: str  # uint8 [N, K_pad / bs, bs / 2]
    scales: str
    zero_points: str | None  # packed uint8
    offsets_t: str | None  # [nb, N] block offsets of float zero points


class LinearEmitter:
    """Builds one linear's nodes for the chosen format and records its requantization error."""

    def __init__(self, w: GraphWriter, src: WeightSource, opts: ExportOptions):
        self.w, self.src, self.opts, self.dtype = w, src, opts, opts.dtype
        self.errors: dict[str, dict] = {}
        self._block_sums: dict[tuple[str, int], str] = {}

    def __call__(self, x: str, module: str) -> str:
        fmt, adapted = self.opts.format, self.src.is_adapted(module)
        if fmt == "nf4" and adapted:
            y = self._nf4_with_branch(x, module)
        elif fmt in ("int4", "trt-int4"):
            if self.opts.keep_principal and adapted:
                res = self.src.residual_dense(module)
                b, a = self.src.lowrank(module)
                q = self._int4(res, module)
                merged = res + b @ a
                self._record(module, merged, dequantize_int4(q) + b @ a, kept_rank=a.shape[0])
                del res, merged
                y = self._int4_node(x, module, q)
                y = self.w.op("Add", [y, self._lowrank_branch(x, module, b, a)])
            else:
                y = self._int4_node(x, module, self._quantize_merged(module))
        else:  # fp32 / fp16, and non-adapted linears of an nf4 export
            weight = self.src.dense(module)
            wt = weight.T.astype(self.dtype)
            self._record(module, weight, wt.T.astype(np.float32, copy=False))
            y = self.w.op("MatMul", [x, self.w.initializer(module + ".weight_t", wt, "dense")])
        bias = self.src.bias(module)
        if bias is not None:
            y = self.w.op("Add", [y, self.w.initializer(module + ".bias", bias.astype(self.dtype), "bias")])
        return y

    def fused(self, x: str, modules: list[str], name: str) -> list[str]:
        """Several linears reading the same x (q/k/v, gate/up) as one int4 MatMulNBits and a Split: one kernel
        launch instead of three, and the block-offset term of float zero points computed once.

            x ──> MatMulNBits([W_q; W_k; W_v]) (+ [b_q; b_k; b_v]) ──> Split(N_q, N_k, N_v) ──> q, k, v

        Rows are quantized one module at a time (blocks run along K), so the codes equal the unfused export's.
        Other formats, and --keep-principal, emit one linear per module.
        """
        if self.opts.format != "int4" or self.opts.keep_principal:
            return [self(x, m) for m in modules]
        parts = [self._quantize_merged(m, fused=name) for m in modules]
        y = self.matmul_nbits(x, name, concat_rows(parts))
        biases = [self.src.bias(m) for m in modules]
        if any(b is not None for b in biases):
            full = [np.zeros(p.codes.shape[0], np.float32) if b is None else b for p, b in zip(parts, biases)]
            y = self.w.op("Add", [y, self.w.initializer(name + ".bias", np.concatenate(full).astype(self.dtype), "bias")])
        sizes = [p.codes.shape[0] for p in parts]
        return self.w.op("Split", [y, self.w.const(sizes, np.int64)], len(sizes), axis=-1)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _quantize_merged(self, module: str, **note) -> Int4Blocks:
        """int4 of the merged weight, its requantization error recorded."""
        weight = self.src.dense(module)
        q = self._int4(weight, module)
        self.errors[module] = {"shape": list(weight.shape), "rel_error": int4_relative_error(weight, q), **note}
        return q

    def _int4(self, weight: np.ndarray, module: str) -> Int4Blocks:
        k = weight.shape[1]
        if self.opts.format == "trt-int4" and k % self.opts.block_size:
            raise QosoraError(
                f"{module}: trt-int4 needs the block size to divide K={k} (TensorRT's blockwise DequantizeLinear); "
                f"pick --block-size {max(b for b in (16, 32, 64) if k % b == 0) if k % 16 == 0 else 16}"
            )
        return quantize_int4(weight, self.opts.block_size, self.opts.int4_scheme)

    def _int4_node(self, x: str, name: str, q: Int4Blocks) -> str:
        if self.opts.format == "trt-int4":
            return self.w.op("MatMul", [x, self.dequantize_linear(name, q)])
        return self.matmul_nbits(x, name, q)

    def int4_table(self, name: str, q: Int4Blocks) -> "Int4Table":
        """Write q's initializers as MatMulNBits reads them: B uint8 [N, K_pad/bs, bs/2] (low nibble first), scales
        [N * K_pad/bs], zero points uint8 [N, ceil(nb/2)] packed (asymmetric only; absent means 8). Float zero
        points are split (`split_float_zero_points`) into uint8 ones and block offsets, stored as [nb, N]."""
        n, bs = q.codes.shape[0], q.block_size
        zero_points, offsets = q.zero_points, None
        if zero_points is not None and zero_points.dtype != np.uint8:
            zero_points, offsets = split_float_zero_points(q)
        init = self.w.initializer
        return Int4Table(
            q, init(name + ".qweight", pack_low_first(q.codes).reshape(n, -1, bs // 2), "int4"),
            init(name + ".scales", q.scales.reshape(-1).astype(self.dtype), "scales"),
            None if zero_points is None else init(name + ".qzeros", pack_low_first(zero_points), "scales"),
            None if offsets is None else init(name + ".block_offsets_t",
                                              np.ascontiguousarray(offsets.T).astype(self.dtype), "scales"))

    def matmul_nbits(self, x: str, name: str, q: Int4Blocks) -> str:
        return self.apply_int4(x, self.int4_table(name, q))

    def apply_int4(self, x: str, t: "Int4Table") -> str:
        """x W^T for an int4 table; float zero points run on the uint8 kernel plus a block-offset term:

            x ──> MatMulNBits(codes, scales, round(z)) ───────────────────┐
            │                                                           Add ──> y
            └──> block sums [.., nb] ──> MatMul(offsets^T [nb, N]) ─────┘
        """
        q = t.q
        inputs = [x, t.data, t.scales] + ([t.zero_points] if t.zero_points else [])
        y = self.w.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=q.k, N=q.codes.shape[0], bits=4,
                      block_size=q.block_size, accuracy_level=self.opts.accuracy_level)
        if t.offsets_t is None:
            return y
        return self.w.op("Add", [y, self.w.op("MatMul", [self.block_sums(x, q.k, q.block_size), t.offsets_t])])

    def block_sums(self, x: str, k: int, block_size: int) -> str:
        """x [B, S, K] -> [B, S, ceil(K / bs)]: the sum of x over each quantization block (zero-padded), built
        once per input (q/k/v and gate/up share theirs)."""
        key = (x, block_size)
        if key not in self._block_sums:
            nb = -(-k // block_size)
            padded = x
            if nb * block_size != k:
                padded = self.w.op("Pad", [x, self.w.const([0, 0, 0, 0, 0, nb * block_size - k], np.int64)])
            blocks = self.w.op("Reshape", [padded, self.w.const([0, 0, nb, block_size], np.int64)])
            self._block_sums[key] = self.w.op("ReduceSum", [blocks, self.w.const([-1], np.int64)], keepdims=0)
        return self._block_sums[key]

    def dequantize_linear(self, name: str, q: Int4Blocks) -> str:
        """Standard-ONNX int4: DequantizeLinear(int4 W^T [K, N], scale [K/bs, N], axis=0, block_size=bs) -> float [K, N].

        The form TensorRT 10 parses for weight-only int4 (symmetric, no zero point); ORT's CPU optimizer fuses
        it with the following MatMul into MatMulNBits.
        """
        signed_t = (q.codes[:, : q.k].astype(np.int16) - 8).T  # [K, N], -8..7
        raw = pack_low_first((signed_t & 0x0F).astype(np.uint8).reshape(-1)).tobytes()
        qw = self.w.raw_initializer(name + ".qweight_t", TensorProto.INT4, signed_t.shape, raw, "int4")
        scale = self.w.initializer(name + ".scales_t", np.ascontiguousarray(q.scales.T).astype(self.dtype), "scales")
        return self.w.op("DequantizeLinear", [qw, scale], axis=0, block_size=q.block_size)

    def _nf4_with_branch(self, x: str, module: str) -> str:
        """
            x ──> MatMulBnb4(NF4 W_res, absmax) ─────────────┐
            │                                                 Add ──> y
            └──> MatMul(A^T [K, r]) ──> MatMul(B^T [r, N]) ──┘
        """
        p = self.src.nf4(module)
        n, k = p.shape
        y = self.w.op("MatMulBnb4", [
            x,
            self.w.initializer(module + ".nf4", np.ascontiguousarray(p.data, dtype=np.uint8), "nf4"),
            self.w.initializer(module + ".absmax", p.absmax.astype(self.dtype), "scales"),
        ], domain=MS_DOMAIN, K=k, N=n, block_size=p.blocksize, quant_type=_NF4)
        b, a = self.src.lowrank(module)
        self.errors[module] = {"shape": [n, k], "rel_error": 0.0, "kept_rank": int(a.shape[0]), "note": "NF4 kept"}
        return self.w.op("Add", [y, self._lowrank_branch(x, module, b, a)])

    def _lowrank_branch(self, x: str, module: str, b: np.ndarray, a: np.ndarray) -> str:
        at = self.w.initializer(module + ".lora_A_t", np.ascontiguousarray(a.T).astype(self.dtype), "lowrank")
        bt = self.w.initializer(module + ".lora_B_t", np.ascontiguousarray(b.T).astype(self.dtype), "lowrank")
        return self.w.op("MatMul", [self.w.op("MatMul", [x, at]), bt])

    def _record(self, module: str, ref: np.ndarray, approx: np.ndarray, kept_rank: int = 0) -> None:
        entry = {"shape": list(ref.shape), "rel_error": relative_error(ref, approx)}
        if kept_rank:
            entry["kept_rank"] = int(kept_rank)
        self.errors[module] = entry
