#!/usr/bin/env bash
# Creates (once) the Python virtual environment pipelines/restore-distributed.sh runs in: Debian's
# python3 with its system site packages (PyGObject and the GStreamer typelibs come from Debian:
# tests/setup-debian.sh) plus Ray from PyPI. Idempotent; tests/run calls it.
#   DPIR_RAY_VENV   where (default ~/.cache/gst-dpir-ray-venv, outside the clone; the scripts
#                   look there too)
#   DPIR_RAY_SPEC   what pip installs (default ray==2.60.0, the version the tests ran with; every
#                   node of a cluster needs the same Ray and Python versions as the driver)
#   DPIR_RAY_PYTHON the interpreter (default /usr/bin/python3, Debian's: python3-gi is built for it)
set -euo pipefail
venv="${DPIR_RAY_VENV:-$HOME/.cache/gst-dpir-ray-venv}"
spec="${DPIR_RAY_SPEC:-ray==2.60.0}"
python="${DPIR_RAY_PYTHON:-/usr/bin/python3}"
check='import ray, gi
gi.require_version("Gst", "1.0"); gi.require_version("GstApp", "1.0"); gi.require_version("GstVideo", "1.0")
from gi.repository import Gst, GstApp, GstVideo'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  exit 0
fi
[ -x "$python" ] || { echo "setup-ray.sh: $python is missing (Debian python3)" >&2; exit 1; }
"$python" -c 'import gi' 2>/dev/null ||
  { echo "setup-ray.sh: $python has no PyGObject: run tests/setup-debian.sh (python3-gi)" >&2; exit 1; }
echo "== setting up the Ray virtual environment in $venv ($spec)"
"$python" -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"
"$venv/bin/python" -c "$check" ||
  { echo "setup-ray.sh: $venv does not import ray and GStreamer's Python bindings" >&2; exit 1; }
