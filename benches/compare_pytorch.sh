#!/usr/bin/env bash
# Rust (candle) vs PyTorch/diffusers, side by side in one run on this machine: one DPIR
# transformer forward and one VAE decode, same configuration, weights and inputs on both sides,
# CPU float32, 2 threads each; prints a table with the Rust/PyTorch ratio.
#
#   benches/compare_pytorch.sh [--no-medium]
#
# Cases: "tiny" = the fixtures' configuration and weights ($DPIR_FIXTURES), "medium" =
# random weights generated on the spot (transformer 2 layers x 512, latent 64x64 + 333 context
# tokens; VAE [64,128,256,256], latent 16x16 -> 128x128). See benches/compare_pytorch.py.
#
# Environment:
#   DPIR_CMP_PYTHON   python with torch 2.4 + diffusers 0.29.2 (default: $DPIR_CMP_VENV/bin/python,
#                     the environment benches/setup-pytorch.sh creates when it is missing)
#   DPIR_CMP_VENV     that environment (default ~/.cache/gst-dpir-venv)
#   DPIR_CMP_PROFILE  cargo profile for the Rust side: bench (default; release settings) or dev
#                     (dependencies are opt-level 3 in dev too, the crate itself opt-level 1)
#   DPIR_CMP_ROUNDS   alternating Rust/PyTorch rounds; the table keeps each side's best round
#                     median (default 2)
#   DPIR_CMP_BIN      an already built compare bench binary (skips the cargo build)
#   DPIR_CMP_THREADS  threads for both sides (default 2: RAYON_NUM_THREADS / torch.set_num_threads)
#   DPIR_CMP_WORK     scratch folder for spec, generated weights, inputs, outputs
#                     (default $TMPDIR/dpir-compare; the medium weights are reused across runs)
#   DPIR_FIXTURES     fixture folder (default ../shared/fixtures, beside the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${DPIR_CMP_PYTHON:-}" ]; then
    bash benches/setup-pytorch.sh
    DPIR_CMP_PYTHON=${DPIR_CMP_VENV:-$HOME/.cache/gst-dpir-venv}/bin/python
fi
PY=$DPIR_CMP_PYTHON
WORK=${DPIR_CMP_WORK:-${TMPDIR:-/tmp}/dpir-compare}
export DPIR_FIXTURES=${DPIR_FIXTURES:-$PWD/../shared/fixtures}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gst-dpir-target}
export DPIR_CMP_PROFILE=${DPIR_CMP_PROFILE:-bench}
export DPIR_CMP_THREADS=${DPIR_CMP_THREADS:-2}
export RAYON_NUM_THREADS=$DPIR_CMP_THREADS
# Keep PyTorch's OpenMP pool to the same thread count (set_num_threads also does this).
export OMP_NUM_THREADS=$DPIR_CMP_THREADS

# 1. Build first, so compilation never overlaps a timing; then run the binary itself (a second
#    `cargo bench` could rebuild if the sources change meanwhile).
if [ -n "${DPIR_CMP_BIN:-}" ]; then
    BIN=$DPIR_CMP_BIN
else
    echo "== building the Rust bench (profile $DPIR_CMP_PROFILE)" >&2
    BIN=$(nice -n 0 cargo bench --profile "$DPIR_CMP_PROFILE" --no-default-features --features parity --bench compare --no-run \
        --message-format=json-render-diagnostics |
        "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "compare" and m.get("executable"):
        print(m["executable"])')
fi
[ -x "$BIN" ] || { echo "no bench executable found" >&2; exit 1; }

# 2. Spec, inputs and (medium) random weights.
echo "== preparing cases in $WORK" >&2
mkdir -p "$WORK"
rm -f "$WORK"/*.rust.safetensors "$WORK"/*.torch.safetensors "$WORK"/rust.*.log "$WORK"/torch.*.log
nice -n 0 "$PY" benches/compare_pytorch.py prepare "$WORK" "$@" >/dev/null

# 3. Rust and PyTorch sides, alternating for DPIR_CMP_ROUNDS rounds (both see the same load).
ROUNDS=${DPIR_CMP_ROUNDS:-2}
for ((i = 0; i < ROUNDS; i++)); do
    echo "== round $((i + 1))/$ROUNDS: Rust ($BIN)" >&2
    nice -n 0 "$BIN" "$WORK/spec.json" >"$WORK/rust.$i.log"
    grep -q '^RESULT' "$WORK/rust.$i.log" || { echo "the Rust bench reported nothing" >&2; exit 1; }
    echo "== round $((i + 1))/$ROUNDS: PyTorch" >&2
    nice -n 0 "$PY" benches/compare_pytorch.py torch "$WORK" "$WORK/torch.$i.log"
done

# 4. The table, with output checks (Rust vs PyTorch, PyTorch vs fixture).
"$PY" benches/compare_pytorch.py table "$WORK" "$ROUNDS"
