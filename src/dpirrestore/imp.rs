//! `dpirrestore` implementation: a sink pad whose chain function only queues, and a source pad
//! task that runs the engine and pushes. Serialized events travel through the same queue so
//! they stay in order with the frames around them, and the worker applies them in that order;
//! nothing the streaming or downstream threads do waits for an inference.

use std::collections::VecDeque;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;

use super::video;
use super::{ColorFix, LqLatent, Noise, Precision, Tiling};
use crate::engine::{
    CancelFlag, DeviceSpec, EngineError, EngineFactory, EngineSettings, FrameContext, RestoreEngine, StreamInfo,
};
use crate::scene::{ClipRequest, ClipTracker, ClipTrackerSettings};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "dpirrestore",
        gst::DebugColorFlags::empty(),
        Some("DPIR (dual prompting, DiT) restoration"),
    )
});

/// Every property's value. `Default` is the one source of the ParamSpec defaults; the model-side
/// ones come from [`EngineSettings::default`].
#[derive(Debug, Clone)]
struct Settings {
    engine: EngineSettings,
    /// A `device` string that did not parse: the state change to PAUSED fails with its error.
    device_error: Option<(String, String)>,
    scale: u32,
    max_inflight: u32,
    qos: bool,
    scene_threshold: f64,
    clip_max_frames: u32,
    tags_as_prompt: bool,
    first_clip_index: u64,
    analyse_only: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            engine: EngineSettings::default(),
            device_error: None,
            scale: 1,
            max_inflight: 2,
            qos: false,
            scene_threshold: crate::scene::DEFAULT_SCENE_THRESHOLD,
            clip_max_frames: 0,
            tags_as_prompt: false,
            first_clip_index: 0,
            analyse_only: false,
        }
    }
}

impl Settings {
    /// Output size / input size: `analyse-only` passes frames through unchanged.
    fn effective_scale(&self) -> u32 {
        if self.analyse_only { 1 } else { self.scale }
    }

    /// What cannot run, said before anything starts.
    fn check(&self) -> Result<(), String> {
        if let Some((value, err)) = &self.device_error {
            return Err(format!("device `{value}`: {err}"));
        }
        if ![1, 2, 4].contains(&self.scale) {
            return Err(format!("scale={} is not supported: use 1, 2 or 4", self.scale));
        }
        Ok(())
    }
}

/// What travels from the streaming thread to the worker, in stream order.
enum Item {
    Buffer(gst::Buffer),
    Event(gst::Event),
}

struct Queue {
    items: VecDeque<Item>,
    /// Buffers in `items` (events don't count against `max-inflight`).
    frames: usize,
    /// The worker is processing an item it has taken out of `items`.
    busy: bool,
    flushing: bool,
    /// Last downstream flow result, returned by the chain function.
    flow: Result<gst::FlowSuccess, gst::FlowError>,
}

impl Default for Queue {
    fn default() -> Self {
        Self { items: VecDeque::new(), frames: 0, busy: false, flushing: false, flow: Ok(gst::FlowSuccess::Ok) }
    }
}

/// State owned by the worker (source pad task). Only the worker takes this lock while the task
/// runs (state changes and flush-stop take it with the task stopped), so it may be held for a
/// whole inference.
struct Worker {
    engine: Option<Box<dyn RestoreEngine>>,
    /// The settings `engine` was built from.
    built_with: Option<EngineSettings>,
    in_info: Option<gst_video::VideoInfo>,
    out_info: Option<gst_video::VideoInfo>,
    frame_index: u64,
    frames_done: u64,
    started: Option<Instant>,
    segment: gst::FormattedSegment<gst::ClockTime>,
    clips: ClipTracker,
    /// The stream's description/title tag (`tags-as-prompt`), from the last tag event handled.
    tag_prompt: Option<String>,
}

impl Worker {
    fn new(clips: ClipTrackerSettings) -> Self {
        Self {
            engine: None,
            built_with: None,
            in_info: None,
            out_info: None,
            frame_index: 0,
            frames_done: 0,
            started: None,
            segment: gst::FormattedSegment::new(),
            clips: ClipTracker::new(clips),
            tag_prompt: None,
        }
    }
}

#[derive(Default)]
struct Qos {
    /// Running time before which frames are late (from downstream QOS events).
    earliest: Option<gst::ClockTime>,
    processed: u64,
    dropped: u64,
}

pub struct DpirRestore {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    queue: Mutex<Queue>,
    cond: Condvar,
    worker: Mutex<Worker>,
    /// A `dpir-clip` request from downstream (upstream event): taken by the worker at its next
    /// frame, so the sending thread never waits for an inference.
    upstream_clip: Mutex<Option<ClipRequest>>,
    factory: Mutex<Option<EngineFactory>>,
    cancel: CancelFlag,
    qos: Mutex<Qos>,
    /// Measured processing time per frame, for LATENCY.
    frame_time: Mutex<Option<Duration>>,
    /// Duration of the stream from upstream, for the ETA.
    duration: Mutex<Option<gst::ClockTime>>,
}

impl DpirRestore {
    pub(super) fn set_engine_factory(&self, factory: EngineFactory) {
        *self.factory.lock().unwrap() = Some(factory);
    }

    // ---- caps ----------------------------------------------------------------------------

