#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU and PyTorch, but no Rust, no GStreamer and no
# network: candle (this project's binary) vs PyTorch/diffusers on one SD3-medium-shaped
# transformer step in bf16, then the 1906 film restored on the GPU. A few minutes.
#
# Made beforehand on the build machine by tests/gpu/prepare.sh: tests/gpu/bin (CUDA build),
# tests/gpu/frames (the film as raw RGBx), tests/gpu/wheels (diffusers). Then, there:
#
#   tests/gpu/run.sh                   # results also under $OUT (or out/gpu)
#
# Environment: PYTHON (default python3), ITERS (timed steps, default 5), DTYPE (bf16),
# LAYERS/HEADS/LATENT/CTX (default 24/24/128/333: SD3-medium at 1024x1024, 4096 + 333 tokens),
# DPIR_MODEL (model directory for the film; default: the binary's embedded dpir-nano),
# FILM_PRECISION (bf16), FILM_FRAMES (default 40), FILM_SCALE (2), FILM_STEPS (model default),
# DEVICE (cuda:0). SMALL=1: a CPU check of this script itself (tiny shapes, f32, device cpu,
# the CPU builds of the benches in BIN).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
BIN=${BIN:-tests/gpu/bin}
ITERS=${ITERS:-5}
if [ "${SMALL:-0}" = 1 ]; then
    LAYERS=${LAYERS:-2} HEADS=${HEADS:-4} LATENT=${LATENT:-16} CTX=${CTX:-333} DTYPE=${DTYPE:-f32}
    DEVICE=${DEVICE:-cpu} FILM_PRECISION=${FILM_PRECISION:-f32} FILM_FRAMES=${FILM_FRAMES:-3}
    FILM_STEPS=${FILM_STEPS:-2} CUDA=0 PYDEV=cpu
else
    LAYERS=${LAYERS:-24} HEADS=${HEADS:-24} LATENT=${LATENT:-128} CTX=${CTX:-333} DTYPE=${DTYPE:-bf16}
    DEVICE=${DEVICE:-cuda:0} FILM_PRECISION=${FILM_PRECISION:-bf16} FILM_FRAMES=${FILM_FRAMES:-40}
    CUDA=1 PYDEV=cuda
fi

# The binaries are linked against the CUDA 13 runtime libraries (libcudart/libcublas/libcublasLt/
# libcurand/libnvrtc .so.13): take those of the local PyTorch's nvidia-* wheels, then the system's.
libs=$("$PYTHON" - <<'PY' 2>/dev/null
import glob, os, site, sys
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib"))) + [os.path.join(sp, "torch", "lib")]:
        if os.path.isdir(d) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="${libs:+$libs:}/usr/local/nvidia/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -d tests/gpu/wheels ] && ! "$PYTHON" -c 'import diffusers' 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site tests/gpu/wheels/*.whl &&
        export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda, "| diffusers", diffusers.__version__)'
    for b in "$BIN"/transformer_step "$BIN"/restore_raw; do
        missing=$(ldd "$b" 2>&1 | grep -i "not found")
        [ -z "$missing" ] || { echo "$b: missing libraries:"; echo "$missing"; }
    done
} 2>&1 | tee "$OUT/machine.txt"

echo "== candle (this project): DPIR transformer, $LAYERS blocks, $((HEADS * 64)) wide, latent $LATENT, $CTX ctx tokens, $DTYPE"
DPIR_BENCH_LAYERS=$LAYERS DPIR_BENCH_HEADS=$HEADS DPIR_BENCH_LATENT=$LATENT DPIR_BENCH_CTX=$CTX \
DPIR_BENCH_DTYPE=$DTYPE DPIR_BENCH_ITERS=$ITERS DPIR_BENCH_CUDA=$CUDA \
    "$PYTHON" tests/gpu/peakmem.py -- "$BIN"/transformer_step 2>&1 | tee "$OUT/candle.txt"

echo "== PyTorch/diffusers: SD3Transformer2DModel, same shapes"
"$PYTHON" tests/gpu/peakmem.py -- "$PYTHON" tests/gpu/sd3_step.py --device "$PYDEV" --dtype "$DTYPE" \
    --layers "$LAYERS" --heads "$HEADS" --latent "$LATENT" --ctx "$CTX" --iters "$ITERS" 2>&1 | tee "$OUT/pytorch.txt"

echo "== film: the 1906 film restored by the engine"
if [ -s tests/gpu/frames/film.rgbx ]; then
    env DPIR_RAW=tests/gpu/frames/film.rgbx DPIR_RAW_SIZE=$(cat tests/gpu/frames/film.size) DPIR_BENCH_FRAMES=$FILM_FRAMES \
    DPIR_BENCH_DEVICE=$DEVICE DPIR_BENCH_PRECISION=$FILM_PRECISION DPIR_BENCH_SCALE=${FILM_SCALE:-2} \
    ${FILM_STEPS:+DPIR_BENCH_STEPS=$FILM_STEPS} ${DPIR_MODEL:+DPIR_BENCH_MODEL=$DPIR_MODEL} DPIR_OUT=$OUT \
        "$PYTHON" tests/gpu/peakmem.py -- "$BIN"/restore_raw 2>&1 | tee "$OUT/film.txt"
else
    echo "no tests/gpu/frames/film.rgbx: run tests/gpu/prepare.sh on the build machine" | tee "$OUT/film.txt"
fi

"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import re, sys
out = sys.argv[1]
def fields(name):
    try:
        text = open(f"{out}/{name}.txt").read()
    except OSError:
        return {}
    d = {}
    for line in text.splitlines():
        if line.startswith(("RESULT ", "PEAK ")):
            d.update(dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv))
    return d
c, p, f = fields("candle"), fields("pytorch"), fields("film")
print("== summary")
def row(name, d):
    if "ms_per_step" not in d:
        print(f"  {name:<22} no result (see {out})")
        return
    print(f"  {name:<22} {float(d['ms_per_step']):9.2f} ms/step  {float(d['tflops']):7.1f} TFLOP/s  "
          f"peak GPU memory {d.get('gpu_mem_gib', 'nan')} GiB (NVML, device-wide)"
          + (f", torch max allocated {float(d['peak_alloc_gib']):.2f} GiB" if "peak_alloc_gib" in d else ""))
row("candle (gst-dpir)", c)
row("PyTorch (diffusers)", p)
if "ms_per_step" in c and "ms_per_step" in p:
    r = float(c["ms_per_step"]) / float(p["ms_per_step"])
    print(f"  ratio candle / PyTorch: {r:.2f}x the time per step ({c.get('tflop_per_step')} TFLOP a step)")
if "fps" in f:
    print(f"  film: {f['fps']} frames/s ({f['ms_per_frame']} ms/frame over {int(f['frames']) - 1} frames after the first), "
          f"peak GPU memory {f.get('gpu_mem_gib', 'nan')} GiB, non-finite values in the last frame: {f['nonfinite']}")
else:
    print(f"  film: no result (see {out}/film.txt)")
PY
