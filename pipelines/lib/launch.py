#!/usr/bin/env python3
"""Run a pipeline written as for gst-launch-1.0 until EOS (exit 0) or an error (exit 1).

    python3 pipelines/lib/launch.py filesrc location=a.jpg ! decodebin ! ... ! filesink location=b.png

Why not gst-launch-1.0 itself: GStreamer 1.22's gst-launch quits its main loop from the bus
sync handler, so an error posted by a streaming thread while the pipeline is still starting
(a parser that finds nothing in a broken file, during preroll) can arrive before the loop runs;
the quit is lost and gst-launch waits forever (seen here about once in 30 runs on a loaded
machine). Popping messages off the bus cannot miss one. Errors and warnings are printed as
gst-launch prints them.
"""
import sys

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402


def describe(msg, what):
    err, dbg = msg.parse_error() if what == "ERROR" else msg.parse_warning()
    text = f"{what}: from element {msg.src.get_path_string()}: {err.message}"
    return text + (f"\nAdditional debug info:\n{dbg}" if dbg else "")


def main(argv):
    Gst.init(None)
    try:
        pipeline = Gst.parse_launchv(argv)
    except GLib.Error as e:
        print(f"launch: ERROR: bad pipeline: {e.message}", file=sys.stderr)
        return 1
    bus = pipeline.get_bus()
    types = Gst.MessageType.EOS | Gst.MessageType.ERROR | Gst.MessageType.WARNING | Gst.MessageType.LATENCY
    rc = 1
    try:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            # The element that failed has posted its error: report it (or say so if it did not).
            msg = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.ERROR)
            print(describe(msg, "ERROR") if msg else "launch: ERROR: the pipeline does not start", file=sys.stderr)
            return 1
        while True:
            msg = bus.timed_pop_filtered(Gst.CLOCK_TIME_NONE, types)
            if msg.type == Gst.MessageType.EOS:
                rc = 0
                break
            if msg.type == Gst.MessageType.ERROR:
                print(describe(msg, "ERROR"), file=sys.stderr)
                break
            if msg.type == Gst.MessageType.WARNING:
                print(describe(msg, "WARNING"), file=sys.stderr)
            elif msg.type == Gst.MessageType.LATENCY:
                pipeline.recalculate_latency()
    finally:
        pipeline.set_state(Gst.State.NULL)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
