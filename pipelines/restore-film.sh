#!/usr/bin/env bash
# Restore a film file into a new MP4 (H.264), keeping its audio: the audio goes around
# dpirrestore, untouched. Extra arguments are dpirrestore properties.
#   pipelines/restore-film.sh IN.ogv OUT.mp4 scale=2 steps=4
set -euo pipefail
in=$1 out=$2; shift 2
props="$*"
if gst-discoverer-1.0 "$in" 2>/dev/null | grep -qE "audio( #[0-9]+)?:"; then
  gst-launch-1.0 ${GST_LAUNCH_OPTS:-} -e filesrc location="$in" ! decodebin name=dec \
    dec. ! queue max-size-buffers=4 ! videoconvert ! dpirrestore $props ! videoconvert ! \
      video/x-raw,format=I420 ! x264enc speed-preset=medium psy-tune=film ! h264parse ! queue ! mp4mux name=mux ! filesink location="$out" \
    dec. ! queue max-size-time=0 max-size-buffers=0 max-size-bytes=0 ! audioconvert ! audioresample ! \
      avenc_aac ! aacparse ! queue ! mux.
else
  gst-launch-1.0 ${GST_LAUNCH_OPTS:-} -e filesrc location="$in" ! decodebin ! queue max-size-buffers=4 ! videoconvert ! \
    dpirrestore $props ! videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=medium psy-tune=film ! h264parse ! mp4mux ! \
    filesink location="$out"
fi
