"""`LinearEmitter`: the node builders an export's linear layers are made of, and the requantization errors it records.

A format (`formats`) is registered as a function `emit(linear, x, module) -> y` built from these pieces:

    int4_table / apply_int4   MatMulNBits(x, int4 W) (+ the block-offset term of float zero points)
    dequantized_matmul        MatMul(x, DequantizeLinear(int4 W^T)), standard ONNX (TensorRT)
    lowrank_branch            (x A^T) B^T, the adapter kept in float
    record / quantize_merged  ||W - W_hat||_F / ||W||_F of what was written, for the export report

`linear(x, module)` runs the format's emitter and adds the bias; `linear.fused(x, modules, name)` builds several
linears that read the same x (q/k/v, gate/up), as one kernel where the format registered a fused emitter, and
`linear.packed` the same with their outputs left concatenated (GroupQueryAttention's packed QKV).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from qosora.errors import QosoraError
from qosora.export.int4 import Int4Blocks, int4_relative_error, pack_low_first, relative_error, split_float_zero_points
from qosora.export.options import ExportOptions
from qosora.export.quantizers import quantize_int4
from qosora.export.source import WeightSource
from qosora.export.writer import INT4, MS_DOMAIN, GraphWriter

EmitLinear = Callable[["LinearEmitter", str, str], str]  # (linear, x, module) -> x W^T, bias not included
# (linear, x, modules, name, pack) -> the modules' outputs, or [one packed output] when pack and the kernel is fused
EmitFused = Callable[["LinearEmitter", str, list[str], str, bool], list[str]]


@dataclass
class Int4Table:
    """The initializer names of one int4 weight [N, K] as MatMulNBits reads it; a tied lm_head reuses the
    embedding's."""

    q: Int4Blocks
    data: str  # uint8 [N, K_pad / bs, bs / 2]
    scales: str  # [N * K_pad / bs], graph dtype
    zero_points: str | None  # uint8 [N, ceil(nb / 2)], packed; or float [N * nb] (CUDA)
    offsets_t: str | None  # [nb, N] block offsets of float zero points, graph dtype


