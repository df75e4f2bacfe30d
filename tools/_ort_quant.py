"""onnxruntime's own weight-only int4 quantizers (matmul_nbits_quantizer) applied to one of our fp32 graphs: the
anchors bench_export compares our int4 against.

    python tools/_ort_quant.py SRC_DIR OUT_DIR --kind rtn-asym|rtn-sym|hqq|k-quant|gptq --block-size 32 \\
        [--windows calib.npy]

Every kind quantizes the MatMuls with a constant weight and leaves the lm_head dense (a tied head reads the
embedding table and never was a constant MatMul), so its graphs quantize what our `--no-quantize-lm-head
--no-quantize-embedding` graphs do. `gptq` is calibrated on the token windows in --windows ([S, T] int64, the same
windows our `--calibrate` draws); onnxruntime runs the whole graph once per distinct MatMul input and sample to
collect each Hessian. The quantizer gets the model with its external data loaded (a path would leave the untouched
tensors pointing at SRC's data file: GPTQ's session is built from the bytes and cannot resolve them, and the saved
copy would lack them). Prints one JSON line: the quantizer's own wall time (load and save included).
Needs the `bench` extra (`pip install -e .[bench]`: onnxruntime's quantizer imports onnx-ir and onnxscript).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

KINDS = ("rtn-sym", "rtn-asym", "hqq", "k-quant", "gptq")


class _Windows:
    """onnxruntime's CalibrationDataReader protocol (get_next; its GPTQ iterates a copy) over token windows: the
    inputs of our standard-attention fp32 graph with an empty cache, all windows in one [S, T] batch. onnxruntime's
    GPTQ runs the whole graph once per distinct MatMul input and feed (181 inputs here), and weighs each feed by its
    batch size, so one batch gives the Hessians S feeds of one window give, for 1/S of the session calls."""

    def __init__(self, model_path: Path, windows: np.ndarray):
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        defaults = {i.name for i in graph.initializer}
        self.inputs = [i for i in graph.input if i.name not in defaults]
        self.windows = windows
        self.i = 0

    def _feed(self, ids: np.ndarray) -> dict:
        """ids [S, T] -> the graph's feed."""
        import onnx

        s, t = ids.shape
        feed = {}
        for spec in self.inputs:
            if spec.name == "input_ids":
                feed[spec.name] = ids.astype(np.int64)
            elif spec.name == "attention_mask":
                feed[spec.name] = np.ones((s, t), np.int64)
            elif spec.name == "position_ids":
                feed[spec.name] = np.broadcast_to(np.arange(t, dtype=np.int64), (s, t)).copy()
            elif spec.name.startswith("past_key_values"):  # [batch, kv_heads, past, head_dim], empty
                dims = [d.dim_value for d in spec.type.tensor_type.shape.dim]
                dtype = onnx.helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type)
                feed[spec.name] = np.zeros((s, dims[1], 0, dims[3]), dtype)
            else:
                raise SystemExit(f"unexpected graph input {spec.name!r}: not one of our standard fp32 graphs")
        return feed

    def get_next(self):
        if self.i:
            return None
        self.i = 1
        return self._feed(self.windows)

    def rewind(self):
        self.i = 0

    def __iter__(self):
        return iter([self._feed(self.windows)])


def quantize(src: Path, out: Path, kind: str, block_size: int, windows: np.ndarray | None) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    model = src / "model.onnx"
    graph = onnx.load(str(model), load_external_data=False).graph
    head = [n.name for n in graph.node if "logits" in n.output]
    if kind == "hqq":
        cfg = mq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    elif kind == "k-quant":
        cfg = mq.KQuantWeightOnlyQuantConfig()
    elif kind == "gptq":
        if windows is None:
            raise SystemExit("gptq needs --windows")
        cfg = mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Windows(model, windows), block_size=128)
    else:
        cfg = mq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=(kind == "rtn-sym"))
    # GPTQ's and k-quant's quantization block is MatMulNBitsQuantizer's block_size (GPTQ's own block_size is the
    # sweep's lazy-update width); asymmetric like our int4 default.
    proto = onnx.load(str(model))  # external data loaded: see the module docstring
    q = mq.MatMulNBitsQuantizer(proto, block_size=block_size, is_symmetric=(kind == "rtn-sym"), algo_config=cfg,
                                nodes_to_exclude=head)
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--windows", type=Path, default=None, help="[S, T] int64 .npy of calibration token windows")
    args = ap.parse_args()
    src, out = args.src.resolve(), args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    windows = np.load(args.windows) if args.windows else None
    start = time.perf_counter()
    quantize(src, out, args.kind, args.block_size, windows)
    seconds = time.perf_counter() - start
    for f in src.iterdir():  # config, tokenizer, genai_config: everything but the graph
        if not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    print("\n" + json.dumps({"kind": args.kind, "seconds": seconds}))  # after onnxruntime's \r progress bars


if __name__ == "__main__":
    main()
