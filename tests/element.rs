//! `dpirrestore` as a GStreamer element, driven by `gst_check::Harness` with test engines
//! (the engines are in this file: they upscale by nearest neighbour, optionally slowly, or
//! fail on purpose). The real DPIR engine is exercised by `tests/pipeline.rs`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use gst::glib;
use gst::prelude::*;
use gst_check::Harness;
use gstdpir::dpirrestore::DpirRestore;
use gstdpir::engine::{
    EngineError, EngineSettings, Frame, FrameContext, FrameTimings, Image, RestoreEngine, Restored, StreamInfo,
};

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstdpir::plugin_register_static().expect("register dpir plugin");
    });
}

/// Nearest-neighbour "restoration", with an optional per-frame delay and shared counters.
struct TestEngine {
    scale: usize,
    delay: Duration,
    fail_at: Option<u64>,
    calls: Arc<AtomicUsize>,
    contexts: Arc<Mutex<Vec<FrameContext>>>,
    gate: Option<Gate>,
}

/// Holds the engine inside `restore` until opened (a frame "in progress" for as long as a test
/// needs).
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cond) = &*self.0;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cond.wait(o).unwrap();
        }
    }
    fn open(&self) {
        let (open, cond) = &*self.0;
        *open.lock().unwrap() = true;
        cond.notify_all();
    }
}

/// Opens its gate when dropped: a failing test never leaves the engine (and the pushing thread)
/// waiting.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Wait (at most 10 s) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl RestoreEngine for TestEngine {
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        self.scale = info.scale;
        Ok(())
    }
    fn restore(&mut self, frame: Frame, ctx: &FrameContext) -> Result<Restored, EngineError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.contexts.lock().unwrap().push(ctx.clone());
        if Some(ctx.index) == self.fail_at {
            return Err(EngineError::Stream(format!("test engine: failing on frame {} as asked", ctx.index)));
        }
        if let Some(g) = &self.gate {
            g.wait();
        }
        std::thread::sleep(self.delay);
        let image = Image::upscale_nearest(&frame, self.scale);
        Ok(Restored { image, timings: FrameTimings::default(), warnings: Vec::new() })
    }
}

#[derive(Clone, Default)]
struct Probe {
    calls: Arc<AtomicUsize>,
    contexts: Arc<Mutex<Vec<FrameContext>>>,
    /// Engines built.
    loads: Arc<AtomicUsize>,
}

fn element_with_test_engine(delay_ms: u64, fail_at: Option<u64>) -> (gst::Element, Probe) {
    element_with_gated_engine(delay_ms, fail_at, None)
}

fn element_with_gated_engine(delay_ms: u64, fail_at: Option<u64>, gate: Option<Gate>) -> (gst::Element, Probe) {
    init();
    let element = gst::ElementFactory::make("dpirrestore").build().unwrap();
    let probe = Probe::default();
    let p = probe.clone();
    element.downcast_ref::<DpirRestore>().unwrap().set_engine_factory(move |_s: &EngineSettings| {
        p.loads.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(TestEngine {
            scale: 1,
            delay: Duration::from_millis(delay_ms),
            fail_at,
            calls: p.calls.clone(),
            contexts: p.contexts.clone(),
            gate: gate.clone(),
        }) as Box<dyn RestoreEngine>)
    });
    (element, probe)
}

fn caps(format: &str, w: i32, h: i32) -> gst::Caps {
    gst::Caps::builder("video/x-raw")
        .field("format", format)
        .field("width", w)
        .field("height", h)
        .field("framerate", gst::Fraction::new(25, 1))
        .field("pixel-aspect-ratio", gst::Fraction::new(1, 1))
        .field("interlace-mode", "progressive")
        .build()
}

/// An RGB frame with a recognisable pattern, padded rows (stride multiple of 4).
fn rgb_buffer(w: usize, h: usize, i: u64) -> gst::Buffer {
    let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, w as u32, h as u32).build().unwrap();
    let stride = info.stride()[0] as usize;
    let mut data = vec![0u8; info.size()];
    for y in 0..h {
        for x in 0..w * 3 {
            data[y * stride + x] = ((x + y * 7 + i as usize * 13) % 256) as u8;
        }
    }
    let mut buf = gst::Buffer::from_mut_slice(data);
    {
        let b = buf.get_mut().unwrap();
        b.set_pts(gst::ClockTime::from_mseconds(40 * i));
        b.set_duration(gst::ClockTime::from_mseconds(40));
        if i.is_multiple_of(5) {
            b.set_flags(gst::BufferFlags::DISCONT);
        }
    }
    buf
}

