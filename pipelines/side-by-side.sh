#!/usr/bin/env bash
# Before/after preview: the original (upscaled to the restored size) on the left, the restored
# film on the right, in one MP4.
#   pipelines/side-by-side.sh ORIGINAL RESTORED.mp4 OUT.mp4
set -euo pipefail
orig=$1 restored=$2 out=$3
read -r w h < <(gst-discoverer-1.0 "$restored" | awk '/Width:/{w=$2} /Height:/{h=$2} END{print w, h}')
gst-launch-1.0 -e compositor name=comp background=black sink_1::xpos="$w" ! videoconvert ! \
    video/x-raw,format=I420 ! x264enc speed-preset=fast psy-tune=film ! h264parse ! mp4mux ! filesink location="$out" \
  filesrc location="$orig" ! decodebin ! videoconvert ! videoscale method=lanczos ! \
    video/x-raw,width="$w",height="$h",pixel-aspect-ratio=1/1 ! queue ! comp.sink_0 \
  filesrc location="$restored" ! decodebin ! videoconvert ! queue ! comp.sink_1
