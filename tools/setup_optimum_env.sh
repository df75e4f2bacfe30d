#!/usr/bin/env bash
# A separate venv for the export benchmark's anchor: optimum-onnx pins transformers < 4.58, qosora needs newer.
#   bash tools/setup_optimum_env.sh [DIR]   (default /tmp/optenv), then
#   python tools/bench_export.py --optimum-python DIR/bin/python ...
set -euo pipefail
DIR=${1:-/tmp/optenv}
[ -x "$DIR/bin/python" ] || python3 -m venv "$DIR"
"$DIR/bin/pip" install -q --upgrade pip
"$DIR/bin/pip" install -q "torch==2.13.0"  # the CPU build first
"$DIR/bin/pip" install -q optimum-onnx "transformers<4.58" onnxruntime
"$DIR/bin/python" -c "import optimum.exporters.onnx, transformers; print('optimum anchor env:', transformers.__version__)"
