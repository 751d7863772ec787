#!/usr/bin/env bash
# Creates the PyTorch/diffusers environment the side-by-side benchmark (benches/compare_pytorch.sh)
# compares against: a virtual environment at $DPIR_CMP_VENV (default ~/.cache/gst-dpir-venv) with
# the versions the parity fixtures were made with (torch 2.4.1, diffusers 0.29.2,
# transformers 4.44.2). Idempotent; ~2.5 GB download (PyPI's torch wheel brings its CUDA libraries).
set -euo pipefail
VENV=${DPIR_CMP_VENV:-$HOME/.cache/gst-dpir-venv}
if "$VENV/bin/python" -c "import torch, diffusers, safetensors" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.4.1
"$VENV/bin/pip" install -q diffusers==0.29.2 transformers==4.44.2 safetensors numpy==1.26.4 pillow
"$VENV/bin/python" -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