fn harness(element: &gst::Element) -> Harness {
    let mut h = Harness::with_element(element, Some("sink"), Some("src"));
    h.play();
    h
}

#[test]
fn test_engine_caps_scale_output_size_in_both_directions() {
    for scale in [1u32, 2, 4] {
        let (element, _) = element_with_test_engine(0, None);
        element.set_property("scale", scale);
        let mut h = harness(&element);
        // Upstream → downstream: fixed input gives input × scale.
        h.set_src_caps(caps("RGB", 30, 20));
        h.push(rgb_buffer(30, 20, 0)).unwrap();
        let out = h.pull().unwrap();
        let out_caps = h.sinkpad().unwrap().current_caps().unwrap();
        let s = out_caps.structure(0).unwrap();
        assert_eq!(s.get::<i32>("width").unwrap(), 30 * scale as i32, "scale {scale}");
        assert_eq!(s.get::<i32>("height").unwrap(), 20 * scale as i32, "scale {scale}");
        assert_eq!(s.get::<gst::Fraction>("pixel-aspect-ratio").unwrap(), gst::Fraction::new(1, 1));
        let info = gst_video::VideoInfo::from_caps(&out_caps).unwrap();
        assert_eq!(out.size(), info.size());

        // Downstream → upstream: a fixed downstream size constrains the input to size / scale.
        let (element, _) = element_with_test_engine(0, None);
        element.set_property("scale", scale);
        let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
        h.set_sink_caps(caps("RGB", 64, 48));
        let upstream = element.static_pad("sink").unwrap().query_caps(None);
        let s = upstream.structure(0).unwrap();
        assert_eq!(s.get::<i32>("width").unwrap(), 64 / scale as i32, "scale {scale}: {upstream}");
        assert_eq!(s.get::<i32>("height").unwrap(), 48 / scale as i32, "scale {scale}: {upstream}");
        // And the source side offers the scaled upstream range.
        let downstream = element.static_pad("src").unwrap().query_caps(None);
        assert!(!downstream.is_empty());
    }
}

#[test]
fn test_engine_downstream_size_not_divisible_by_scale_is_refused_upstream() {
    let (element, _) = element_with_test_engine(0, None);
    element.set_property("scale", 4u32);
    let mut h = Harness::with_element(&element, Some("sink"), Some("src"));
    h.set_sink_caps(caps("RGB", 66, 48));
    let upstream = element.static_pad("sink").unwrap().query_caps(None);
    assert!(upstream.is_empty(), "66 px is not a multiple of 4: {upstream}");
}

#[test]
fn test_engine_interlaced_caps_are_refused_with_a_message_naming_deinterlace() {
    let (element, _) = element_with_test_engine(0, None);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut h = harness(&element);
    let interlaced = gst::Caps::builder("video/x-raw")
        .field("format", "RGB")
        .field("width", 32)
        .field("height", 32)
        .field("framerate", gst::Fraction::new(25, 1))
        .field("interlace-mode", "interleaved")
        .build();
    // The caps event fails and the element explains why.
    h.push_event(gst::event::StreamStart::new("s"));
    // (A sticky event's push result reflects storage, not acceptance: check the bus.)
    h.push_event(gst::event::Caps::new(&interlaced));
    let msg =
        bus.timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error]).expect("error message");
    let gst::MessageView::Error(err) = msg.view() else { unreachable!() };
    assert!(err.error().to_string().contains("deinterlace"), "{}", err.error());
}

