#!/usr/bin/env bash
# Build gst-dpir with candle's CUDA backend on a machine WITHOUT a GPU (and without a system
# CUDA toolkit): nvcc, the CUDA headers and the CUDA libraries come from NVIDIA's PyPI wheels.
#
#   tests/gpu/build-cuda.sh            # feature `cuda`, model-only (no GStreamer)
#   FEATURES=cudnn tests/gpu/build-cuda.sh
#
# Output: tests/gpu/bin/{transformer_step,restore_raw}, stripped executables that run on a
# machine with an NVIDIA driver (>= 580 for CUDA 13) and the CUDA 13 libraries of a cu130
# PyTorch (tests/gpu/run.sh finds them); tests/gpu/bin is git-ignored.
#
# Why these pins: the binary is dynamically linked against libcudart/libcublas/libcublasLt/
# libcurand/libnvrtc .so.13 (cudarc `dynamic-linking`, chosen by candle), so the CUDA major
# version must be the one the GPU machine's PyTorch ships (torch 2.11 + cu130 there), and
# candle's kernels are embedded as PTX, which the driver only loads if nvcc is not newer than
# the driver (13.0 <-> driver 580). CUDA 12.x `nvidia-cuda-nvcc-cu12` wheels ship ptxas but no
# nvcc; the CUDA 13 `nvidia-cuda-nvcc` wheels ship nvcc, cicc and the headers.
#
# Environment: CUDA_PYPI (wheel dir, default $HOME/cuda-pypi/cu13; cuDNN goes to $CUDA_PYPI-cudnn),
# CUDA_COMPUTE_CAP (default 90: H100/H200; kernels for sm_90a), CARGO_TARGET_DIR (default $HOME/.cache/gst-dpir-cuda-target,
# kept apart from the CPU build's target dir), FEATURES (cuda or cudnn), BIN_DIR (tests/gpu/bin),
# TARGETS (cargo target options, default: the two GPU benches).
set -euo pipefail
cd "$(dirname "$0")/../.."

CUDA_PYPI=${CUDA_PYPI:-$HOME/cuda-pypi/cu13}
FEATURES=${FEATURES:-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gst-dpir-cuda-target}

# 1. The toolkit from PyPI (versions = the GPU image's CUDA 13.0 toolkit and PyTorch libraries).
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85
        nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35)
install() { # DIR WHEEL... : once per wheel set (pip --target --upgrade replaces DIR/nvidia whole)
    local dir=$1; shift
    local stamp="$dir/.installed-$(echo "$*" | sha1sum | cut -c1-12)"
    if [ ! -e "$stamp" ]; then
        python3 -m pip install --no-deps --upgrade --target "$dir" "$@"
        touch "$stamp"
    fi
}
install "$CUDA_PYPI" "${wheels[@]}"
# cuDNN (feature cudnn) in a folder of its own, so that neither install removes the other.
[ "$FEATURES" = cudnn ] && install "$CUDA_PYPI-cudnn" nvidia-cudnn-cu13==9.24.0.43
export CUDA_ROOT="$CUDA_PYPI/nvidia/cu13"     # bin/nvcc, include/, lib/, nvvm/ (one merged tree)
export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
nvcc --version | tail -2

# 2. Link-time names. The wheels ship only versioned sonames: add the unversioned .so links the
#    linker looks for, and a stub libcuda.so (soname libcuda.so.1, the driver's) with every driver
#    entry point cudarc binds, made from cudarc's own bindings - the real one comes with the
#    driver at run time, as the toolkit's own lib/stubs/libcuda.so does.
lib="$CUDA_ROOT/lib"
for so in "$lib"/libcudart.so.13 "$lib"/libcublas.so.13 "$lib"/libcublasLt.so.13 \
          "$lib"/libcurand.so.10 "$lib"/libnvrtc.so.13; do
    ln -sf "$(basename "$so")" "${so%.so.*}.so"
done
if [ "$FEATURES" = cudnn ]; then
    for so in "$CUDA_PYPI-cudnn"/nvidia/cudnn/lib/libcudnn*.so.9; do ln -sf "$so" "$lib/$(basename "${so%.9}")"; done
fi
cargo fetch --quiet
sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$(grep -A1 '^name = "cudarc"' Cargo.lock | sed -n 's/version = "\(.*\)"/\1/p')"/src/driver/sys/mod.rs | head -1)
mkdir -p "$lib/stubs"
if [ ! -e "$lib/stubs/libcuda.so" ] || [ "$sys" -nt "$lib/stubs/libcuda.so" ]; then
    grep -o '^pub unsafe fn cu[A-Za-z0-9_]*' "$sys" | sed 's/^pub unsafe fn //' | sort -u |
        sed 's/.*/int &(void) { return 999; }/' > "$lib/stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda_stub.c"
fi
# Only for a smoke test of the CUDA binaries on a machine without a driver (they need
# libcuda.so.1 to start, even with device=cpu): LD_LIBRARY_PATH=$lib/stubs:$lib; every CUDA call
# then fails with CUDA_ERROR_UNKNOWN (999).
ln -sf libcuda.so "$lib/stubs/libcuda.so.1"

# 3. Build the GPU binaries (model-only: no GStreamer on the GPU machine).
mkdir -p "$CARGO_TARGET_DIR"   # the JSON below goes there before cargo has created it
nice -n 15 cargo build --release --no-default-features --features "$FEATURES" \
    ${TARGETS:---bench transformer_step --bench restore_raw} --message-format=json-render-diagnostics > "$CARGO_TARGET_DIR/cuda-build.json"
BIN_DIR=${BIN_DIR:-tests/gpu/bin}
mkdir -p "$BIN_DIR"
python3 - "$CARGO_TARGET_DIR/cuda-build.json" "$BIN_DIR" <<'PY'
import json, shutil, subprocess, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("transformer_step", "restore_raw"):
        dst = sys.argv[2] + "/" + m["target"]["name"]
        shutil.copy(m["executable"], dst)
        subprocess.run(["strip", dst], check=True)
        print("built", dst)
PY
ls -l "$BIN_DIR"
