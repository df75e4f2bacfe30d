"""The options of an export (`ExportOptions`), declared once; the CLI flags and the validation come from them.

This module imports neither onnx nor numpy, so `qosora export --help` stays fast. Each name set is a `Literal`
(its values are the choices of the flag and of `check`); the emitters in `formats`, the quantizers in `quantizers`
and the attention builders in `attention` are registered under exactly these names (each module asserts it at
import).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal, get_args

from qosora.errors import QosoraError
from qosora.options import check, option

Format = Literal["int4", "nf4", "fp16", "fp32", "trt-int4"]
FORMATS: tuple[str, ...] = get_args(Format)
Int4Scheme = Literal["sym", "sym-search", "asym", "asym-ls", "asym-ls-float", "hqq"]
INT4_SCHEMES: tuple[str, ...] = get_args(Int4Scheme)
SYMMETRIC_SCHEMES: tuple[str, ...] = ("sym", "sym-search")  # no zero point: the only int4 TensorRT takes
Attention = Literal["gqa", "standard"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)
IoDtype = Literal["float32", "float16"]
Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
BlockSize = Literal[16, 32, 64, 128, 256]
CalibrationGrid = Literal["dynamic", "static"]  # when GPTQ fits each block's grid (export/gptq.py)
CALIBRATION_GRIDS: tuple[str, ...] = get_args(CalibrationGrid)

# What the cross-field rules know about the formats.
INT4_FORMATS = ("int4", "trt-int4")  # linears requantized to blockwise int4 (--int4-scheme, --keep-principal apply)
_MS_DOMAIN_FORMATS = ("int4", "nf4")  # com.microsoft kernels already: GroupQueryAttention by default
_FIXED_DTYPE = {"fp32": "float32", "fp16": "float16"}  # the format is the graph dtype

_SCHEME_HELP = (
    "hqq: min/max scale, float zero point fitted by half-quadratic optimisation (run as uint8 zero point + block "
    "offset); asym: min/max + integer zero point (fastest decode); asym-ls / asym-ls-float: least-squares scale, "
    "integer / float zero point; sym: scale absmax/7; sym-search: MSE-searched scale "
    "(default: asym for int4 on cpu, hqq on cuda; sym-search for trt-int4)")


@dataclass(frozen=True)
class ExportOptions:
    """Every option of an export; validated once in `validate`, written into the report."""

    format: Format = option("int4", "int4: MatMulNBits (ORT CPU/CUDA); nf4: the trained NF4 residual + rank-r "
                                    "branch; fp16/fp32: dense; trt-int4: standard ONNX only, for TensorRT (symmetric "
                                    "int4: --calibrate leaves about an eighth to a quarter of its perplexity increase "
                                    "on SmolLM2 at ~10x the export time; with --keep-principal too, mostly the most "
                                    "accurate graph, at +40%% bytes; "
                                    "BENCHMARKS.md)")
    block_size: BlockSize = option(32, "int4 / trt-int4 quantization block along K")
    # None: "asym" for int4 on cpu: integer zero points run MatMulNBits alone, as fast as onnxruntime-genai's own
    # int4 graph; "hqq"'s float zero points cost a block-offset term per linear on the CPU (0.73-0.80x the decode
    # speed on SmolLM2, for -1.4 perplexity on that Q4_1-derived fixture and -0.3 on its rotated copy,
    # BENCHMARKS.md). "hqq" on cuda, whose MatMulNBits takes float zero points natively. "sym-search" for trt-int4
    # (TensorRT is symmetric): on the rotated SmolLM2 copy its perplexity increase is +5.86 to absmax / 7's +8.64
    # data-free and +0.78 to +1.12 calibrated (on the Q4_1-derived fixture absmax / 7 is 0.5 better data-free).
    int4_scheme: Int4Scheme | None = option(None, _SCHEME_HELP)
    device: Device = option("cpu", "where the graph will run: cpu (float32 I/O, int8-activation int4 kernels) or cuda "
                                   "(onnxruntime-gpu: float16 I/O and KV cache, float int4 kernels, genai_config for "
                                   "CUDA)")
    # None: 4 on cpu (int8 activations: 1.5x / 3.2x the decode speed of level 0 on SmolLM2 int4 on an AVX-512 /
    # an AVX2-only CPU, BENCHMARKS.md), 0 on cuda (the CUDA kernels are float; what onnxruntime-genai uses).
    accuracy_level: int | None = option(None, "MatMulNBits accuracy level: 0 keeps activations float, 4 quantizes "
                                              "them to int8 (default: 4 on cpu, 0 on cuda)", min=0, max=4)
    keep_principal: bool = option(False, "int4/trt-int4: requantize only the residual, keep the adapter as a float "
                                         "low-rank branch")
    quantize_lm_head: bool = option(True, "keep lm_head dense in int4 formats", flag="--no-quantize-lm-head")
    quantize_embedding: bool = option(True, "keep the embedding dense in int4", flag="--no-quantize-embedding")
    attention: Attention | None = option(None, "gqa: onnxruntime's fused GroupQueryAttention in onnxruntime-genai's "
                                               "contract (packed QKV, no position_ids, right-padded batches, shared "
                                               "KV buffer; CPU and CUDA); standard: default-domain ops, position_ids, "
                                               "left padding (any runtime, TensorRT, optimum batches) (default: gqa "
                                               "for int4 and nf4, standard for fp16/fp32/trt-int4)")
    calibrate: str | None = option(None, "JSONL text (text / prompt+completion / question+answer / messages rows) to "
                                         "calibrate int4 / trt-int4 weights with: GPTQ error compensation on the "
                                         "--int4-scheme grid, from each linear's input Hessian; `train`: the data "
                                         "the training run in DIR recorded (default: off)")
    calibration_samples: int = option(32, "calibration windows drawn (seeded) from --calibrate", min=1)
    calibration_seq_len: int = option(512, "tokens per calibration window", min=16)
    calibration_seed: int = option(0, "seed of the calibration window draw", min=0)
    calibration_grid: CalibrationGrid = option("dynamic", "GPTQ's int4 grid: dynamic (fitted to the error-updated "
                                                          "weights as the sweep reaches each block), static (each "
                                                          "block's data-free grid; only the rounding compensated)")
    io_dtype: IoDtype | None = option(None, "activations, KV cache and logits of int4/nf4/trt-int4 graphs (default: "
                                            "float32 on cpu, float16 on cuda, whose GroupQueryAttention needs it)")

    @property
    def dtype(self) -> str:
        """Activation / cache / logits dtype of the graph."""
        return self.io_dtype or _FIXED_DTYPE.get(self.format, "float16" if self.device == "cuda" else "float32")

    @property
    def fused_norms(self) -> bool:
        """RMSNorm as onnxruntime's (Skip)SimplifiedLayerNormalization, the residual Add fused in: wherever the graph
        is onnxruntime's already (contrib ops); standard ops elsewhere (fp32/fp16/trt-int4 with standard attention)."""
        return self.attention == "gqa" or self.format in _MS_DOMAIN_FORMATS

    def validate(self) -> "ExportOptions":
        """Check every field, fill the format-dependent defaults, then the rules that tie fields together."""
        check(self)
        fmt = self.format
        default_scheme = "sym-search" if fmt == "trt-int4" else ("hqq" if self.device == "cuda" else "asym")
        opts = replace(self, int4_scheme=self.int4_scheme or default_scheme,
                       attention=self.attention or ("gqa" if fmt in _MS_DOMAIN_FORMATS else "standard"),
                       accuracy_level=(0 if self.device == "cuda" else 4) if self.accuracy_level is None
                       else self.accuracy_level)
        if fmt in _FIXED_DTYPE and opts.io_dtype not in (None, _FIXED_DTYPE[fmt]):
            raise QosoraError(f"--format {fmt} fixes the graph dtype: drop --io-dtype")
        if fmt == "trt-int4" and opts.attention == "gqa":
            raise QosoraError("trt-int4 is standard ONNX only (TensorRT parses no GroupQueryAttention): use "
                              "--attention standard")
        if fmt == "trt-int4" and opts.int4_scheme not in SYMMETRIC_SCHEMES:
            raise QosoraError("trt-int4 is symmetric (TensorRT takes no int4 zero point): use --int4-scheme "
                              f"{' or '.join(SYMMETRIC_SCHEMES)}")
        if opts.device == "cuda" and opts.attention == "gqa" and opts.dtype != "float16":
            raise QosoraError("onnxruntime's CUDA GroupQueryAttention needs float16: drop --io-dtype float32, or use "
                              "--attention standard")
        if opts.calibrate is not None and fmt not in INT4_FORMATS:
            raise QosoraError(f"--calibrate applies to --format {' and '.join(INT4_FORMATS)} (the requantized weights)")
        if opts.calibration_grid != "dynamic" and opts.calibrate is None:
            raise QosoraError(f"--calibration-grid {opts.calibration_grid} applies to a calibrated export: add "
                              "--calibrate DATA.jsonl (or --calibrate train)")
        if opts.keep_principal and fmt not in INT4_FORMATS:
            raise QosoraError(f"--keep-principal applies to --format {' and '.join(INT4_FORMATS)}")
        return opts

    def to_json(self) -> dict:
        return asdict(self)
