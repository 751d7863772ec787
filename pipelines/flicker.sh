#!/usr/bin/env bash
# Temporal flicker of dpirrestore on a static-camera real clip (the 1906 film, frames 4-28):
# mean absolute frame-to-frame difference of the output / that of the input, for
# noise=per-clip vs noise=per-frame (and per-clip + warm-start with warm=S).
#
#   pipelines/flicker.sh [model=DIR|fixture] [frames=24] [skip=4] [steps=4] [scale=1] \
#                        [device=auto] [warm=0.5] [media=FILE] [props="..."]
#
# model= defaults to the embedded dpir-nano; `model=fixture` uses the tiny fixture model (a check
# of the machinery, not of quality). PROFILE=dev builds faster than the default release.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gst-dpir-target}"
export DPIR_FIXTURES="${DPIR_FIXTURES:-$PWD/../shared/fixtures}"
export DPIR_MEDIA="${DPIR_MEDIA:-$PWD/../shared/media}"
exec cargo run --quiet --profile "${PROFILE:-release}" --example flicker -- "$@"
