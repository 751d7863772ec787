#!/usr/bin/env bash
# Restore a film across Ray workers (local by default; a cluster through Ray's RAY_ADDRESS), in
# scene-aligned chunks: the same frames as pipelines/restore-film.sh with the same arguments (.mkv:
# bit for bit). Resumable: run the same command again after an interruption.
#   pipelines/restore-distributed.sh IN OUT.mkv|OUT.mp4 [dpirrestore properties…] [--chunk-frames N]
#       [--workers N] [--work-dir DIR] [--keep-parts] [--gpus-per-task 0|1|auto] [--crf N] …  (--help: all)
# The program is the Python package pipelines/dpir_ray (docs/distributed.md). It runs in the Ray
# virtual environment $DPIR_RAY_VENV (default ~/.cache/gst-dpir-ray-venv), which tests/setup-ray.sh
# creates.
set -euo pipefail
here=$(cd "$(dirname -- "$0")" && pwd)
venv="${DPIR_RAY_VENV:-$HOME/.cache/gst-dpir-ray-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import ray' 2>/dev/null; then
  echo "restore-distributed.sh: no Ray virtual environment in $venv: create it with tests/setup-ray.sh" \
    "(or point DPIR_RAY_VENV at one with ray and python3-gi)" >&2
  exit 1
fi
# No usage statistics sent to Ray's servers unless asked for.
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$venv/bin/python" -m dpir_ray "$@"