#[test]
fn test_engine_every_buffer_out_with_same_timestamps_and_flags_across_eos() {
    // A slow engine and a deep queue: EOS arrives while frames are still queued.
    let (element, probe) = element_with_test_engine(30, None);
    element.set_property("max-inflight", 8u32);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 17, 9)); // odd sizes
    let n = 8u64;
    let inputs: Vec<gst::Buffer> = (0..n).map(|i| rgb_buffer(17, 9, i)).collect();
    for b in &inputs {
        h.push(b.clone()).unwrap();
    }
    assert!(h.push_event(gst::event::Eos::new()));
    for (i, inbuf) in inputs.iter().enumerate() {
        let out = h.pull().unwrap_or_else(|_| panic!("frame {i} missing"));
        assert_eq!(out.pts(), inbuf.pts(), "frame {i}");
        assert_eq!(out.duration(), inbuf.duration(), "frame {i}");
        assert_eq!(out.flags(), inbuf.flags(), "frame {i}");
    }
    // EOS comes after every frame.
    loop {
        let ev = h.pull_event().unwrap();
        if ev.type_() == gst::EventType::Eos {
            break;
        }
    }
    assert!(h.try_pull().is_none());
    assert_eq!(probe.calls.load(Ordering::SeqCst), n as usize);
}

#[test]
fn test_engine_output_pixels_follow_the_plane_stride() {
    let (element, _) = element_with_test_engine(0, None);
    element.set_property("scale", 2u32);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 5, 3)); // 15 bytes per row, stride 16
    let inbuf = rgb_buffer(5, 3, 2);
    let out = h.push_and_pull(inbuf.clone()).unwrap();
    let in_info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, 5, 3).build().unwrap();
    let out_info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, 10, 6).build().unwrap();
    let (is, os) = (in_info.stride()[0] as usize, out_info.stride()[0] as usize);
    let inmap = inbuf.map_readable().unwrap();
    let outmap = out.map_readable().unwrap();
    for y in 0..6 {
        for x in 0..10 {
            for c in 0..3 {
                assert_eq!(outmap[y * os + x * 3 + c], inmap[(y / 2) * is + (x / 2) * 3 + c], "({x},{y},{c})");
            }
        }
    }
}

#[test]
fn test_engine_flush_discards_queued_frames_and_later_frames_all_come_out() {
    let (element, probe) = element_with_test_engine(50, None);
    element.set_property("max-inflight", 4u32);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 16, 16));
    for i in 0..4 {
        h.push(rgb_buffer(16, 16, i)).unwrap();
    }
    // Seek-style flush while frames are queued.
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    // Drain whatever made it out before the flush.
    while h.try_pull().is_some() {}
    let before = probe.calls.load(Ordering::SeqCst);
    assert!(before < 4, "flush should discard queued frames, {before} were processed");

    let mut seg = gst::FormattedSegment::<gst::ClockTime>::new();
    seg.set_start(gst::ClockTime::from_seconds(10));
    h.push_event(gst::event::Segment::new(&seg));
    let later: Vec<gst::Buffer> = (250..256).map(|i| rgb_buffer(16, 16, i)).collect();
    for b in &later {
        h.push(b.clone()).unwrap();
    }
    h.push_event(gst::event::Eos::new());
    for b in &later {
        let out = h.pull().unwrap();
        assert_eq!(out.pts(), b.pts(), "no frame from before the flush may leak after it");
    }
    // The first frame after the flush starts a new clip.
    let ctxs = probe.contexts.lock().unwrap();
    let first_after = &ctxs[ctxs.len() - later.len()];
    assert!(first_after.new_clip.is_some());
    assert_eq!(first_after.index, 0);
}

#[test]
fn test_engine_caps_change_mid_stream_renegotiates_the_output_size() {
    let (element, _) = element_with_test_engine(0, None);
    element.set_property("scale", 2u32);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 16, 8));
    for i in 0..3 {
        let out = h.push_and_pull(rgb_buffer(16, 8, i)).unwrap();
        assert_eq!(out.size(), gst_video::VideoInfo::from_caps(&caps("RGB", 32, 16)).unwrap().size());
    }
    h.set_src_caps(caps("RGB", 24, 12));
    for i in 3..6 {
        let out = h.push_and_pull(rgb_buffer(24, 12, i)).unwrap();
        let cur = h.sinkpad().unwrap().current_caps().unwrap();
        assert_eq!(cur.structure(0).unwrap().get::<i32>("width").unwrap(), 48);
        assert_eq!(out.size(), gst_video::VideoInfo::from_caps(&cur).unwrap().size());
    }
}

