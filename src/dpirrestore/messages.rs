//! What the element tells the application on the bus (`dpir-clip`, `dpir-progress`, Progress
//! while the model loads, QoS for skipped frames), and the `dpir-clip` event it takes.

use gst::prelude::*;

use crate::clip::{ClipPosition, ClipRequest};

/// `dpir-clip`: a clip starts at this frame.
pub fn clip(src: &gst::Element, pos: &ClipPosition, frame_index: u64, pts: Option<gst::ClockTime>) {
    let Some(reason) = pos.reason else { return };
    let s = gst::Structure::builder("dpir-clip")
        .field("index", pos.clip_index)
        .field("start-pts", pts)
        .field("reason", reason.as_str())
        .field("frame-index", frame_index)
        .field("difference", pos.difference)
        .build();
    let _ = src.post_message(gst::message::Element::builder(s).src(src).build());
}

/// `dpir-progress`: a frame is done; `eta` (seconds) and `percent` when the duration is known.
pub fn progress(
    src: &gst::Element,
    frame_index: u64,
    frames_done: u64,
    fps: f64,
    pts: Option<gst::ClockTime>,
    duration: Option<gst::ClockTime>,
    rate: gst::Fraction,
) {
    let mut s = gst::Structure::builder("dpir-progress")
        .field("frame-index", frame_index)
        .field("frames-done", frames_done)
        .field("fps", fps)
        .field("pts", pts)
        .build();
    if let (Some(dur), Some(pts)) = (duration, pts)
        && rate.numer() > 0
        && rate.denom() > 0
    {
        let remaining = dur.saturating_sub(pts).seconds_f64() * rate.numer() as f64 / rate.denom() as f64;
        s.set("eta", (remaining - 1.0).max(0.0) / fps);
        s.set("percent", (pts.seconds_f64() / dur.seconds_f64().max(1e-9) * 100.0).min(100.0));
    }
    let _ = src.post_message(gst::message::Element::builder(s).src(src).build());
}

/// A Progress message about loading the model (`load-model`).
pub fn load(src: &gst::Element, kind: gst::ProgressType, text: &str) {
    let _ = src.post_message(gst::message::Progress::builder(kind, "load-model", text).src(src).build());
}

/// A QoS message for a frame skipped because it was late (`qos=true`).
pub fn qos_skipped(
    src: &gst::Element,
    buffer: &gst::Buffer,
    segment: &gst::FormattedSegment<gst::ClockTime>,
    processed: u64,
    dropped: u64,
) {
    let msg = gst::message::Qos::builder(false)
        .running_time(buffer.pts().and_then(|p| segment.to_running_time(p)))
        .stream_time(buffer.pts().and_then(|p| segment.to_stream_time(p)))
        .timestamp(buffer.pts())
        .duration(buffer.duration())
        .stats(gst::format::Buffers::from_u64(processed), gst::format::Buffers::from_u64(dropped))
        .src(src)
        .build();
    let _ = src.post_message(msg);
}

/// The `dpir-clip` custom event an application (an editor) sends to start a new clip,
/// optionally with its prompt: a downstream (serialized, or out-of-band: it is then still
/// applied in stream order) custom event whose structure is named `dpir-clip` with an optional
/// string field `prompt`. Upstream, the same structure as a custom upstream event works too.
pub fn parse_clip_event(event: &gst::Event) -> Option<ClipRequest> {
    let s = event.structure()?;
    if s.name() != "dpir-clip" {
        return None;
    }
    Some(ClipRequest { prompt: s.get::<String>("prompt").ok() })
}
