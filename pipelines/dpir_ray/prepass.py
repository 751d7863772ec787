"""The driver's pre-pass: the film decoded once as restore-film.sh decodes it, through the element
in analyse-only mode (its scene detector, no model), recording every frame's timestamps and a CRC of
its pixels as the element receives them."""

import time

from .gst import Gst, decode_head, error_text, frame_crc, make, restorer
from .plan import Fail


def prepass(location, props, say):
    """{"caps_in", "frames": [{pts, dur, rt, st, crc}], "clips": [{index, frame, reason}], "seconds"}."""
    pipeline = Gst.Pipeline.new("prepass")
    frames, clips = [], []
    caps_in = {}
    restore = restorer(props, ["analyse-only=true"])

    def probe(pad, info):
        if "error" in caps_in:
            return Gst.PadProbeReturn.OK
        try:
            record(pad, info)
        except Exception as e:  # noqa: BLE001 (a probe cannot raise: the error is reported after the pass)
            caps_in["error"] = str(e)
        return Gst.PadProbeReturn.OK

    def record(pad, info):
        buf = info.get_buffer()
        caps = pad.get_current_caps()
        if "caps" not in caps_in:
            caps_in["caps"] = caps.to_string()
        ev = pad.get_sticky_event(Gst.EventType.SEGMENT, 0)
        seg = ev.parse_segment() if ev else None
        pts = buf.pts
        if pts == Gst.CLOCK_TIME_NONE or seg is None:
            caps_in["error"] = f"frame {len(frames)} has no timestamp: chunks cannot be sought"
            return
        frames.append(
            {
                "pts": pts,
                "dur": buf.duration if buf.duration != Gst.CLOCK_TIME_NONE else -1,
                "rt": seg.to_running_time(Gst.Format.TIME, pts),
                "st": seg.to_stream_time(Gst.Format.TIME, pts),
                "crc": frame_crc(buf, caps),
            }
        )

    restore.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, probe)
    decode_head(
        pipeline,
        location,
        lambda: [make("queue", max_size_buffers=4), make("videoconvert"), restore, make("videoconvert"),
                 make("fakesink", sync=False)],
    )
    bus = pipeline.get_bus()
    t0 = last = time.monotonic()
    pipeline.set_state(Gst.State.PLAYING)
    try:
        while True:
            msg = bus.timed_pop(200 * Gst.MSECOND)
            if "error" in caps_in:
                break
            if time.monotonic() - last > 10:
                last = time.monotonic()
                say(f"analysing: {len(frames)} frames…")
            if msg is None:
                continue
            if msg.type == Gst.MessageType.ERROR:
                raise Fail(f"cannot decode {location}: {error_text(msg)}")
            if msg.type == Gst.MessageType.EOS:
                break
            if msg.type == Gst.MessageType.ELEMENT:
                s = msg.get_structure()
                if s is not None and s.get_name() == "dpir-clip":
                    clips.append(
                        {"index": s.get_value("index"), "frame": s.get_value("frame-index"),
                         "reason": s.get_string("reason")}
                    )
    finally:
        pipeline.set_state(Gst.State.NULL)
    if "error" in caps_in:
        raise Fail(f"{location}: {caps_in['error']}")
    if not frames:
        raise Fail(f"{location}: no video frame could be decoded")
    if any(b["pts"] <= a["pts"] for a, b in zip(frames, frames[1:])):
        raise Fail(f"{location}: frame timestamps are not strictly increasing: chunks cannot be sought")
    if any(b["rt"] <= a["rt"] for a, b in zip(frames, frames[1:])):
        raise Fail(f"{location}: frame running times are not strictly increasing: the film cannot be joined")
    if not clips or clips[0]["frame"] != 0:
        raise Fail("the pre-pass found no clip starting at the first frame (dpirrestore too old?)")
    return {"caps_in": caps_in["caps"], "frames": frames, "clips": clips, "seconds": time.monotonic() - t0}
