#!/usr/bin/env bash
# dpir-nano v2 (issue #14): fine-tune the SHIPPED weights on the degradations users have (real codecs through
# GStreamer, film damage, x1 as often as x2, some x4) with DPIR's global-local visual prompts, on the CPU.
# Writes checkpoints to $DPIR_DATA/ckpt-v2 and the candidate export to $OUT (default $DPIR_DATA/export-v2, OUTSIDE
# the repository; weights/dpir-nano is never overwritten here). Budget knobs: DIT_MIN, DEC_MIN (wall-clock minutes).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$HOME/venv-dpir}"
export DPIR_DATA="${DPIR_DATA:-$HOME/dpir-data}"
export DPIR_CKPT="${DPIR_CKPT:-$DPIR_DATA/ckpt-v2}"
OUT="${OUT:-$DPIR_DATA/export-v2}"
PY="nice -n 10 $VENV/bin/python"
mkdir -p "$DPIR_DATA/logs"

# 1. environment: a venv that sees Debian's PyGObject (python3-gi) for the GStreamer codecs
if [ ! -x "$VENV/bin/python" ]; then
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install torch==2.4.1
  "$VENV/bin/pip" install diffusers==0.29.2 transformers==4.44.2 safetensors numpy==1.26.4 pillow scikit-image stlpips-pytorch imageio-ffmpeg
  "$VENV/bin/pip" install --no-deps torchvision==0.19.1
fi
# 2. data: the card's photos (prepare_data.py also writes the whole clean photos, clean/train/*.npy)
ls "$DPIR_DATA"/clean/train/*.npy >/dev/null 2>&1 || $PY "$HERE/prepare_data.py" --data "$DPIR_DATA" 2>&1 | tee "$DPIR_DATA/logs/prep.log"
# 3. the degraded pool with per-frame global views (about 75 ms an entry on one free core)
[ -f "$DPIR_DATA/pool_v2_meta.npy" ] || $PY "$HERE/make_pool_v2.py" --n "${POOL_N:-10000}" --workers 2 2>&1 | tee "$DPIR_DATA/logs/pool_v2.log"
# 4. start from the shipped weights (inverse of export.py)
[ -f "$DPIR_CKPT/dit.pt" ] || $PY "$HERE/train.py" init --init-from "$REPO/weights/dpir-nano"
# 5. transformer + both vision towers: velocity loss, 60 % of samples at sigma = 1 (the shipped 1-step path)
$PY "$HERE/train.py" dit --pool v2 --minutes "${DIT_MIN:-30}" --batch 8 --crop 128 --lr 1e-4 --warmup 20 --sample-steps 4 \
    --shift 3 --dec-every 0 --p-sigma1 0.6 --workers 1 --threads 2 --log-every 10 --ckpt-every 25 2>&1 | tee -a "$DPIR_DATA/logs/dit-v2.log"
# 6. decoder on the new transformer's 1-step outputs (wavelet colour fix), v2 pool
$PY "$HERE/train.py" dec --pool v2 --minutes "${DEC_MIN:-28}" --batch 12 --crop 128 --workers 1 --sample-steps 1 --shift 3 \
    --lr 1e-4 --ckpt-every 50 --log-every 10 2>&1 | tee -a "$DPIR_DATA/logs/dec-v2.log"
# 7. export (same formats and manifest as the shipped model) and evaluate against the shipped model
$PY "$HERE/export.py" --out "$OUT" --steps 1 --shift 3 --pos-embed-max-size 8
for cfg in "2 v1" "1 v2" "2 v2"; do set -- $cfg
  $PY "$HERE/eval.py" --model "$OUT" --scale $1 --mix $2 --tag v2- 2>&1 | tee "$DPIR_DATA/logs/eval-v2-x$1-$2.log"
done
$PY "$HERE/eval_video.py" --pytorch "$REPO/weights/dpir-nano,$OUT" --fidelity 0,0.5,0.75 --ceiling 2>&1 | tee "$DPIR_DATA/logs/evalvideo-v2.log"