    /// Caps on the other side of the element: `towards_src` multiplies sizes by `scale`,
    /// otherwise divides (dropping sizes that aren't multiples of it).
    fn transform_caps(&self, caps: &gst::Caps, towards_src: bool) -> gst::Caps {
        if caps.is_any() {
            return caps.clone();
        }
        let scale = self.settings.lock().unwrap().effective_scale() as i32;
        let mut out = gst::Caps::new_empty();
        {
            let out = out.get_mut().unwrap();
            for (s, features) in caps.iter_with_features() {
                let mut s = s.to_owned();
                let mut ok = true;
                for field in ["width", "height"] {
                    let Ok(v) = s.value(field) else { continue };
                    let v = v.clone();
                    if let Ok(n) = v.get::<i32>() {
                        if towards_src {
                            s.set(field, n.saturating_mul(scale));
                        } else if n % scale == 0 {
                            s.set(field, n / scale);
                        } else {
                            ok = false;
                        }
                    } else if let Ok(r) = v.get::<gst::IntRange<i32>>() {
                        let (lo, hi) = if towards_src {
                            (r.min().saturating_mul(scale), r.max().saturating_mul(scale))
                        } else {
                            ((r.min() + scale - 1) / scale, r.max() / scale)
                        };
                        if lo > hi {
                            ok = false;
                        } else if lo == hi {
                            s.set(field, lo);
                        } else {
                            s.set(field, gst::IntRange::new(lo.max(1), hi.max(1)));
                        }
                    } else {
                        // Lists and other forms: let the template decide.
                        s.remove_field(field);
                    }
                }
                if ok {
                    out.append_structure_full(s, Some(features.to_owned()));
                }
            }
        }
        out
    }

    fn query_caps(&self, pad: &gst::Pad, filter: Option<&gst::CapsRef>) -> gst::Caps {
        let (other, towards_src) = if pad == &self.srcpad { (&self.sinkpad, true) } else { (&self.srcpad, false) };
        let filter = filter.map(|f| f.to_owned());
        let peer_filter = filter.as_ref().map(|f| self.transform_caps(f, !towards_src));
        let peer = other.peer_query_caps(peer_filter.as_ref());
        let mut caps = self.transform_caps(&peer, towards_src).intersect(&pad.pad_template_caps());
        if let Some(f) = &filter {
            caps = f.intersect_with_mode(&caps, gst::CapsIntersectMode::First);
        }
        caps
    }

    /// Validate input caps and derive the output caps (fixed).
    fn output_caps(&self, caps: &gst::Caps) -> Result<(gst_video::VideoInfo, gst_video::VideoInfo), String> {
        let info = gst_video::VideoInfo::from_caps(caps).map_err(|_| format!("unusable caps {caps}"))?;
        if info.is_interlaced() {
            return Err(format!(
                "interlaced video ({:?}) is not supported: put `deinterlace` before dpirrestore",
                info.interlace_mode()
            ));
        }
        if !video::FORMATS.contains(&info.format()) {
            return Err(format!("format {:?} is not supported: put `videoconvert` before dpirrestore", info.format()));
        }
        let scale = self.settings.lock().unwrap().effective_scale();
        let out = gst_video::VideoInfo::builder(info.format(), info.width() * scale, info.height() * scale)
            .fps(info.fps())
            .par(info.par())
            .colorimetry(&info.colorimetry())
            .chroma_site(info.chroma_site())
            .build()
            .map_err(|e| format!("cannot build output caps: {e}"))?;
        Ok((info, out))
    }

    // ---- sink pad ------------------------------------------------------------------------

    fn sink_chain(&self, buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let max = self.settings.lock().unwrap().max_inflight.max(1) as usize;
        let mut q = self.queue.lock().unwrap();
        loop {
            if q.flushing {
                return Err(gst::FlowError::Flushing);
            }
            q.flow?;
            if q.frames < max {
                break;
            }
            // Back-pressure: wait for the worker to take a frame.
            q = self.cond.wait(q).unwrap();
        }
        q.items.push_back(Item::Buffer(buffer));
        q.frames += 1;
        self.cond.notify_all();
        q.flow
    }

    fn enqueue_event(&self, event: gst::Event) -> bool {
        let mut q = self.queue.lock().unwrap();
        if q.flushing {
            return false;
        }
        q.items.push_back(Item::Event(event));
        self.cond.notify_all();
        true
    }

