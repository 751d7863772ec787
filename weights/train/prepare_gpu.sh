#!/usr/bin/env bash
# Here (the build machine): fill .gpu-train/ (git-ignored; the device call carries it) for gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-$HOME/venv-dpir}
mkdir -p .gpu-train/old .gpu-train/new
grep -qx '/.gpu-train/' .git/info/exclude || echo '/.gpu-train/' >> .git/info/exclude
"$VENV/bin/python" weights/train/pack_pool.py .gpu-train --n "${POOL_N:-4400}"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"; }
dl .gpu-train/old diffusers==0.29.2 transformers==4.44.2 huggingface_hub==0.24.6 tokenizers==0.19.1
dl .gpu-train/new diffusers==0.42.1 importlib_metadata==8.7.0
du -sh .gpu-train
