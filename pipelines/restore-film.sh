#!/usr/bin/env bash
# Restore a film file into a new file, keeping its audio: the audio goes around dpirrestore,
# untouched. Extra arguments are dpirrestore properties.
#   pipelines/restore-film.sh IN.ogv OUT.mp4 scale=2 steps=4
# OUT ending in .mkv is lossless: FFV1 in Matroska (8-bit RGB output as BGRx, with alpha as
# BGRA, 16-bit as 12-bit GBR), audio as FLAC. OUT ending in .mp4 is H.264 (I420) with AAC audio, at
# constant quality: x264 CRF $DPIR_X264_CRF (default 18; 0 is best, 51 worst), the settings
# restore-distributed.sh encodes each chunk with, so that both give the same quality.
# The file is written beside OUT under a temporary name and renamed when complete: a failed or
# interrupted run leaves no OUT (an older OUT stays as it was).
# The queue after dpirrestore gives the encoder its own thread: it encodes beside the model, and x264
# in the element's streaming thread was measured to write other bits for the same frames from run to run.
# The pipeline runs through pipelines/lib/launch.py (gst-launch-1.0's syntax and -m/-e options;
# GStreamer 1.22's gst-launch can wait forever when an error comes while the pipeline starts),
# with PyGObject's Python: $DPIR_PYTHON, default Debian's /usr/bin/python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
launch() { "${DPIR_PYTHON:-/usr/bin/python3}" "$here/lib/launch.py" "$@"; }
die() { echo "restore-film.sh: $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: restore-film.sh IN OUT.mkv|OUT.mp4 [dpirrestore properties…]"
in=$1 out=$2; shift 2
[ -f "$in" ] && [ -r "$in" ] || die "cannot read the input file '$in'"
case "$out" in
  *.mkv)
    video_tail=(videoconvert ! 'video/x-raw,format={BGRx,BGRA,GBR_12LE,GBRA_12LE}' ! avenc_ffv1 ! queue)
    audio_enc=(flacenc)
    mux=matroskamux ;;
  *.mp4)
    video_tail=(videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=medium psy-tune=film pass=qual "quantizer=${DPIR_X264_CRF:-18}" ! h264parse ! queue)
    audio_enc=(avenc_aac ! aacparse)
    mux=mp4mux ;;
  *) die "OUT must end in .mkv (lossless FFV1) or .mp4 (H.264): '$out'" ;;
esac
command -v gst-discoverer-1.0 >/dev/null ||
  die "gst-discoverer-1.0 is missing (Debian gstreamer1.0-plugins-base-apps; tests/setup-debian.sh installs it)"
info=$(gst-discoverer-1.0 "$in" 2>&1 || true)
if grep -q "An error was encountered" <<<"$info"; then
  die "'$in' is not a media file GStreamer can read: $(grep -A1 "An error was encountered" <<<"$info" | tail -1 | sed 's/^ *//')"
fi
grep -qE "^ *video( #[0-9]+)?:" <<<"$info" || die "'$in' has no video stream"

dir=$(dirname -- "$out")
[ -d "$dir" ] || die "the output directory '$dir' does not exist"
tmp="$dir/.$(basename -- "$out").part-$$"
trap 'rm -f -- "$tmp"' EXIT
{ : >"$tmp"; } 2>/dev/null || die "cannot write in the output directory '$dir' (read-only or full?)"

# With -e, an interrupted run still closes its file properly: a run interrupted
# (SIGINT/SIGTERM) is nonetheless discarded, as a truncated film is not the film.
interrupted=
trap 'interrupted=1' INT TERM
status=0
if grep -qE "^ *audio( #[0-9]+)?:" <<<"$info"; then
  launch ${GST_LAUNCH_OPTS:-} -e filesrc location="$in" ! decodebin name=dec \
    dec. ! video/x-raw ! queue max-size-buffers=4 ! videoconvert ! dpirrestore "$@" ! queue ! "${video_tail[@]}" ! \
      $mux name=mux ! filesink location="$tmp" \
    dec. ! audio/x-raw ! queue max-size-time=0 max-size-buffers=0 max-size-bytes=0 ! audioconvert ! audioresample ! \
      "${audio_enc[@]}" ! queue ! mux. || status=$?
else
  launch ${GST_LAUNCH_OPTS:-} -e filesrc location="$in" ! decodebin name=dec \
    dec. ! video/x-raw ! queue max-size-buffers=4 ! videoconvert ! dpirrestore "$@" ! queue ! "${video_tail[@]}" ! \
      $mux ! filesink location="$tmp" || status=$?
fi
[ -z "$interrupted" ] || die "interrupted: '$out' not written"
[ "$status" -eq 0 ] || die "the pipeline failed (exit status $status; the error is above): '$out' not written"
mv -f -- "$tmp" "$out"