    /// Block until the worker has handled everything queued so far.
    fn wait_drained(&self) {
        let mut q = self.queue.lock().unwrap();
        while !q.flushing && (!q.items.is_empty() || q.busy) {
            q = self.cond.wait(q).unwrap();
        }
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        gst::log!(CAT, obj = pad, "sink event {:?}", event.type_());
        match event.view() {
            EventView::FlushStart(_) => {
                {
                    let mut q = self.queue.lock().unwrap();
                    q.flushing = true;
                    // Sticky events survive a flush (caps above all), except segment and EOS:
                    // keep those the worker has not handled yet.
                    q.items.retain(|it| match it {
                        Item::Event(e) => {
                            e.is_sticky() && !matches!(e.type_(), gst::EventType::Segment | gst::EventType::Eos)
                        }
                        Item::Buffer(_) => false,
                    });
                    q.frames = 0;
                    self.cancel.set(true);
                    self.cond.notify_all();
                }
                let ret = self.srcpad.push_event(event);
                // Waits for the frame in progress to be abandoned.
                let _ = self.srcpad.pause_task();
                ret
            }
            EventView::FlushStop(_) => {
                {
                    let mut q = self.queue.lock().unwrap();
                    q.flushing = false;
                    q.flow = Ok(gst::FlowSuccess::Ok);
                    self.cancel.set(false);
                }
                {
                    let mut w = self.worker.lock().unwrap();
                    w.clips.reset();
                    w.frame_index = 0;
                }
                *self.qos.lock().unwrap() = Qos::default();
                let ret = self.srcpad.push_event(event);
                if self.srcpad.is_active() {
                    self.start_task();
                }
                ret
            }
            EventView::Caps(c) => {
                let caps = c.caps_owned();
                match self.output_caps(&caps) {
                    Ok((_, out)) => {
                        let out_caps = out.to_caps().unwrap();
                        if self.srcpad.peer().is_some() && !self.srcpad.peer_query_accept_caps(&out_caps) {
                            gst::element_imp_error!(
                                self,
                                gst::CoreError::Negotiation,
                                ("Downstream does not accept {out_caps}"),
                                ["dpirrestore outputs input size × scale; check the caps after it or change `scale`"]
                            );
                            return false;
                        }
                        self.enqueue_event(event)
                    }
                    Err(msg) => {
                        gst::element_imp_error!(self, gst::StreamError::Format, ("{msg}"));
                        false
                    }
                }
            }
            // Tags (a prompt with `tags-as-prompt`) are applied by the worker when it reaches them,
            // i.e. to the frames after them in stream order.
            EventView::Segment(_)
            | EventView::Eos(_)
            | EventView::StreamStart(_)
            | EventView::Gap(_)
            | EventView::Tag(_) => self.enqueue_event(event),
            EventView::CustomDownstreamOob(_) if parse_clip_event(&event).is_some() => self.enqueue_event(event),
            _ if event.is_serialized() => self.enqueue_event(event),
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    fn sink_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        use gst::QueryViewMut;
        match query.view_mut() {
            QueryViewMut::Caps(q) => {
                let caps = self.query_caps(pad, q.filter());
                q.set_result(&caps);
                true
            }
            QueryViewMut::AcceptCaps(q) => {
                let caps = q.caps_owned();
                // Interlaced caps are accepted here on purpose: the CAPS event then refuses them
                // with an error that tells the user to deinterlace, instead of a bare
                // not-negotiated failure upstream.
                let ok = caps.can_intersect(&self.query_caps(pad, None));
                q.set_result(ok);
                true
            }
            // Our output buffers have another size: upstream must not use downstream's pools.
            QueryViewMut::Allocation(_) => false,
            QueryViewMut::Drain(_) => {
                self.wait_drained();
                true
            }
            _ => gst::Pad::query_default(pad, Some(&*self.obj()), query),
        }
    }

    // ---- source pad ----------------------------------------------------------------------

    fn src_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        use gst::QueryViewMut;
        match query.view_mut() {
            QueryViewMut::Caps(q) => {
                let caps = self.query_caps(pad, q.filter());
                q.set_result(&caps);
                true
            }
            QueryViewMut::Latency(q) => {
                let mut upstream = gst::query::Latency::new();
                if !self.sinkpad.peer_query(&mut upstream) {
                    return false;
                }
                let (live, min, max) = upstream.result();
                let ours = gst::ClockTime::from_nseconds(
                    self.frame_time.lock().unwrap().map(|d| d.as_nanos() as u64).unwrap_or(0),
                );
                let inflight = self.settings.lock().unwrap().max_inflight.max(1) as u64;
                q.set(live, min + ours, max.map(|m| m + ours * (inflight + 1)));
                gst::debug!(CAT, imp = self, "latency: ours {ours}, total min {}", min + ours);
                true
            }
            _ => gst::Pad::query_default(pad, Some(&*self.obj()), query),
        }
    }

