#!/usr/bin/env bash
# Restore every still (jpg, jpeg, png, tif, tiff, webp) of a folder into PNGs in another
# folder. Extra arguments are dpirrestore properties.
#   pipelines/restore-stills.sh photos/ restored/ scale=2
set -euo pipefail
in=$1 out=$2; shift 2
mkdir -p "$out"
shopt -s nullglob nocaseglob
for f in "$in"/*.{jpg,jpeg,png,tif,tiff,webp}; do
  name=$(basename "${f%.*}")
  echo "== $f"
  gst-launch-1.0 -q filesrc location="$f" ! decodebin ! videoconvert ! dpirrestore "$@" ! \
    videoconvert ! pngenc ! filesink location="$out/$name.png"
done
