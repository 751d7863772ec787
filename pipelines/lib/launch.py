#!/usr/bin/env python3
"""Run a pipeline written as for gst-launch-1.0 until EOS (exit 0) or an error (exit 1).

    python3 pipelines/lib/launch.py [-m] [-e] filesrc location=a.jpg ! decodebin ! ... ! filesink location=b.png

-m prints every bus message as gst-launch -m does; -e: on SIGINT/SIGTERM send EOS and wait
for it, so that muxers close their files (a second signal stops at once; exit status 130
either way). At EOS it prints "Execution ended after H:MM:SS.nnnnnnnnn", as gst-launch does.

Why not gst-launch-1.0 itself: GStreamer 1.22's gst-launch quits its main loop from the bus
sync handler, so an error posted by a streaming thread while the pipeline is still starting
(a parser that finds nothing in a broken file, during preroll) can arrive before the loop runs;
the quit is lost and gst-launch waits forever (seen here about once in 30 runs on a loaded
machine). Popping messages off the bus cannot miss one. Errors and warnings are printed as
gst-launch prints them.
"""
import signal
import sys
import time

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402


def describe(msg, what):
    err, dbg = msg.parse_error() if what == "ERROR" else msg.parse_warning()
    text = f"{what}: from element {msg.src.get_path_string()}: {err.message}"
    return text + (f"\nAdditional debug info:\n{dbg}" if dbg else "")


def show(msg):
    """One bus message as gst-launch -m prints it."""
    src = msg.src
    kind = "element" if isinstance(src, Gst.Element) else "object"
    name = src.get_name() if src is not None else "?"
    s = msg.get_structure()
    details = s.to_string() if s is not None else "no message details"
    print(f'Got message #{msg.seqnum} from {kind} "{name}" ({Gst.MessageType.get_name(msg.type)}): {details}', flush=True)


def main(argv):
    opts = {"-m": False, "-e": False}
    while argv and argv[0] in opts:
        opts[argv.pop(0)] = True
    Gst.init(None)
    try:
        pipeline = Gst.parse_launchv(argv)
    except GLib.Error as e:
        print(f"launch: ERROR: bad pipeline: {e.message}", file=sys.stderr)
        return 1
    bus = pipeline.get_bus()
    types = Gst.MessageType.EOS | Gst.MessageType.ERROR | Gst.MessageType.WARNING | Gst.MessageType.LATENCY
    if opts["-m"]:
        types = Gst.MessageType.ANY
    signals = []

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) == 1 and opts["-e"]:
            print("launch: interrupted: sending EOS so that the output is closed...", file=sys.stderr)
            pipeline.send_event(Gst.Event.new_eos())

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    rc = 1
    t0 = time.monotonic()
    try:
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            # The element that failed has posted its error: report it (or say so if it did not).
            msg = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.ERROR)
            print(describe(msg, "ERROR") if msg else "launch: ERROR: the pipeline does not start", file=sys.stderr)
            return 1
        while True:
            # A bounded wait, so that signal handlers run (Python runs them between calls).
            msg = bus.timed_pop_filtered(100 * Gst.MSECOND, types)
            if signals and (len(signals) > 1 or not opts["-e"]):
                rc = 130
                break
            if msg is None:
                continue
            if opts["-m"]:
                show(msg)
            if msg.type == Gst.MessageType.EOS:
                rc = 130 if signals else 0
                ns = int((time.monotonic() - t0) * 1e9)
                print(f"Execution ended after {ns // 3_600_000_000_000}:{ns // 60_000_000_000 % 60:02}:"
                      f"{ns // 1_000_000_000 % 60:02}.{ns % 1_000_000_000:09}", flush=True)
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
