#!/usr/bin/env bash
# Restore every still (jpg, jpeg, png, tif, tiff, webp) of a folder into PNGs in another
# folder. Extra arguments are dpirrestore properties.
#   pipelines/restore-stills.sh photos/ restored/ scale=2
#
# Every input gives a complete output or an error naming it (exit status 1 at the end): each
# PNG is written beside its final name and renamed only once it decodes to the expected size.
# A JPEG that GStreamer's jpegdec cannot decode (it only warns, and the pipeline ends with no
# frame) is decoded again with libav's MJPEG decoder. 16-bit PNGs and TIFFs stay 16-bit through
# the element and come out as 16-bit PNGs (pipelines/lib/png16.py: GStreamer 1.22 has no 16-bit
# RGB image encoder). Pipelines run through pipelines/lib/launch.py, not gst-launch-1.0 (whose
# 1.22 version can wait forever when a broken file fails while the pipeline starts); it needs
# PyGObject: $DPIR_PYTHON, default /usr/bin/python3 (Debian's, for which python3-gi is built).
set -euo pipefail
in=$1 out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
py=${DPIR_PYTHON:-/usr/bin/python3}
launch() { "$py" "$here/lib/launch.py" "$@"; }
mkdir -p "$out"
scale=1
for p in "$@"; do
  case $p in scale=*) scale=${p#scale=} ;; esac
done
shopt -s nullglob nocaseglob
failed=()
files=("$in"/*.{jpg,jpeg,png,tif,tiff,webp})
[ ${#files[@]} -gt 0 ] || { echo "restore-stills: no stills (jpg, jpeg, png, tif, tiff, webp) in $in" >&2; exit 1; }

# Width, height and bits per component of a still (gst-discoverer-1.0 reports depth per pixel for
# RGB, per component for grey).
probe() {
  gst-discoverer-1.0 "$1" 2>/dev/null | awk '/Width:/ {w=$2} /Height:/ {h=$2} /Depth:/ {d=$2} END {print w, h, d}'
}

for f in "${files[@]}"; do
  name=$(basename "${f%.*}")
  dst="$out/$name.png" tmp="$out/.$name.png.part"
  echo "== $f"
  read -r w h d < <(probe "$f") || true
  if [ -z "${w:-}" ] || [ -z "${h:-}" ]; then
    echo "restore-stills: ERROR: $f is not an image GStreamer can read" >&2
    failed+=("$f"); continue
  fi
  deep=0
  case ${f,,} in
    *.png) [ "$(python3 "$here/lib/png16.py" depth "$f")" = 16 ] && deep=1 ;;
    *.tif|*.tiff) [ "${d:-8}" -gt 32 ] && deep=1 ;;
  esac
  decoders=("decodebin")
  case ${f,,} in *.jpg|*.jpeg) decoders+=("jpegparse ! avdec_mjpeg") ;; esac
  ok=0
  for dec in "${decoders[@]}"; do
    rm -f "$tmp" "$tmp.raw"
    if [ $deep = 1 ]; then
      launch filesrc location="$f" ! $dec ! videoconvert ! video/x-raw,format=RGBA64_LE ! \
        dpirrestore "$@" ! video/x-raw,format=RGBA64_LE ! filesink location="$tmp.raw" || true
      [ -s "$tmp.raw" ] && python3 "$here/lib/png16.py" write "$tmp.raw" $((w * scale)) $((h * scale)) "$tmp" || true
      rm -f "$tmp.raw"
    else
      launch filesrc location="$f" ! $dec ! videoconvert ! dpirrestore "$@" ! \
        videoconvert ! pngenc ! filesink location="$tmp" || true
    fi
    # Complete: a PNG of the expected size.
    if [ -s "$tmp" ] && [ "$(probe "$tmp" | cut -d' ' -f1-2)" = "$((w * scale)) $((h * scale))" ]; then
      ok=1; break
    fi
    echo "restore-stills: $dec gave no complete frame for $f${decoders[1]:+; trying another decoder}" >&2
  done
  if [ $ok = 1 ]; then
    mv -f "$tmp" "$dst"
    echo "   -> $dst ($((w * scale))x$((h * scale))$([ $deep = 1 ] && echo ", 16-bit"))"
  else
    rm -f "$tmp"
    echo "restore-stills: ERROR: $f could not be restored (see the messages above)" >&2
    failed+=("$f")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "restore-stills: ${#failed[@]} of ${#files[@]} stills failed: ${failed[*]}" >&2
  exit 1
fi