    fn src_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        if let Some(req) = parse_clip_event(&event) {
            // From a downstream application: applies to the next frame the worker takes. Its own
            // small lock: the worker may be in the middle of a frame.
            *self.upstream_clip.lock().unwrap() = Some(req);
            return true;
        }
        if let gst::EventView::Qos(q) = event.view() {
            let (_type, _proportion, diff, timestamp) = q.get();
            if let Some(ts) = timestamp {
                let earliest = if diff >= 0 {
                    ts.saturating_add(gst::ClockTime::from_nseconds(diff as u64))
                } else {
                    ts.saturating_sub(gst::ClockTime::from_nseconds(diff.unsigned_abs()))
                };
                self.qos.lock().unwrap().earliest = Some(earliest);
            }
        }
        gst::Pad::event_default(pad, Some(&*self.obj()), event)
    }

    fn start_task(&self) {
        let this = self.ref_counted();
        let res = self.srcpad.start_task(move || this.task_iteration());
        if let Err(e) = res {
            gst::element_imp_error!(self, gst::CoreError::Pad, ("Failed to start worker task: {e}"));
        }
    }

    fn src_activate_mode(&self, mode: gst::PadMode, active: bool) -> Result<(), gst::LoggableError> {
        if mode != gst::PadMode::Push {
            return Err(gst::loggable_error!(CAT, "only push mode is supported"));
        }
        if active {
            {
                let mut q = self.queue.lock().unwrap();
                q.flushing = false;
                q.flow = Ok(gst::FlowSuccess::Ok);
                self.cancel.set(false);
            }
            self.start_task();
        } else {
            {
                let mut q = self.queue.lock().unwrap();
                q.flushing = true;
                q.items.clear();
                q.frames = 0;
                self.cancel.set(true);
                self.cond.notify_all();
            }
            self.srcpad.stop_task().map_err(|e| gst::loggable_error!(CAT, "stop task: {e}"))?;
        }
        Ok(())
    }

    // ---- worker --------------------------------------------------------------------------

    fn task_iteration(&self) {
        let item = {
            let mut q = self.queue.lock().unwrap();
            while q.items.is_empty() && !q.flushing {
                q = self.cond.wait(q).unwrap();
            }
            if q.flushing {
                drop(q);
                let _ = self.srcpad.pause_task();
                return;
            }
            let item = q.items.pop_front().unwrap();
            if matches!(item, Item::Buffer(_)) {
                q.frames -= 1;
            }
            q.busy = true;
            self.cond.notify_all();
            item
        };

        let res = match item {
            Item::Buffer(buffer) => self.process_buffer(buffer),
            Item::Event(event) => self.process_event(event),
        };

        let mut q = self.queue.lock().unwrap();
        q.busy = false;
        if let Err(err) = res {
            if !q.flushing {
                q.flow = Err(err);
            }
            self.cond.notify_all();
            drop(q);
            gst::debug!(CAT, imp = self, "worker pausing: {err:?}");
            if !matches!(err, gst::FlowError::Flushing) {
                // Keep upstream informed even if it is not pushing (e.g. waiting on EOS).
                if err == gst::FlowError::Eos {
                    // Downstream is done: nothing else to do.
                } else if matches!(
                    err,
                    // FlowError::Error comes with its own element error already posted.
                    gst::FlowError::NotLinked | gst::FlowError::NotNegotiated | gst::FlowError::NotSupported
                ) {
                    gst::element_imp_error!(
                        self,
                        gst::StreamError::Failed,
                        ("Internal data stream error."),
                        ["streaming stopped, reason {err:?}"]
                    );
                }
            }
            let _ = self.srcpad.pause_task();
            return;
        }
        self.cond.notify_all();
    }

    fn process_event(&self, event: gst::Event) -> Result<gst::FlowSuccess, gst::FlowError> {
        use gst::EventView;
        match event.view() {
            EventView::Caps(c) => {
                let (in_info, out_info) = self.output_caps(&c.caps_owned()).map_err(|msg| {
                    gst::element_imp_error!(self, gst::StreamError::Format, ("{msg}"));
                    gst::FlowError::NotNegotiated
                })?;
                let info = StreamInfo {
                    in_width: in_info.width() as usize,
                    in_height: in_info.height() as usize,
                    scale: self.settings.lock().unwrap().effective_scale() as usize,
                    fps: (in_info.fps().numer() > 0).then(|| (in_info.fps().numer(), in_info.fps().denom())),
                    depth: video::depth(in_info.format()),
                };
                let mut w = self.worker.lock().unwrap();
                if let Some(engine) = w.engine.as_mut() {
                    if let Err(e) = engine.configure(&info) {
                        self.post_engine_error(&e);
                        return Err(gst::FlowError::NotNegotiated);
                    }
                } else if !self.settings.lock().unwrap().analyse_only {
                    gst::element_imp_error!(self, gst::CoreError::StateChange, ("No engine loaded"));
                    return Err(gst::FlowError::Error);
                }
                gst::info!(
                    CAT,
                    imp = self,
                    "configured {}x{} ×{}, {}-bit",
                    info.in_width,
                    info.in_height,
                    info.scale,
                    info.depth
                );
                w.in_info = Some(in_info);
                w.out_info = Some(out_info.clone());
                drop(w);
                let out_caps = out_info.to_caps().map_err(|_| gst::FlowError::NotNegotiated)?;
                if !self.srcpad.push_event(gst::event::Caps::new(&out_caps)) {
                    return Err(gst::FlowError::NotNegotiated);
                }
                Ok(gst::FlowSuccess::Ok)
            }
            EventView::Segment(s) => {
                if let Ok(seg) = s.segment().clone().downcast::<gst::ClockTime>() {
                    self.worker.lock().unwrap().segment = seg;
                }
                if let Some(d) = self.sinkpad.peer_query_duration::<gst::ClockTime>() {
                    *self.duration.lock().unwrap() = Some(d);
                }
                self.push_event(event)
            }
            EventView::Tag(t) => {
                if self.settings.lock().unwrap().tags_as_prompt {
                    let tags = t.tag();
                    let text = tags
                        .get::<gst::tags::Description>()
                        .map(|v| v.get().to_string())
                        .or_else(|| tags.get::<gst::tags::Title>().map(|v| v.get().to_string()));
                    if let Some(text) = text {
                        gst::debug!(CAT, imp = self, "prompt from tags: {text:?}");
                        self.worker.lock().unwrap().tag_prompt = Some(text);
                    }
                }
                self.push_event(event)
            }
            _ => {
                if let Some(req) = parse_clip_event(&event) {
                    gst::debug!(CAT, imp = self, "clip event: {req:?}");
                    self.worker.lock().unwrap().clips.request(req);
                }
                self.push_event(event)
            }
        }
    }

    fn push_event(&self, event: gst::Event) -> Result<gst::FlowSuccess, gst::FlowError> {
        let is_eos = event.type_() == gst::EventType::Eos;
        if !self.srcpad.push_event(event) && is_eos {
            gst::warning!(CAT, imp = self, "EOS not handled downstream");
        }
        Ok(gst::FlowSuccess::Ok)
    }

    fn post_engine_error(&self, e: &EngineError) {
        match e {
            EngineError::Model(m) => gst::element_imp_error!(self, gst::ResourceError::OpenRead, ("{m}")),
            EngineError::Settings(m) => gst::element_imp_error!(self, gst::LibraryError::Settings, ("{m}")),
            EngineError::Stream(m) => gst::element_imp_error!(self, gst::StreamError::Format, ("{m}")),
            EngineError::Runtime(m) => gst::element_imp_error!(self, gst::StreamError::Failed, ("{m}")),
            EngineError::Cancelled => {}
        }
    }

    /// The engine's warnings (precision fallback, settings without effect) as warning messages.
    fn post_engine_warnings(&self, engine: &mut dyn RestoreEngine) {
        for msg in engine.take_warnings() {
            gst::element_imp_warning!(self, gst::LibraryError::Settings, ("{msg}"));
        }
    }

    /// True if the frame is already late downstream and QoS is enabled.
    fn qos_should_skip(&self, buffer: &gst::Buffer, segment: &gst::FormattedSegment<gst::ClockTime>) -> bool {
        if !self.settings.lock().unwrap().qos {
            return false;
        }
        let qos = self.qos.lock().unwrap();
        match (qos.earliest, buffer.pts().and_then(|pts| segment.to_running_time(pts))) {
            (Some(earliest), Some(rt)) => rt < earliest,
            _ => false,
        }
    }

    fn process_buffer(&self, inbuf: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let t0 = Instant::now();
        let mut w = self.worker.lock().unwrap();
        let (Some(in_info), Some(out_info)) = (w.in_info.clone(), w.out_info.clone()) else {
            gst::element_imp_error!(self, gst::CoreError::Negotiation, ("Buffer before caps"));
            return Err(gst::FlowError::NotNegotiated);
        };

        if self.qos_should_skip(&inbuf, &w.segment) {
            let mut qos = self.qos.lock().unwrap();
            qos.dropped += 1;
            let (processed, dropped) = (qos.processed, qos.dropped);
            drop(qos);
            let rt = inbuf.pts().and_then(|p| w.segment.to_running_time(p));
            let msg = gst::message::Qos::builder(false)
                .running_time(rt)
                .stream_time(inbuf.pts().and_then(|p| w.segment.to_stream_time(p)))
                .timestamp(inbuf.pts())
                .duration(inbuf.duration())
                .stats(gst::format::Buffers::from_u64(processed), gst::format::Buffers::from_u64(dropped))
                .src(&*self.obj())
                .build();
            let _ = self.obj().post_message(msg);
            gst::debug!(CAT, imp = self, "QoS: skipping late frame {:?}", inbuf.pts());
            w.frame_index += 1;
            return Ok(gst::FlowSuccess::Ok);
        }

        let (image, alpha) = {
            let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(inbuf.as_ref(), &in_info).map_err(|_| {
                gst::element_imp_error!(self, gst::StreamError::Format, ("Cannot map input frame"));
                gst::FlowError::Error
            })?;
            let stride = frame.plane_stride()[0] as usize;
            video::read(
                in_info.format(),
                in_info.width() as usize,
                in_info.height() as usize,
                stride,
                frame.plane_data(0).map_err(|_| gst::FlowError::Error)?,
            )
        };

        let (settings_prompt, analyse_only) = {
            let s = self.settings.lock().unwrap();
            (s.engine.prompt.clone(), s.analyse_only)
        };
        let prompt =
            if settings_prompt.is_empty() { w.tag_prompt.clone().unwrap_or_default() } else { settings_prompt };
        if let Some(req) = self.upstream_clip.lock().unwrap().take() {
            w.clips.request(req);
        }
        let index = w.frame_index;
        let (clip_index, new_clip) = w.clips.observe(&image, &prompt);
        let prompt = w.clips.effective_prompt(&prompt);
        let ctx = FrameContext { index, clip_index, new_clip, prompt, cancel: self.cancel.clone() };
        if let Some(reason) = new_clip {
            let s = gst::Structure::builder("dpir-clip")
                .field("index", clip_index)
                .field("start-pts", inbuf.pts())
                .field("reason", reason.as_str())
                .field("frame-index", index)
                .field("difference", w.clips.last_distance)
                .build();
            let _ = self.obj().post_message(gst::message::Element::builder(s).src(&*self.obj()).build());
        }

        let (outbuf, engine_timings) = if analyse_only {
            // Segmentation only (a pre-pass): the frame goes on untouched.
            (inbuf.clone(), None)
        } else {
            let engine = w.engine.as_mut().ok_or(gst::FlowError::Error)?;
            let restored = engine.restore(&image, &ctx);
            self.post_engine_warnings(engine.as_mut());
            let restored = match restored {
                Ok(img) => img,
                Err(EngineError::Cancelled) => return Err(gst::FlowError::Flushing),
                Err(e) => {
                    self.post_engine_error(&e);
                    return Err(gst::FlowError::Error);
                }
            };
            if restored.width != out_info.width() as usize || restored.height != out_info.height() as usize {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    (
                        "Engine returned {}x{}, expected {}x{}",
                        restored.width,
                        restored.height,
                        out_info.width(),
                        out_info.height()
                    )
                );
                return Err(gst::FlowError::Error);
            }
            let mut outbuf = gst::Buffer::with_size(out_info.size()).map_err(|_| gst::FlowError::Error)?;
            {
                let outref = outbuf.get_mut().unwrap();
                inbuf
                    .copy_into(outref, gst::BufferCopyFlags::FLAGS | gst::BufferCopyFlags::TIMESTAMPS, ..)
                    .map_err(|_| gst::FlowError::Error)?;
                let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(outref, &out_info)
                    .map_err(|_| gst::FlowError::Error)?;
                let stride = frame.plane_stride()[0] as usize;
                video::write(
                    out_info.format(),
                    &restored,
                    &alpha,
                    in_info.width() as usize,
                    stride,
                    frame.plane_data_mut(0).map_err(|_| gst::FlowError::Error)?,
                );
            }
            let latency = engine.latency();
            let timings = engine.timings();
            *self.frame_time.lock().unwrap() = Some(latency.unwrap_or(t0.elapsed()));
            (outbuf, timings)
        };

        // Bookkeeping and progress before pushing, so a blocking downstream doesn't skew fps.
        let elapsed = t0.elapsed();
        w.frame_index += 1;
        w.frames_done += 1;
        let started = *w.started.get_or_insert(t0);
        let done = w.frames_done;
        let wall = started.elapsed().as_secs_f64().max(1e-9);
        let fps = done as f64 / wall;
        let mut progress = gst::Structure::builder("dpir-progress")
            .field("frame-index", index)
            .field("frames-done", done)
            .field("fps", fps)
            .field("pts", inbuf.pts())
            .build();
        let duration = *self.duration.lock().unwrap();
        let rate = in_info.fps();
        if let (Some(dur), Some(pts)) = (duration, inbuf.pts())
            && rate.numer() > 0
            && rate.denom() > 0
        {
            let remaining = dur.saturating_sub(pts).seconds_f64() * rate.numer() as f64 / rate.denom() as f64;
            progress.set("eta", (remaining - 1.0).max(0.0) / fps);
            progress.set("percent", (pts.seconds_f64() / dur.seconds_f64().max(1e-9) * 100.0).min(100.0));
        }
        drop(w);
        let _ = self.obj().post_message(gst::message::Element::builder(progress).src(&*self.obj()).build());
        self.qos.lock().unwrap().processed += 1;

        gst::debug!(CAT, imp = self, "frame {index} in {elapsed:?}: {}", engine_timings.unwrap_or_default());
        self.srcpad.push(outbuf)
    }

    // ---- engine loading --------------------------------------------------------------------

    fn load_engine(&self) -> Result<(), gst::StateChangeError> {
        let settings = self.settings.lock().unwrap().clone();
        if settings.analyse_only {
            gst::info!(CAT, imp = self, "analyse-only: no model is loaded");
            let mut w = self.worker.lock().unwrap();
            w.engine = None;
            w.built_with = None;
            return Ok(());
        }
        let factory = self.factory.lock().unwrap().clone().unwrap_or_else(crate::restorer::factory);
        let obj = self.obj();
        let what = settings
            .engine
            .model
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded dpir-nano".into());
        let _ = obj.post_message(
            gst::message::Progress::builder(gst::ProgressType::Start, "load-model", &format!("Loading model {what}"))
                .src(&*obj)
                .build(),
        );
        match factory(&settings.engine) {
            Ok(mut engine) => {
                gst::info!(CAT, imp = self, "engine ready: {}", engine.describe());
                let _ = obj.post_message(
                    gst::message::Progress::builder(gst::ProgressType::Complete, "load-model", &engine.describe())
                        .src(&*obj)
                        .build(),
                );
                self.post_engine_warnings(engine.as_mut());
                let mut w = self.worker.lock().unwrap();
                w.engine = Some(engine);
                w.built_with = Some(settings.engine);
                Ok(())
            }
            Err(e) => {
                let _ = obj.post_message(
                    gst::message::Progress::builder(gst::ProgressType::Error, "load-model", &e.to_string())
                        .src(&*obj)
                        .build(),
                );
                self.post_engine_error(&e);
                Err(gst::StateChangeError)
            }
        }
    }

    fn reset_worker(&self) {
        let s = self.settings.lock().unwrap();
        let clip_settings = ClipTrackerSettings {
            scene_threshold: s.scene_threshold,
            clip_max_frames: s.clip_max_frames,
            first_clip_index: s.first_clip_index,
        };
        drop(s);
        let mut w = self.worker.lock().unwrap();
        let (engine, built_with) = (w.engine.take(), w.built_with.take());
        *w = Worker::new(clip_settings);
        w.engine = engine;
        w.built_with = built_with;
        *self.upstream_clip.lock().unwrap() = None;
        *self.qos.lock().unwrap() = Qos::default();
        *self.duration.lock().unwrap() = None;
    }
}