#[test]
fn test_engine_latency_query_adds_the_measured_processing_time() {
    let (element, _) = element_with_test_engine(40, None);
    let mut h = harness(&element);
    h.set_upstream_latency(gst::ClockTime::from_mseconds(10));
    h.set_src_caps(caps("RGB", 8, 8));
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    let latency = h.query_latency().expect("latency answered");
    // 10 ms upstream + the frame's measured time (the engine sleeps 40 ms).
    let ms = latency.mseconds();
    assert!((50..150).contains(&ms), "latency {latency}");
}

#[test]
fn test_engine_failure_becomes_an_element_error_not_a_panic() {
    let (element, _) = element_with_test_engine(0, Some(2));
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    h.push(rgb_buffer(8, 8, 0)).unwrap();
    h.push(rgb_buffer(8, 8, 1)).unwrap();
    h.push(rgb_buffer(8, 8, 2)).unwrap();
    let msg = bus.timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error]).expect("error");
    let gst::MessageView::Error(err) = msg.view() else { unreachable!() };
    assert!(err.error().to_string().contains("failing on frame 2"), "{}", err.error());
    // Upstream learns it on a following push (once the worker has recorded the flow).
    let mut i = 3;
    wait_until("upstream sees the error", || {
        i += 1;
        h.push(rgb_buffer(8, 8, i)) == Err(gst::FlowError::Error)
    });
}

#[test]
fn test_engine_load_failure_is_an_element_error_and_the_pipeline_ends() {
    init();
    let pipeline = gst::parse::launch(
        "videotestsrc num-buffers=3 ! video/x-raw,format=RGB,width=32,height=32 ! dpirrestore name=d ! fakesink",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let d = pipeline.by_name("d").unwrap();
    d.downcast_ref::<DpirRestore>().unwrap().set_engine_factory(|_s: &EngineSettings| {
        Err(EngineError::Load(gstdpir::engine::LoadError::Invalid(
            "model.json not found in /nonexistent: point `model` at a model directory".into(),
        )))
    });
    let _ = pipeline.set_state(gst::State::Playing);
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(gst::ClockTime::from_seconds(10), &[gst::MessageType::Error, gst::MessageType::Eos])
        .expect("pipeline must end");
    let gst::MessageView::Error(err) = msg.view() else { panic!("expected an error, got {msg:?}") };
    assert!(err.error().to_string().contains("model.json not found"), "{}", err.error());
    pipeline.set_state(gst::State::Null).unwrap();
}

#[test]
fn test_engine_qos_skips_late_frames_only_when_enabled() {
    for qos in [false, true] {
        let (element, probe) = element_with_test_engine(0, None);
        element.set_property("qos", qos);
        let mut h = harness(&element);
        h.set_src_caps(caps("RGB", 8, 8));
        h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
        // Downstream says: everything before 10 s is late.
        h.push_upstream_event(gst::event::Qos::new(gst::QOSType::Underflow, 2.0, 0, gst::ClockTime::from_seconds(10)));
        for i in 1..5 {
            h.push(rgb_buffer(8, 8, i)).unwrap();
        }
        h.push_event(gst::event::Eos::new());
        let mut out = 0;
        while h.pull_until_eos().ok().flatten().is_some() {
            out += 1;
        }
        if qos {
            assert_eq!(out, 0, "late frames are skipped with qos=true");
            assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
        } else {
            assert_eq!(out, 4, "no frame is dropped by default");
        }
    }
}

#[test]
fn test_engine_progress_and_clip_messages_reach_the_bus() {
    let (element, _) = element_with_test_engine(0, None);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    for i in 0..3 {
        h.push_and_pull(rgb_buffer(8, 8, i)).unwrap();
    }
    let mut progress = 0;
    let mut clips = 0;
    while let Some(msg) = bus.pop() {
        if let Some(s) = msg.structure() {
            match s.name().as_str() {
                "dpir-progress" => {
                    progress += 1;
                    assert_eq!(s.get::<u64>("frames-done").unwrap(), progress);
                    assert!(s.get::<f64>("fps").unwrap() > 0.0);
                }
                "dpir-clip" => {
                    clips += 1;
                    assert_eq!(s.get::<&str>("reason").unwrap(), "start");
                }
                _ => {}
            }
        }
    }
    assert_eq!((progress, clips), (3, 1));
}

#[test]
fn test_engine_clip_event_from_an_application_starts_a_clip_with_its_prompt() {
    let (element, probe) = element_with_test_engine(0, None);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    let s = gst::Structure::builder("dpir-clip").field("prompt", "a 1906 racing car").build();
    assert!(h.push_event(gst::event::CustomDownstream::new(s)));
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    let ctxs = probe.contexts.lock().unwrap();
    assert_eq!(ctxs[1].new_clip, None);
    assert_eq!(ctxs[2].new_clip, Some(gstdpir::engine::ClipReason::Event));
    assert_eq!(ctxs[2].clip_index, 1);
    assert_eq!(ctxs[2].prompt, "a 1906 racing car");
}

/// A property's default as the README writes it: enum nick, number, `true`/`false`, string, or
/// `—` for an unset string.
fn shown(v: &glib::Value) -> String {
    if let Ok(Some(s)) = v.get::<Option<String>>() {
        return s;
    }
    if v.get::<Option<String>>().is_ok() {
        return "—".into();
    }
    if let Some((_, e)) = glib::EnumValue::from_value(v) {
        return e.nick().to_string();
    }
    for f in [
        |v: &glib::Value| v.get::<bool>().ok().map(|b| b.to_string()),
        |v: &glib::Value| v.get::<u32>().ok().map(|n| n.to_string()),
        |v: &glib::Value| v.get::<i32>().ok().map(|n| n.to_string()),
        |v: &glib::Value| v.get::<u64>().ok().map(|n| n.to_string()),
        |v: &glib::Value| v.get::<f64>().ok().map(|n| n.to_string()),
    ] {
        if let Some(s) = f(v) {
            return s;
        }
    }
    panic!("unexpected property type {:?}", v.type_())
}

/// README's property table is the one table of properties and defaults: every property of the
/// element is in it with the default `gst-inspect-1.0` shows, and nothing else is; each has a
/// blurb.
#[test]
fn every_property_is_in_the_readme_table_with_its_default_and_has_a_blurb() {
    init();
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table: Vec<(String, String)> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| property | default |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].trim_matches('`').to_string())
        })
        .collect();
    assert!(table.len() > 10, "README has no property table");
    let element = gst::ElementFactory::make("dpirrestore").build().unwrap();
    let props: Vec<glib::ParamSpec> =
        element.list_properties().into_iter().filter(|p| p.owner_type() == DpirRestore::static_type()).collect();
    for p in &props {
        let row = table.iter().find(|(n, _)| n == p.name());
        let (_, default) = row.unwrap_or_else(|| panic!("property {} is missing from README's table", p.name()));
        assert_eq!(&shown(p.default_value()), default, "default of {}", p.name());
        assert_eq!(&shown(&element.property_value(p.name())), default, "initial value of {}", p.name());
        assert!(p.blurb().is_some_and(|b| b.len() > 10), "{} needs a blurb", p.name());
    }
    for (name, _) in &table {
        assert!(props.iter().any(|p| p.name() == name), "README lists {name}, which the element does not have");
    }
    let factory = gst::ElementFactory::find("dpirrestore").unwrap();
    assert_eq!(factory.metadata(gst::ELEMENT_METADATA_KLASS), Some("Filter/Effect/Video"));
}

