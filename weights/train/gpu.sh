#!/usr/bin/env bash
# dpir-nano training on a lent GPU machine (PyTorch there, no network): AE, then DiT + decoder fine-tune, in a
# fixed wall-clock budget; weights-only f16 checkpoints land in $OUT as they are written (a run cut short still
# returns its last ones). Prepared here by `prepare_gpu.sh` (.gpu-train/: the crop pool as JPEG + two sets of
# wheels: old = the versions this code was developed with, new = a diffusers that matches a recent PyTorch);
# run there from the repository root:  bash weights/train/gpu.sh     (AE_MIN / DIT_MIN: minutes per stage)
# Then, here: `export.py --from DIR` turns the returned checkpoints into weights/dpir-nano.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu-train}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export DPIR_DATA=${DPIR_DATA:-/tmp/dpir-data}; mkdir -p "$DPIR_DATA"
cp .gpu-train/pool_train_128.jpgpack* "$DPIR_DATA"/
# resume: .gpu-train/ckpt holds the weights-only checkpoints of an earlier run (AE_MIN=0 then keeps the AE)
[ -d .gpu-train/ckpt ] && mkdir -p "$DPIR_DATA/ckpt" && cp .gpu-train/ckpt/* "$DPIR_DATA/ckpt/"
log() { tee -a "$OUT/train.log"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | log
W=$(( $(nproc) - 2 ))
T=weights/train/train.py
# Pick the first library set with which two steps of each stage run (checked in a scratch data folder).
smoke() {
    local d=/tmp/smoke-$1; rm -rf "$d"; mkdir -p "$d"; cp .gpu-train/pool_train_128.jpgpack* "$d"/
    DPIR_DATA=$d python3 $T ae --steps 2 --batch 4 --crop 128 --log-every 1 &&
    DPIR_DATA=$d python3 $T dit --steps 2 --batch 4 --crop 128 --workers 2 --log-every 1
}
ok=${LIBS:-}  # LIBS=old|new: a set already known to work (no smoke test)
[ -z "$ok" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-$ok .gpu-train/$ok/*.whl
for set in $([ -n "$ok" ] || echo old new); do
    rm -rf /tmp/site-$set
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-$set .gpu-train/$set/*.whl || continue
    if PYTHONPATH=/tmp/site-$set smoke $set > "$OUT/smoke-$set.log" 2>&1; then ok=$set; break; fi
    tail -5 "$OUT/smoke-$set.log" | log
done
[ -n "$ok" ] || { echo "no library set works" | log; exit 1; }
export PYTHONPATH=/tmp/site-$ok
python3 -c 'import torch, diffusers, transformers; print("libs", "'$ok'", "torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' 2>&1 | log
[ "${AE_MIN:-3.2}" = 0 ] || python3 $T ae --minutes "${AE_MIN:-3.2}" --crop 128 --batch 64 --lr 2e-3 --w-color 1.0 \
    --w-kl 1e-3 --latent-noise 0.05 --ckpt-every 500 --log-every 250 --export-dir "$OUT" 2>&1 | log
python3 $T dit --minutes "${DIT_MIN:-4}" --crop 128 --batch 64 --lr "${DIT_LR:-6e-4}" --sample-steps 4 \
    --shift 3 --dec-every 1 --dec-lr 3e-4 --workers "$W" --ckpt-every 400 --log-every 200 --export-dir "$OUT" 2>&1 | log
ls -la "$OUT" | log