/// The `dpir-clip` custom event an application (an editor) sends to start a new clip,
/// optionally with its prompt: a downstream (serialized, or out-of-band: it is then still
/// applied in stream order) custom event whose structure is named `dpir-clip` with an optional
/// string field `prompt`. Upstream, the same structure as a custom upstream event works too.
fn parse_clip_event(event: &gst::Event) -> Option<ClipRequest> {
    let s = event.structure()?;
    if s.name() != "dpir-clip" {
        return None;
    }
    Some(ClipRequest { prompt: s.get::<String>("prompt").ok() })
}

#[glib::object_subclass]
impl ObjectSubclass for DpirRestore {
    const NAME: &'static str = "GstDpirRestore";
    type Type = super::DpirRestore;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").unwrap();
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|_pad, parent, buffer| {
                DpirRestore::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |this| this.sink_chain(buffer),
                )
            })
            .event_function(|pad, parent, event| {
                DpirRestore::catch_panic_pad_function(parent, || false, |this| this.sink_event(pad, event))
            })
            .query_function(|pad, parent, query| {
                DpirRestore::catch_panic_pad_function(parent, || false, |this| this.sink_query(pad, query))
            })
            .build();
        let templ = klass.pad_template("src").unwrap();
        let srcpad = gst::Pad::builder_from_template(&templ)
            .event_function(|pad, parent, event| {
                DpirRestore::catch_panic_pad_function(parent, || false, |this| this.src_event(pad, event))
            })
            .query_function(|pad, parent, query| {
                DpirRestore::catch_panic_pad_function(parent, || false, |this| this.src_query(pad, query))
            })
            .activatemode_function(|_pad, parent, mode, active| {
                DpirRestore::catch_panic_pad_function(
                    parent,
                    || Err(gst::loggable_error!(CAT, "panic activating source pad")),
                    |this| this.src_activate_mode(mode, active),
                )
            })
            .build();
        Self {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings::default()),
            queue: Mutex::new(Queue::default()),
            cond: Condvar::new(),
            worker: Mutex::new(Worker::new(ClipTrackerSettings::default())),
            upstream_clip: Mutex::new(None),
            factory: Mutex::new(None),
            cancel: CancelFlag::default(),
            qos: Mutex::new(Qos::default()),
            frame_time: Mutex::new(None),
            duration: Mutex::new(None),
        }
    }
}

