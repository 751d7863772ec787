#!/usr/bin/env bash
# Prepare everything tests/gpu/run.sh needs on a GPU machine that has no Rust toolchain, no
# GStreamer and no network (run this here, on the build machine):
#   tests/gpu/bin/      the CUDA benches, built by tests/gpu/build-cuda.sh (skipped: NO_BUILD=1)
#   tests/gpu/frames/   the 1906 film decoded to raw RGBx by GStreamer (film.rgbx + film.size)
#   tests/gpu/wheels/   diffusers (+ importlib_metadata), which the GPU image's PyTorch lacks
# All three are git-ignored; carry them to the GPU machine (device tool: carry
# ["tests/gpu/bin", "tests/gpu/frames", "tests/gpu/wheels"]), with a model directory if the build
# has no embedded dpir-nano (DPIR_MODEL=... there).
#
# FILM_FRAMES (default 41, of the film's 460: run.sh restores 40) bounds what travels: 137 KB a
# frame. The device tool carries 64 MiB at most: bin ~40 MB (with the embedded dpir-nano),
# frames 5.6 MB, wheels 6.4 MB; the work tree itself ~11 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "${NO_BUILD:-0}" = 1 ] || tests/gpu/build-cuda.sh

film=${FILM:-../shared/media/Shepard_Calais_1906_FrenchGP.ogv}
[ -e "$film" ] || film=/usr/share/doc/python-nbsphinx/html/www/wikimediacommons/Shepard_Calais_1906_FrenchGP.ogv
n=${FILM_FRAMES:-41}
mkdir -p tests/gpu/frames
# RGBx: 4 bytes a pixel, so rows carry no padding whatever the width (214 here).
gst-launch-1.0 -q filesrc location="$film" ! decodebin ! videoconvert ! \
    video/x-raw,format=RGBx,width=214,height=160,pixel-aspect-ratio=1/1 ! \
    identity eos-after=$((n + 1)) ! filesink location=tests/gpu/frames/film.rgbx
truncate -s $((n * 214 * 160 * 4)) tests/gpu/frames/film.rgbx
echo 214x160 > tests/gpu/frames/film.size
echo "film: $(( $(stat -c %s tests/gpu/frames/film.rgbx) / (214 * 160 * 4) )) frames in tests/gpu/frames/film.rgbx"

mkdir -p tests/gpu/wheels
python3 -m pip download -q --no-deps -d tests/gpu/wheels diffusers==0.42.1 importlib_metadata==8.7.0
du -sh tests/gpu/bin tests/gpu/frames tests/gpu/wheels 2>/dev/null || true
