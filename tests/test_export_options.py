"""ExportOptions as the one source of the export's names: registries, validation and CLI flags agree, and reading
the options (what `qosora export --help` does) loads no onnx."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Literal

import numpy as np
import pytest

from export_helpers import tiny_model
from qosora.errors import QosoraError
from qosora.export import options
from qosora.export.options import ATTENTIONS, FORMATS, INT4_SCHEMES, SYMMETRIC_SCHEMES, ExportOptions
from qosora.options import from_args


def _export_parser() -> argparse.ArgumentParser:
    from qosora.commands import export

    parser = argparse.ArgumentParser()
    export.add_parser(parser.add_subparsers())
    return parser


def _choices(parser: argparse.ArgumentParser, flag: str) -> tuple:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["export"]
    return tuple(next(a for a in sub._actions if flag in a.option_strings).choices)


def test_registries_are_keyed_by_the_literals():
    from qosora.export.attention import ATTENTION
    from qosora.export.formats import FORMAT_EMITTERS
    from qosora.export.quantizers import QUANTIZERS

    assert set(FORMAT_EMITTERS) == set(FORMATS) == {"int4", "nf4", "fp16", "fp32", "trt-int4"}
    assert set(QUANTIZERS) == set(INT4_SCHEMES) and "hqq" in QUANTIZERS
    assert set(ATTENTION) == set(ATTENTIONS)
    parser = _export_parser()
    assert _choices(parser, "--format") == FORMATS
    assert _choices(parser, "--int4-scheme") == INT4_SCHEMES


def test_symmetric_schemes_are_exactly_those_without_zero_points():
    """trt-int4 accepts SYMMETRIC_SCHEMES only; its DequantizeLinear has no zero point, so the list must be true."""
    from qosora.export.quantizers import quantize_int4

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    assert {s for s in INT4_SCHEMES if quantize_int4(w, 32, s).zero_points is None} == set(SYMMETRIC_SCHEMES)


def test_a_new_int4_scheme_is_one_function_and_its_name(monkeypatch, tmp_path):
    """Registered and added to the Literal, a scheme reaches validation, the CLI's choices and the export."""
    from qosora.export import quantizers
    from qosora.export.graph import build_decoder_graph
    from qosora.export.int4 import dequantize_int4, relative_error
    from qosora.export.source import HFSource

    monkeypatch.setattr(options, "Int4Scheme", Literal[(*INT4_SCHEMES, "absmax-8")])
    monkeypatch.setattr(quantizers, "QUANTIZERS", dict(quantizers.QUANTIZERS))

    @quantizers.register_int4_scheme("absmax-8")
    def _absmax_over_8(wb: np.ndarray, k: int):  # onnxruntime's symmetric rule, clips +absmax to 7/8
        return quantizers._symmetric(wb, k, quantizers._absmax(wb) / np.float32(8.0))

    opts = ExportOptions(format="int4", int4_scheme="absmax-8").validate()
    with pytest.raises(QosoraError, match="unknown --int4-scheme 'absmax-9'"):
        ExportOptions(int4_scheme="absmax-9").validate()
    parser = _export_parser()
    assert "absmax-8" in _choices(parser, "--int4-scheme")
    args = parser.parse_args(["export", "run/", "--onnx", "out/", "--int4-scheme", "absmax-8"])
    assert from_args(ExportOptions, args) == ExportOptions(int4_scheme="absmax-8")

    model = tiny_model("llama")
    built = build_decoder_graph(HFSource.from_model(model), opts, tmp_path)
    module = "model.layers.0.mlp.down_proj"
    w = dict(model.named_modules())[module].weight.detach().numpy()
    expected = relative_error(w, dequantize_int4(quantizers.quantize_int4(w, 32, "absmax-8")))
    assert built.layer_errors[module]["rel_error"] == pytest.approx(expected, rel=1e-6)
    sym = relative_error(w, dequantize_int4(quantizers.quantize_int4(w, 32, "sym")))
    assert abs(expected - sym) > 1e-4  # the export really used the new scheme


def test_cli_flags_build_the_options():
    parser = _export_parser()
    args = parser.parse_args(["export", "run/", "--onnx", "out/", "--format", "trt-int4", "--block-size", "64",
                              "--keep-principal", "--no-quantize-lm-head", "--no-quantize-embedding",
                              "--accuracy-level", "4", "--attention", "standard", "--io-dtype", "float16"])
    got = from_args(ExportOptions, args)
    assert got == ExportOptions(format="trt-int4", block_size=64, accuracy_level=4, keep_principal=True,
                                quantize_lm_head=False, quantize_embedding=False, attention="standard",
                                io_dtype="float16")
    defaults = parser.parse_args(["export", "run/", "--onnx", "out/"])
    assert from_args(ExportOptions, defaults) == ExportOptions()
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "run/", "--onnx", "out/", "--block-size", "48"])


def test_export_help_imports_no_onnx():
    code = """
import argparse, contextlib, io, sys
import qosora.commands.export as export
parser = argparse.ArgumentParser()
export.add_parser(parser.add_subparsers())
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    parser.parse_args(["export", "--help"])
assert "--int4-scheme" in out.getvalue()
print(sorted(m for m in ("onnx", "onnxruntime", "numpy", "torch") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