class LinearEmitter:
    """Builds the linears of one export in the format whose emitters it is given; records each one's error."""

    def __init__(self, w: GraphWriter, src: WeightSource, opts: ExportOptions, emit: EmitLinear,
                 emit_fused: EmitFused | None = None, hessians: Callable[[str], object] | None = None):
        self.w, self.src, self.opts, self.dtype = w, src, opts, opts.dtype
        self.hessians = hessians  # module -> its input Hessian (calibration), or None: data-free quantizers
        self._inverse: tuple[object, object] | None = None  # (H, its factorisation): q/k/v and gate/up share one
        self.errors: dict[str, dict] = {}
        self._emit, self._emit_fused = emit, emit_fused
        self._block_sums: dict[tuple[str, int], str] = {}

    def __call__(self, x: str, module: str) -> str:
        y = self._emit(self, x, module)
        bias = self.src.bias(module)
        if bias is not None:
            y = self.w.op("Add", [y, self.w.initializer(module + ".bias", bias.astype(self.dtype), "bias")])
        return y

    def fused(self, x: str, modules: list[str], name: str) -> list[str]:
        """The outputs of several linears reading the same x; one linear per module unless the format fuses."""
        if self._emit_fused is None:
            return [self(x, m) for m in modules]
        return self._emit_fused(self, x, modules, name, False)

    def packed(self, x: str, modules: list[str], name: str) -> str:
        """The same linears' outputs concatenated along the last axis [.., N_1 + N_2 + ..] (GroupQueryAttention's
        packed QKV input): the fused kernel's output itself where the format fuses, else a Concat."""
        outputs = (self._emit_fused(self, x, modules, name, True) if self._emit_fused is not None
                   else [self(x, m) for m in modules])
        return outputs[0] if len(outputs) == 1 else self.w.op("Concat", outputs, axis=-1)

    # -- int4 -----------------------------------------------------------------------------------------------
    def int4(self, weight: np.ndarray, module: str | None = None, note: dict | None = None) -> Int4Blocks:
        """The --int4-scheme quantizer; with calibration data and a module that has an input Hessian, GPTQ on the
        same grid (`gptq.gptq_quantize`), its output errors (compensated and data-free) added to `note`."""
        h = self.hessians(module) if self.hessians is not None and module is not None else None
        if h is None:
            return quantize_int4(weight, self.opts.block_size, self.opts.int4_scheme)
        import torch

        from qosora.export.gptq import gptq_quantize, inverse_hessian

        if self._inverse is None or self._inverse[0] is not h:
            self._inverse = (h, inverse_hessian(h))
        r = gptq_quantize(torch.from_numpy(weight), self._inverse[1], self.opts.block_size, self.opts.int4_scheme,
                          grid=self.opts.calibration_grid)
        if note is not None:
            note.update(output_error=r.output_error, output_error_uncalibrated=r.rtn_output_error)
        return r.q

    def quantize_merged(self, module: str, **note) -> Int4Blocks:
        """int4 of the merged weight, its requantization error recorded."""
        weight = self.src.dense(module)
        q = self.int4(weight, module, note)
        self.errors[module] = {"shape": list(weight.shape), "rel_error": int4_relative_error(weight, q), **note}
        return q

    def int4_table(self, name: str, q: Int4Blocks, gather: bool = False) -> Int4Table:
        """Write q's initializers as MatMulNBits reads them: B uint8 [N, K_pad/bs, bs/2] (low nibble first), scales
        [N * K_pad/bs], zero points uint8 [N, ceil(nb/2)] packed (asymmetric only; absent means 8).

        Float zero points: on CUDA as MatMulNBits' own float zero points [N * nb] (its CUDA kernels take them at
        full speed); on the CPU, whose float-zero-point path is slow (8 tok/s against 94 on SmolLM2, BENCHMARKS.md),
        and for a table GatherBlockQuantized reads (`gather`: uint8 zero points only), split
        (`split_float_zero_points`) into uint8 ones and block offsets, stored as [nb, N]."""
        n, bs = q.codes.shape[0], q.block_size
        zero_points, offsets = q.zero_points, None
        init = self.w.initializer
        float_zp = zero_points is not None and zero_points.dtype != np.uint8
        if float_zp and (gather or self.opts.device != "cuda"):
            zero_points, offsets = split_float_zero_points(q)
            float_zp = False
        if zero_points is None:
            zp = None
        elif float_zp:
            zp = init(name + ".zeros", zero_points.reshape(-1).astype(self.dtype), "scales")
        else:
            zp = init(name + ".qzeros", pack_low_first(zero_points), "scales")
        return Int4Table(
            q, init(name + ".qweight", pack_low_first(q.codes).reshape(n, -1, bs // 2), "int4"),
            init(name + ".scales", q.scales.reshape(-1).astype(self.dtype), "scales"), zp,
            None if offsets is None else init(name + ".block_offsets_t",
                                              np.ascontiguousarray(offsets.T).astype(self.dtype), "scales"))

    def matmul_nbits(self, x: str, name: str, q: Int4Blocks) -> str:
        return self.apply_int4(x, self.int4_table(name, q))

    def apply_int4(self, x: str, t: Int4Table) -> str:
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

    def dequantized_matmul(self, x: str, name: str, q: Int4Blocks) -> str:
        return self.w.op("MatMul", [x, self.dequantize_linear(name, q)])

    def dequantize_linear(self, name: str, q: Int4Blocks) -> str:
        """Standard-ONNX int4: DequantizeLinear(int4 W^T [K, N], scale [K/bs, N], axis=0, block_size=bs) -> float [K, N].

        The form TensorRT 10 parses for weight-only int4 (symmetric, no zero point); ORT's CPU optimizer fuses
        it with the following MatMul into MatMulNBits. Blockwise DequantizeLinear needs bs to divide K.
        """
        if q.k % q.block_size:
            raise QosoraError(
                f"{name}: trt-int4 needs the block size to divide K={q.k} (TensorRT's blockwise DequantizeLinear); "
                f"pick --block-size {max(b for b in (16, 32, 64) if q.k % b == 0) if q.k % 16 == 0 else 16}"
            )
        signed_t = (q.codes[:, : q.k].astype(np.int16) - 8).T  # [K, N], -8..7
        raw = pack_low_first((signed_t & 0x0F).astype(np.uint8).reshape(-1)).tobytes()
        qw = self.w.raw_initializer(name + ".qweight_t", INT4, signed_t.shape, raw, "int4")
        scale = self.w.initializer(name + ".scales_t", np.ascontiguousarray(q.scales.T).astype(self.dtype), "scales")
        return self.w.op("DequantizeLinear", [qw, scale], axis=0, block_size=q.block_size)

    # -- float pieces ---------------------------------------------------------------------------------------
    def lowrank_branch(self, x: str, module: str, b: np.ndarray, a: np.ndarray) -> str:
        """x [.., K] -> (x A^T) B^T [.., N], A [r, K] and B [N, r] in the graph dtype."""
        at = self.w.initializer(module + ".lora_A_t", np.ascontiguousarray(a.T).astype(self.dtype), "lowrank")
        bt = self.w.initializer(module + ".lora_B_t", np.ascontiguousarray(b.T).astype(self.dtype), "lowrank")
        return self.w.op("MatMul", [self.w.op("MatMul", [x, at]), bt])

    def record(self, module: str, ref: np.ndarray, approx: np.ndarray, kept_rank: int = 0) -> None:
        entry = {"shape": list(ref.shape), "rel_error": relative_error(ref, approx)}
        if kept_rank:
            entry["kept_rank"] = int(kept_rank)
        self.errors[module] = entry
