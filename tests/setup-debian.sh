#!/usr/bin/env bash
# Installs what gst-dpir needs to build, test and run on Debian 12 (as root). Idempotent.
set -euo pipefail
pkgs=(pkg-config libglib2.0-dev libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
      gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
      gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
      python3-venv python3-gi python3-gst-1.0 gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0
      gstreamer1.0-plugins-base-apps ges1.0-tools time
      python3-numpy python3-pil python3-tifffile libimage-exiftool-perl libtiff-tools netpbm "$@")
# gstreamer1.0-plugins-base-apps: gst-discoverer-1.0 (the pipelines look for audio with it).
# python3-venv, python3-gi (PyGObject) and the GStreamer typelibs: pipelines/restore-distributed.sh,
# whose driver is Python (Ray itself comes from PyPI into a virtual environment: tests/setup-ray.sh).
# python3-numpy ... netpbm: pipelines/restore-stills.sh (docs/stills.md): numpy and tifffile hold and
# write the pixels, Pillow reads JPEG/WebP headers and makes the test stills, exiftool carries
# EXIF/XMP/IPTC, libtiff's tiffcp (de)compresses TIFFs, netpbm's pngtopam decodes PNGs with libpng
# (GStreamer 1.22's pngdec garbles 16-bit colour PNGs).
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.92) is required: install it with rustup" >&2; exit 1; }