/// Values the element cannot honour are refused when it starts, with the reason.
#[test]
fn test_engine_scale_3_and_an_unknown_device_are_refused_with_the_reason() {
    for (prop, value, words) in [("scale", "3", "scale=3"), ("device", "gpu0", "unknown device")] {
        init();
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers=2 ! video/x-raw,format=RGB,width=32,height=32 ! dpirrestore name=d {prop}={value} ! fakesink"
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let d = pipeline.by_name("d").unwrap();
        assert_eq!(shown(&d.property_value(prop)), value, "the value set is kept, not coerced");
        d.downcast_ref::<DpirRestore>().unwrap().set_engine_factory(|_s: &EngineSettings| {
            Ok(Box::new(TestEngine {
                scale: 1,
                delay: Duration::ZERO,
                fail_at: None,
                calls: Default::default(),
                contexts: Default::default(),
                gate: None,
            }) as Box<dyn RestoreEngine>)
        });
        assert!(pipeline.set_state(gst::State::Playing).is_err(), "{prop}={value} must not start");
        let msg = pipeline
            .bus()
            .unwrap()
            .timed_pop_filtered(gst::ClockTime::from_seconds(5), &[gst::MessageType::Error])
            .expect("an error message");
        let gst::MessageView::Error(err) = msg.view() else { unreachable!() };
        assert!(err.error().to_string().contains(words), "{prop}={value}: {}", err.error());
        pipeline.set_state(gst::State::Null).unwrap();
    }
}