impl ObjectImpl for DpirRestore {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPS: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let d = Settings::default();
            let e = &d.engine;
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Model directory (with model.json); unset: the embedded dpir-nano model")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("Compute device: cpu, cuda:N, or auto (first CUDA GPU if built with CUDA, else cpu)")
                    .default_value(Some(e.device.to_string().as_str()))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("precision", Precision::from(e.precision))
                    .nick("Precision")
                    .blurb("Numeric precision of the model (bf16 needs a GPU; an f16 overflow falls back to a wider type with a warning)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("steps")
                    .nick("Steps")
                    .blurb("Sampling steps per frame; 0: the model's default (DPIR: 28, the embedded dpir-nano: 1)")
                    .maximum(1000)
                    .default_value(e.steps)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("seed")
                    .nick("Seed")
                    .blurb("Random seed of the sampler noise (with clip index: any clip re-renders alone)")
                    .default_value(e.seed)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("prompt")
                    .nick("Prompt")
                    .blurb("Text prompt for the T5 encoder (empty: no text; a change starts a new clip)")
                    .default_value(Some(e.prompt.as_str()))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("scale")
                    .nick("Scale")
                    .blurb("Upscaling factor: 1, 2 or 4 (output size = input size × scale; 3 is refused when the element starts)")
                    .minimum(1)
                    .maximum(4)
                    .default_value(d.scale)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("tile-size")
                    .nick("Tile size")
                    .blurb("Latent tile size for large frames (8 px per latent; DPIR: 128 = 1024 px); 0: the model's own. \
                            A size the model's position table cannot take is refused when the element starts")
                    .maximum(1024)
                    .default_value(e.tile_size)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("tile-overlap")
                    .nick("Tile overlap")
                    .blurb("Overlap of latent tiles, blended with Gaussian weights (DPIR: 8 = 64 px); -1: the model's own")
                    .minimum(-1)
                    .maximum(512)
                    .default_value(e.tile_overlap)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("color-fix", ColorFix::from(e.color_fix))
                    .nick("Colour fix")
                    .blurb("Colour correction of the output towards the input")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("lq-latent", LqLatent::from(e.lq_latent))
                    .nick("LQ latent")
                    .blurb("How the input's latent is drawn: sample (official) or mode (deterministic)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("tiling", Tiling::from(e.tiling))
                    .nick("Global prompt tiling")
                    .blurb("Tiling of the global visual prompt: reference (official, quirk included) or corrected")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("noise", Noise::from(e.noise))
                    .nick("Noise")
                    .blurb("Initial sampler noise: one field per clip (less flicker) or per frame")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("low-memory")
                    .nick("Low memory")
                    .blurb("Free the T5 text encoder after each new prompt is embedded (reloaded on the next prompt change)")
                    .default_value(e.low_memory)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-inflight")
                    .nick("Max in flight")
                    .blurb("Frames queued for the worker before the streaming thread blocks")
                    .minimum(1)
                    .maximum(64)
                    .default_value(d.max_inflight)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("qos")
                    .nick("QoS")
                    .blurb("Skip frames that are already late downstream (off: every frame is restored)")
                    .default_value(d.qos)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("scene-threshold")
                    .nick("Scene threshold")
                    .blurb("Frame difference (0-1) above which a new clip starts and prompts are refreshed")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(d.scene_threshold)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("clip-max-frames")
                    .nick("Clip max frames")
                    .blurb("Start a new clip after this many frames (0: no limit)")
                    .default_value(d.clip_max_frames)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("tags-as-prompt")
                    .nick("Tags as prompt")
                    .blurb("Use the stream's description or title tag as the prompt when `prompt` is empty")
                    .default_value(d.tags_as_prompt)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("warm-start")
                    .nick("Warm start")
                    .blurb(
                        "0: off. Else a strength in (0,1]: within a clip, start each frame's sampling from the previous \
                         output re-noised, running about strength x steps (faster, steadier on static shots; can \
                         ghost on motion). A clip's first frame always starts from noise. Needs 2 or more steps \
                         (a warning says so otherwise; dpir-nano's default is 1: set steps too)",
                    )
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(e.warm_start)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("fidelity")
                    .nick("Fidelity")
                    .blurb(
                        "-1: the model's own (model.json `fidelity`; dpir-nano 0.1, 0 for models that name none). 0: full \
                         restoration. Up to 1: the output is blended towards the input upsampled to the output \
                         size, (1 - fidelity) x restored + fidelity x input (1: the input back, without running the model; use it to tone down \
                         a model on material it does not suit)",
                    )
                    .minimum(-1.0)
                    .maximum(1.0)
                    .default_value(e.fidelity)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("first-clip-index")
                    .nick("First clip index")
                    .blurb("Index of the stream's first clip: render clip N alone (same seed) as it was in the whole film")
                    .default_value(d.first_clip_index)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("analyse-only")
                    .nick("Analyse only")
                    .blurb("Find the clips only: post the dpir-clip messages a restoring run would and pass frames through \
                            unchanged, loading no model (a fast pre-pass, e.g. to split a film into chunks); scale does not apply")
                    .default_value(d.analyse_only)
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        let e = &mut s.engine;
        match pspec.name() {
            "model" => e.model = value.get::<Option<String>>().unwrap().filter(|m| !m.is_empty()).map(Into::into),
            "device" => {
                let v = value.get::<Option<String>>().unwrap().unwrap_or_default();
                match v.parse::<DeviceSpec>() {
                    Ok(d) => {
                        e.device = d;
                        s.device_error = None;
                    }
                    Err(err) => {
                        // GObject setters cannot fail: the state change to PAUSED does, with this.
                        gst::error!(CAT, imp = self, "device `{v}`: {err}");
                        s.device_error = Some((v, err));
                    }
                }
            }
            "precision" => e.precision = value.get::<Precision>().unwrap().into(),
            "steps" => e.steps = value.get().unwrap(),
            "seed" => e.seed = value.get().unwrap(),
            "prompt" => e.prompt = value.get::<Option<String>>().unwrap().unwrap_or_default(),
            "scale" => {
                s.scale = value.get().unwrap();
                if s.scale == 3 {
                    gst::warning!(CAT, imp = self, "scale=3 is not supported (1, 2 or 4): the element will not start");
                }
            }
            "tile-size" => e.tile_size = value.get().unwrap(),
            "tile-overlap" => e.tile_overlap = value.get().unwrap(),
            "color-fix" => e.color_fix = value.get::<ColorFix>().unwrap().into(),
            "lq-latent" => e.lq_latent = value.get::<LqLatent>().unwrap().into(),
            "tiling" => e.tiling = value.get::<Tiling>().unwrap().into(),
            "noise" => e.noise = value.get::<Noise>().unwrap().into(),
            "low-memory" => e.low_memory = value.get().unwrap(),
            "warm-start" => e.warm_start = value.get().unwrap(),
            "fidelity" => e.fidelity = value.get().unwrap(),
            "max-inflight" => s.max_inflight = value.get().unwrap(),
            "qos" => s.qos = value.get().unwrap(),
            "scene-threshold" => s.scene_threshold = value.get().unwrap(),
            "clip-max-frames" => s.clip_max_frames = value.get().unwrap(),
            "tags-as-prompt" => s.tags_as_prompt = value.get().unwrap(),
            "first-clip-index" => s.first_clip_index = value.get().unwrap(),
            "analyse-only" => s.analyse_only = value.get().unwrap(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        let e = &s.engine;
        match pspec.name() {
            "model" => e.model.as_ref().map(|p| p.display().to_string()).to_value(),
            "device" => match &s.device_error {
                Some((v, _)) => v.to_value(),
                None => e.device.to_string().to_value(),
            },
            "precision" => Precision::from(e.precision).to_value(),
            "steps" => e.steps.to_value(),
            "seed" => e.seed.to_value(),
            "prompt" => e.prompt.to_value(),
            "scale" => s.scale.to_value(),
            "tile-size" => e.tile_size.to_value(),
            "tile-overlap" => e.tile_overlap.to_value(),
            "color-fix" => ColorFix::from(e.color_fix).to_value(),
            "lq-latent" => LqLatent::from(e.lq_latent).to_value(),
            "tiling" => Tiling::from(e.tiling).to_value(),
            "noise" => Noise::from(e.noise).to_value(),
            "low-memory" => e.low_memory.to_value(),
            "warm-start" => e.warm_start.to_value(),
            "fidelity" => e.fidelity.to_value(),
            "max-inflight" => s.max_inflight.to_value(),
            "qos" => s.qos.to_value(),
            "scene-threshold" => s.scene_threshold.to_value(),
            "clip-max-frames" => s.clip_max_frames.to_value(),
            "tags-as-prompt" => s.tags_as_prompt.to_value(),
            "first-clip-index" => s.first_clip_index.to_value(),
            "analyse-only" => s.analyse_only.to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add_pad(&self.sinkpad).unwrap();
        obj.add_pad(&self.srcpad).unwrap();
    }
}

impl GstObjectImpl for DpirRestore {}

impl ElementImpl for DpirRestore {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "DPIR restoration",
                "Filter/Effect/Video",
                "Restores and upscales video frames and stills with DPIR (dual prompting, DiT), reusing each clip's prompts",
                "gst-dpir developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst_video::VideoCapsBuilder::new().format_list(video::FORMATS.iter().copied()).build();
            vec![
                gst::PadTemplate::new("src", gst::PadDirection::Src, gst::PadPresence::Always, &caps).unwrap(),
                gst::PadTemplate::new("sink", gst::PadDirection::Sink, gst::PadPresence::Always, &caps).unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(&self, transition: gst::StateChange) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        gst::debug!(CAT, imp = self, "state change {transition:?}");
        if transition == gst::StateChange::ReadyToPaused {
            let checked = self.settings.lock().unwrap().check();
            if let Err(msg) = checked {
                gst::element_imp_error!(self, gst::LibraryError::Settings, ("{msg}"));
                return Err(gst::StateChangeError);
            }
            self.reset_worker();
            // Properties may have changed in READY: an engine built from other settings is rebuilt.
            let wanted = self.settings.lock().unwrap().engine.clone();
            let stale = {
                let w = self.worker.lock().unwrap();
                w.engine.is_none() || w.built_with.as_ref() != Some(&wanted)
            };
            if stale {
                self.load_engine()?;
            }
        }
        let ret = self.parent_change_state(transition)?;
        if transition == gst::StateChange::PausedToReady {
            self.reset_worker();
        }
        if transition == gst::StateChange::ReadyToNull {
            // Free the model when the element is shut down.
            let mut w = self.worker.lock().unwrap();
            w.engine = None;
            w.built_with = None;
        }
        Ok(ret)
    }
}
