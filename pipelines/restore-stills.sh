#!/usr/bin/env bash
# Restore every still (png, jpg, jpeg, tif, tiff, webp) of a folder into another folder, as an
# archive keeps them (docs/stills.md). Extra arguments are dpirrestore properties.
#   pipelines/restore-stills.sh [--format auto|png|tiff] photos/ restored/ scale=2
#
# The output follows the input (TIFF -> TIFF with the same compression, 16-bit -> 16-bit, gray
# stays gray, alpha stays) unless --format asks for PNG or TIFF; JPEG and WebP give PNG. The
# EXIF/TIFF orientation is applied before restoration (the output has orientation 1); the ICC
# profile, EXIF, XMP and IPTC are carried over, and each output's line says what was carried
# and what was not. Every input gives a complete output or an error naming it (exit status 1 at
# the end): outputs are written in a hidden temporary folder inside OUT_DIR, read back, and
# renamed into place only then.
#
# The work is done by pipelines/lib/stills.py (PyGObject, numpy, tifffile, Pillow; exiftool,
# libtiff's tiffcp, netpbm's pngtopam): $DPIR_PYTHON, default /usr/bin/python3 (Debian's, for
# which those packages are built; tests/setup-debian.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${DPIR_PYTHON:-/usr/bin/python3}" "$here/lib/stills.py" "$@"