#[test]
fn test_engine_flush_keeps_caps_the_worker_has_not_handled_yet() {
    // The worker is busy with frame 0 while new caps are queued behind it; a flush then
    // discards frames but must keep the caps (sticky), or later frames would be unnegotiated.
    let (element, probe) = element_with_test_engine(200, None);
    element.set_property("max-inflight", 4u32);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    h.push(rgb_buffer(8, 8, 0)).unwrap();
    wait_until("the worker is in frame 0", || probe.calls.load(Ordering::SeqCst) == 1);
    h.push_event(gst::event::Caps::new(&caps("RGB", 12, 10)));
    h.push(rgb_buffer(12, 10, 1)).unwrap();
    assert!(h.push_event(gst::event::FlushStart::new()));
    assert!(h.push_event(gst::event::FlushStop::new(true)));
    h.push_event(gst::event::Segment::new(&gst::FormattedSegment::<gst::ClockTime>::new()));
    h.push(rgb_buffer(12, 10, 2)).expect("frames after the flush are negotiated");
    let out = loop {
        let b = h.pull().unwrap();
        if b.pts() == Some(gst::ClockTime::from_mseconds(80)) {
            break b;
        }
    };
    assert_eq!(out.size(), gst_video::VideoInfo::from_caps(&caps("RGB", 12, 10)).unwrap().size());
}

#[test]
fn test_engine_tag_and_clip_events_never_wait_for_a_frame_and_apply_in_stream_order() {
    // A slow engine (600 ms a frame): while frame 0 is being restored, a title tag (the prompt,
    // with tags-as-prompt) arrives from upstream and a `dpir-clip` request from downstream.
    let (element, probe) = element_with_test_engine(600, None);
    element.set_property("tags-as-prompt", true);
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    h.push(rgb_buffer(8, 8, 0)).unwrap();
    wait_until("the worker started frame 0", || probe.calls.load(Ordering::SeqCst) == 1);
    let t = std::time::Instant::now();
    let mut tags = gst::TagList::new();
    tags.get_mut().unwrap().add::<gst::tags::Title>(&"a 1906 racing car", gst::TagMergeMode::Replace);
    assert!(h.push_event(gst::event::Tag::new(tags)));
    let tag_wait = t.elapsed();
    let t = std::time::Instant::now();
    assert!(h.push_upstream_event(gst::event::CustomUpstream::new(gst::Structure::builder("dpir-clip").build())));
    let clip_wait = t.elapsed();
    assert!(probe.calls.load(Ordering::SeqCst) == 1 && probe.contexts.lock().unwrap().len() == 1, "still in frame 0");
    assert!(tag_wait < Duration::from_millis(150), "the tag event waited {tag_wait:?} for the frame");
    assert!(clip_wait < Duration::from_millis(150), "the clip event waited {clip_wait:?} for the frame");
    h.push(rgb_buffer(8, 8, 1)).unwrap();
    h.pull().unwrap();
    h.pull().unwrap();
    let ctxs = probe.contexts.lock().unwrap();
    // Frame 0 was queued before the tag: it keeps the empty prompt; frame 1 gets the tag's, and
    // starts the clip the downstream request asked for.
    assert_eq!(ctxs[0].prompt, "");
    assert_eq!(ctxs[1].prompt, "a 1906 racing car");
    assert_eq!((ctxs[1].clip_index, ctxs[1].new_clip), (1, Some(gstdpir::engine::ClipReason::Event)));
}

