#!/usr/bin/env bash
# dpir-nano: setup -> prepare data -> train AE -> train DiT -> export -> evaluate.
# Every stage is resumable (checkpoints in $DPIR_DATA/ckpt); re-running continues where it stopped.
# Budget knob: DIT_MIN (wall-clock minutes of the DiT stage); the AE phases are fixed below. Uses nice -n 10 and 2 threads.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${VENV:-/root/venv-dpir}"
export DPIR_DATA="${DPIR_DATA:-/root/dpir-data}"
DIT_MIN="${DIT_MIN:-37}"
PY="nice -n 10 $VENV/bin/python"
mkdir -p "$DPIR_DATA/logs" "$DPIR_DATA/ckpt"

# 1. environment
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install torch==2.4.1
  "$VENV/bin/pip" install diffusers==0.29.2 transformers==4.44.2 safetensors numpy==1.26.4 pillow scikit-image stlpips-pytorch imageio-ffmpeg
  "$VENV/bin/pip" install --no-deps torchvision==0.19.1
fi

# 2. data (apt-get download: needs `apt-get update` once, as root)
[ -f "$DPIR_DATA/pool_train_128.npy" ] || $PY "$HERE/prepare_data.py" --data "$DPIR_DATA" 2>&1 | tee "$DPIR_DATA/logs/prep.log"

# 3. autoencoder (64x64 crops, batch 8). Three resumed phases, as in the shipped run: the tiny AE learns
#    luminance first, so phases 2-3 add a chroma / low-frequency term (--w-color). --minutes is cumulative.
AE="$PY $HERE/train.py ae --crop 64 --batch 8 --w-kl 1e-3 --latent-noise 0.05 --lr 1.5e-3 --ckpt-every 50"
$AE --minutes 22 2>&1 | tee -a "$DPIR_DATA/logs/ae.log"
$AE --minutes 32 --w-color 1.0 2>&1 | tee -a "$DPIR_DATA/logs/ae.log"
$AE --minutes 39 --w-color 3.0 2>&1 | tee -a "$DPIR_DATA/logs/ae.log"

# 4. transformer + vision towers (96x96 HQ crops, x2 mostly, batch 8, 4-step schedule, shift 3). The first
#    50 steps also fine-tune the AE decoder every 4th step (encoder frozen); that was then switched off because
#    it doubled the step time on the shared CPU.
DIT="$PY $HERE/train.py dit --minutes $DIT_MIN --crop 96 --batch 8 --sample-steps 4 --shift 3 --ckpt-every 50 --workers 1"
$DIT --steps 50 --dec-every 4 2>&1 | tee -a "$DPIR_DATA/logs/dit.log"
$DIT --dec-every 0 2>&1 | tee -a "$DPIR_DATA/logs/dit.log"

# 5. export to weights/dpir-nano (f16) and 6. evaluate the exported files
$PY "$HERE/export.py" --steps 4 --shift 3 --color-fix "${COLOR_FIX:-wavelet}"
$PY "$HERE/eval.py" 2>&1 | tee "$DPIR_DATA/logs/eval.log"
