#!/usr/bin/env bash
# Time and peak memory of the element as a user runs it (gst-launch-1.0, the embedded dpir-nano,
# release build): one 3840×2560 frame at scale=1 (the coffee photo upscaled, so the latent and
# the autoencoder are tiled) and the first 48 frames of the 1906 film at scale=2. Prints wall
# time, time per output pixel and peak RSS (GNU time's maximum resident set size) for each.
#   benches/memory.sh            (builds the plugin first; DPIR_MEDIA: the shared media folder)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/gst-dpir-target}
MEDIA=${DPIR_MEDIA:-$PWD/../shared/media}
cargo build --release --locked >&2
export GST_PLUGIN_PATH=$CARGO_TARGET_DIR/release
[ -x /usr/bin/time ] || { echo "needs GNU time (Debian package time)" >&2; exit 1; }
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run() { # label, output pixels, pipeline...
  local label=$1 px=$2; shift 2
  local out
  out=$( { /usr/bin/time -f "%e %M" gst-launch-1.0 -q "$@" >/dev/null; } 2>&1 | tail -1)
  read -r secs kb <<<"$out"
  awk -v l="$label" -v s="$secs" -v kb="$kb" -v px="$px" 'BEGIN {
    printf "%-34s wall %7.2f s   %6.2f us per output pixel   peak RSS %6.0f MiB\n", l, s, s * 1e6 / px, kb / 1024 }'
}
run "4K still 3840x2560, scale=1" $((3840 * 2560)) \
  filesrc location="$MEDIA/coffee.png" ! decodebin ! videoconvert ! videoscale ! \
  video/x-raw,format=RGB,width=3840,height=2560 ! imagefreeze num-buffers=1 ! dpirrestore ! fakesink
run "film 48 frames 214x160, scale=2" $((48 * 428 * 320)) \
  filesrc location="$MEDIA/Shepard_Calais_1906_FrenchGP.ogv" ! decodebin ! videoconvert ! \
  identity eos-after=48 ! dpirrestore scale=2 ! fakesink
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