/// `max-inflight` bounds the frames queued behind the one being restored: with the engine held
/// inside frame 0, exactly `max-inflight` more pushes return and the next one blocks (an element
/// ignoring the property would take the default 2 either way).
#[test]
fn test_engine_max_inflight_is_how_many_frames_wait_behind_the_one_in_progress() {
    for max in [1u32, 3] {
        let gate = Gate::default();
        let (element, probe) = element_with_gated_engine(0, None, Some(gate.clone()));
        element.set_property("max-inflight", max);
        let mut h = harness(&element);
        h.set_src_caps(caps("RGB", 8, 8));
        let pad = h.srcpad().unwrap();
        let pushed = Arc::new(AtomicUsize::new(0));
        let p2 = pushed.clone();
        let pusher = std::thread::spawn(move || {
            for i in 0..6 {
                if pad.push(rgb_buffer(8, 8, i)).is_err() {
                    break;
                }
                p2.fetch_add(1, Ordering::SeqCst);
            }
        });
        let open = OpenOnDrop(gate.clone());
        wait_until("the worker is in frame 0", || probe.calls.load(Ordering::SeqCst) == 1);
        let accepted = 1 + max as usize;
        wait_until("the queue is full", || pushed.load(Ordering::SeqCst) >= accepted);
        // The next push waits for the worker: nothing else gets in while frame 0 is held.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(pushed.load(Ordering::SeqCst), accepted, "max-inflight={max}");
        drop(open);
        pusher.join().unwrap();
        assert_eq!(pushed.load(Ordering::SeqCst), 6);
        for _ in 0..6 {
            h.pull().unwrap();
        }
    }
}

/// `scene-threshold` decides which frame differences start a clip: a hard cut (two unrelated
/// frames) starts one at the default and none at 1.0.
#[test]
fn test_engine_scene_threshold_decides_whether_a_cut_starts_a_clip() {
    for (threshold, clips) in [(None, 2), (Some(1.0f64), 1)] {
        let (element, probe) = element_with_test_engine(0, None);
        if let Some(t) = threshold {
            element.set_property("scene-threshold", t);
        }
        let mut h = harness(&element);
        h.set_src_caps(caps("RGB", 32, 32));
        let flat = |v: u8| {
            let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, 32, 32).build().unwrap();
            gst::Buffer::from_mut_slice(vec![v; info.size()])
        };
        for b in [rgb_buffer(32, 32, 0), rgb_buffer(32, 32, 0), flat(0), flat(0)] {
            h.push_and_pull(b).unwrap();
        }
        let ctxs = probe.contexts.lock().unwrap();
        let starts = ctxs.iter().filter(|c| c.new_clip.is_some()).count();
        assert_eq!(starts, clips, "scene-threshold={threshold:?}");
    }
}

/// `prompt` changed while playing applies from the next frame the worker takes: it starts a clip
/// (reason `prompt`) and the engine gets the new text.
#[test]
fn test_engine_a_prompt_set_while_playing_starts_a_clip_with_it() {
    let (element, probe) = element_with_test_engine(0, None);
    element.set_property("prompt", "a street");
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    element.set_property("prompt", "a racing car");
    h.push_and_pull(rgb_buffer(8, 8, 0)).unwrap();
    let ctxs = probe.contexts.lock().unwrap();
    let seen: Vec<(&str, u64, Option<gstdpir::engine::ClipReason>)> =
        ctxs.iter().map(|c| (c.prompt.as_str(), c.clip_index, c.new_clip)).collect();
    use gstdpir::engine::ClipReason::{Prompt, Start};
    assert_eq!(seen, [("a street", 0, Some(Start)), ("a street", 0, None), ("a racing car", 1, Some(Prompt))]);
}

/// `analyse-only` builds no engine, passes every frame through unchanged (at any `scale`) and
/// posts the clip messages.
#[test]
fn test_engine_analyse_only_loads_no_engine_and_passes_frames_through() {
    let (element, probe) = element_with_test_engine(0, None);
    element.set_property("analyse-only", true);
    element.set_property("scale", 2u32);
    let bus = gst::Bus::new();
    element.set_bus(Some(&bus));
    let mut h = harness(&element);
    h.set_src_caps(caps("RGB", 8, 8));
    for i in 0..3 {
        let inbuf = rgb_buffer(8, 8, i);
        let out = h.push_and_pull(inbuf.clone()).unwrap();
        assert_eq!(out.map_readable().unwrap().as_slice(), inbuf.map_readable().unwrap().as_slice(), "frame {i}");
    }
    assert_eq!(probe.loads.load(Ordering::SeqCst), 0, "an engine was built");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 0);
    let mut clips = 0;
    while let Some(msg) = bus.pop() {
        clips += msg.structure().is_some_and(|s| s.name() == "dpir-clip") as usize;
    }
    assert_eq!(clips, 1);
}
