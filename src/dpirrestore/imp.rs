//! `dpirrestore` implementation: a sink pad whose chain function only queues, and a source pad
//! task (the worker) that runs the engine and pushes. Serialized events travel through the same
//! queue so they stay in order with the frames around them, and the worker applies them in that
//! order; nothing the streaming or downstream threads do waits for an inference.
//!
//! Three locks, always taken in this order and never the other way round:
//! 1. `worker` — the engine, the clip tracker and the stream's bookkeeping; held by the worker
//!    across an inference, taken elsewhere only while the task is stopped or paused;
//! 2. `state` (with `cond`) — the queue between the streaming thread and the worker, the flow,
//!    flushing, QoS, an upstream clip request, the duration and the measured latency; held briefly;
//! 3. `settings` — the properties; held briefly.
//!
//! `cancel`, an atomic flag, tells an inference in progress to stop.

use std::collections::VecDeque;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;

use super::{ColorFix, LqLatent, Noise, Precision, Tiling, caps, messages, video};
use crate::clip::{ClipRequest, ClipTracker, ClipTrackerSettings};
use crate::engine::{
    CancelFlag, DeviceSpec, EngineError, EngineFactory, EngineSettings, FrameContext, Image, LoadError, RestoreEngine,
    StreamInfo,
};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "dpirrestore",
        gst::DebugColorFlags::empty(),
        Some("DPIR (dual prompting, DiT) restoration"),
    )
});

/// Every property's value, and the engine factory. `Default` is the one source of the
/// ParamSpec defaults; the model-side ones come from [`EngineSettings::default`].
#[derive(Clone)]
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
    /// Replaces the DPIR engine (applications embedding the plugin from Rust, tests).
    factory: Option<EngineFactory>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            engine: EngineSettings::default(),
            device_error: None,
            scale: 1,
            max_inflight: 2,
            qos: false,
            scene_threshold: crate::clip::DEFAULT_SCENE_THRESHOLD,
            clip_max_frames: 0,
            tags_as_prompt: false,
            first_clip_index: 0,
            analyse_only: false,
            factory: None,
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

    fn clip_settings(&self) -> ClipTrackerSettings {
        ClipTrackerSettings {
            scene_threshold: self.scene_threshold,
            clip_max_frames: self.clip_max_frames,
            first_clip_index: self.first_clip_index,
        }
    }
}

/// What travels from the streaming thread to the worker, in stream order.
enum Item {
    Buffer(gst::Buffer),
    Event(gst::Event),
}

/// Everything the streaming thread, the worker and downstream share, behind one lock.
struct State {
    items: VecDeque<Item>,
    /// Buffers in `items` (events don't count against `max-inflight`).
    frames: usize,
    /// The worker is processing an item it has taken out of `items`.
    busy: bool,
    flushing: bool,
    /// Last downstream flow result, returned by the chain function.
    flow: Result<gst::FlowSuccess, gst::FlowError>,
    /// Running time before which frames are late (from downstream QOS events).
    qos_earliest: Option<gst::ClockTime>,
    qos_processed: u64,
    qos_dropped: u64,
    /// A `dpir-clip` request from downstream (upstream event): taken by the worker at its next
    /// frame, so the sending thread never waits for an inference.
    upstream_clip: Option<ClipRequest>,
    /// Duration of the stream from upstream, for the ETA.
    duration: Option<gst::ClockTime>,
    /// Measured processing time per frame, for LATENCY.
    frame_time: Option<Duration>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            frames: 0,
            busy: false,
            flushing: false,
            flow: Ok(gst::FlowSuccess::Ok),
            qos_earliest: None,
            qos_processed: 0,
            qos_dropped: 0,
            upstream_clip: None,
            duration: None,
            frame_time: None,
        }
    }
}

impl State {
    /// Forget QoS, the clip request and the duration (a new stream, or after a flush).
    fn reset_stream(&mut self) {
        self.qos_earliest = None;
        self.qos_processed = 0;
        self.qos_dropped = 0;
        self.upstream_clip = None;
    }
}

/// The worker's state: the engine and the stream's bookkeeping.
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
        }
    }
}

pub struct DpirRestore {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    worker: Mutex<Worker>,
    state: Mutex<State>,
    cond: Condvar,
    settings: Mutex<Settings>,
    cancel: CancelFlag,
}

/// The GStreamer error an engine error is posted as.
fn post_engine_error(imp: &DpirRestore, e: &EngineError) {
    // First line only: with RUST_BACKTRACE set, candle appends a backtrace.
    let msg = e.to_string();
    let msg = msg.lines().next().unwrap_or_default();
    match e {
        EngineError::Load(LoadError::Invalid(_)) => {
            gst::element_imp_error!(imp, gst::ResourceError::OpenRead, ("{msg}"))
        }
        EngineError::Load(LoadError::Memory(_)) => {
            gst::element_imp_error!(imp, gst::ResourceError::NoSpaceLeft, ("{msg}"))
        }
        EngineError::Load(LoadError::Settings(_)) | EngineError::Settings(_) => {
            gst::element_imp_error!(imp, gst::LibraryError::Settings, ("{msg}"))
        }
        EngineError::Stream(_) => gst::element_imp_error!(imp, gst::StreamError::Format, ("{msg}")),
        EngineError::Runtime(_) => gst::element_imp_error!(imp, gst::StreamError::Failed, ("{msg}")),
        EngineError::Cancelled => {}
    }
}

impl DpirRestore {
    pub(super) fn set_engine_factory(&self, factory: EngineFactory) {
        self.settings.lock().unwrap().factory = Some(factory);
    }

    fn scale(&self) -> u32 {
        self.settings.lock().unwrap().effective_scale()
    }

    // ---- sink pad ------------------------------------------------------------------------

    fn sink_chain(&self, buffer: gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let max = self.settings.lock().unwrap().max_inflight.max(1) as usize;
        let mut s = self.state.lock().unwrap();
        loop {
            if s.flushing {
                return Err(gst::FlowError::Flushing);
            }
            s.flow?;
            if s.frames < max {
                break;
            }
            // Back-pressure: wait for the worker to take a frame.
            s = self.cond.wait(s).unwrap();
        }
        s.items.push_back(Item::Buffer(buffer));
        s.frames += 1;
        self.cond.notify_all();
        s.flow
    }

    fn enqueue_event(&self, event: gst::Event) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.flushing {
            return false;
        }
        s.items.push_back(Item::Event(event));
        self.cond.notify_all();
        true
    }

    /// Block until the worker has handled everything queued so far.
    fn wait_drained(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.flushing && (!s.items.is_empty() || s.busy) {
            s = self.cond.wait(s).unwrap();
        }
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        gst::log!(CAT, obj = pad, "sink event {:?}", event.type_());
        match event.view() {
            EventView::FlushStart(_) => {
                {
                    let mut s = self.state.lock().unwrap();
                    s.flushing = true;
                    // Sticky events survive a flush (caps above all), except segment and EOS:
                    // keep those the worker has not handled yet.
                    s.items.retain(|it| match it {
                        Item::Event(e) => {
                            e.is_sticky() && !matches!(e.type_(), gst::EventType::Segment | gst::EventType::Eos)
                        }
                        Item::Buffer(_) => false,
                    });
                    s.frames = 0;
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
                    // The task is paused: the worker lock is free.
                    let mut w = self.worker.lock().unwrap();
                    w.clips.reset();
                    w.frame_index = 0;
                }
                {
                    let mut s = self.state.lock().unwrap();
                    s.flushing = false;
                    s.flow = Ok(gst::FlowSuccess::Ok);
                    s.reset_stream();
                    self.cancel.set(false);
                }
                let ret = self.srcpad.push_event(event);
                if self.srcpad.is_active() {
                    self.start_task();
                }
                ret
            }
            EventView::Caps(c) => {
                let caps = c.caps_owned();
                match caps::output(&caps, self.scale()) {
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
            EventView::CustomDownstreamOob(_) if messages::parse_clip_event(&event).is_some() => {
                self.enqueue_event(event)
            }
            _ if event.is_serialized() => self.enqueue_event(event),
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    fn query_caps(&self, pad: &gst::Pad, filter: Option<&gst::CapsRef>) -> gst::Caps {
        let (other, towards_src) = if pad == &self.srcpad { (&self.sinkpad, true) } else { (&self.srcpad, false) };
        caps::query(pad, other, towards_src, self.scale(), filter)
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
                    self.state.lock().unwrap().frame_time.map(|d| d.as_nanos() as u64).unwrap_or(0),
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
        if let Some(req) = messages::parse_clip_event(&event) {
            // From a downstream application: applies to the next frame the worker takes.
            self.state.lock().unwrap().upstream_clip = Some(req);
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
                self.state.lock().unwrap().qos_earliest = Some(earliest);
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
                let mut s = self.state.lock().unwrap();
                s.flushing = false;
                s.flow = Ok(gst::FlowSuccess::Ok);
                self.cancel.set(false);
            }
            self.start_task();
        } else {
            {
                let mut s = self.state.lock().unwrap();
                s.flushing = true;
                s.items.clear();
                s.frames = 0;
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
            let mut s = self.state.lock().unwrap();
            while s.items.is_empty() && !s.flushing {
                s = self.cond.wait(s).unwrap();
            }
            if s.flushing {
                drop(s);
                let _ = self.srcpad.pause_task();
                return;
            }
            let item = s.items.pop_front().unwrap();
            if matches!(item, Item::Buffer(_)) {
                s.frames -= 1;
            }
            s.busy = true;
            self.cond.notify_all();
            item
        };

        // The worker lock is held for the item's processing, not while pushing downstream.
        let out = {
            let mut w = self.worker.lock().unwrap();
            match item {
                Item::Buffer(buffer) => self.process_buffer(&mut w, buffer).map(|b| b.map(Item::Buffer)),
                Item::Event(event) => self.process_event(&mut w, event).map(|e| Some(Item::Event(e))),
            }
        };
        let res = match out {
            Ok(Some(Item::Buffer(b))) => self.srcpad.push(b),
            Ok(Some(Item::Event(e))) => self.push_event(e),
            Ok(None) => Ok(gst::FlowSuccess::Ok),
            Err(e) => Err(e),
        };

        let mut s = self.state.lock().unwrap();
        s.busy = false;
        if let Err(err) = res {
            if !s.flushing {
                s.flow = Err(err);
            }
            self.cond.notify_all();
            drop(s);
            gst::debug!(CAT, imp = self, "worker pausing: {err:?}");
            // FlowError::Error comes with its own element error already posted; EOS and
            // flushing need none.
            if matches!(err, gst::FlowError::NotLinked | gst::FlowError::NotNegotiated | gst::FlowError::NotSupported) {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("Internal data stream error."),
                    ["streaming stopped, reason {err:?}"]
                );
            }
            let _ = self.srcpad.pause_task();
            return;
        }
        self.cond.notify_all();
    }

    /// Apply a serialized event in stream order; returns the event to push on.
    fn process_event(&self, w: &mut Worker, event: gst::Event) -> Result<gst::Event, gst::FlowError> {
        use gst::EventView;
        match event.view() {
            EventView::Caps(c) => {
                let (scale, analyse_only) = {
                    let s = self.settings.lock().unwrap();
                    (s.effective_scale(), s.analyse_only)
                };
                let (in_info, out_info) = caps::output(&c.caps_owned(), scale).map_err(|msg| {
                    gst::element_imp_error!(self, gst::StreamError::Format, ("{msg}"));
                    gst::FlowError::NotNegotiated
                })?;
                let info = StreamInfo {
                    in_width: in_info.width() as usize,
                    in_height: in_info.height() as usize,
                    scale: scale as usize,
                    fps: (in_info.fps().numer() > 0).then(|| (in_info.fps().numer(), in_info.fps().denom())),
                    depth: video::depth(in_info.format()),
                };
                if let Some(engine) = w.engine.as_mut() {
                    if let Err(e) = engine.configure(&info) {
                        post_engine_error(self, &e);
                        return Err(gst::FlowError::NotNegotiated);
                    }
                    gst::debug!(CAT, imp = self, "{}", engine.describe());
                } else if !analyse_only {
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
                let out_caps = out_info.to_caps().map_err(|_| gst::FlowError::NotNegotiated)?;
                Ok(gst::event::Caps::new(&out_caps))
            }
            EventView::Segment(seg) => {
                if let Ok(seg) = seg.segment().clone().downcast::<gst::ClockTime>() {
                    w.segment = seg;
                }
                if let Some(d) = self.sinkpad.peer_query_duration::<gst::ClockTime>() {
                    self.state.lock().unwrap().duration = Some(d);
                }
                Ok(event)
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
                        w.clips.prompts.set_tag(Some(text));
                    }
                }
                Ok(event)
            }
            _ => {
                if let Some(req) = messages::parse_clip_event(&event) {
                    gst::debug!(CAT, imp = self, "clip event: {req:?}");
                    w.clips.request(req);
                }
                Ok(event)
            }
        }
    }

    fn push_event(&self, event: gst::Event) -> Result<gst::FlowSuccess, gst::FlowError> {
        let is_caps = event.type_() == gst::EventType::Caps;
        let is_eos = event.type_() == gst::EventType::Eos;
        if !self.srcpad.push_event(event) {
            if is_caps {
                return Err(gst::FlowError::NotNegotiated);
            }
            if is_eos {
                gst::warning!(CAT, imp = self, "EOS not handled downstream");
            }
        }
        Ok(gst::FlowSuccess::Ok)
    }

    /// Warnings about the settings or the stream, as GStreamer warning messages.
    fn post_warnings(&self, warnings: &[String]) {
        for msg in warnings {
            gst::element_imp_warning!(self, gst::LibraryError::Settings, ("{msg}"));
        }
    }

    /// True (and counted) if the frame is already late downstream and QoS is enabled.
    fn qos_skip(&self, buffer: &gst::Buffer, segment: &gst::FormattedSegment<gst::ClockTime>) -> Option<(u64, u64)> {
        if !self.settings.lock().unwrap().qos {
            return None;
        }
        let mut s = self.state.lock().unwrap();
        match (s.qos_earliest, buffer.pts().and_then(|pts| segment.to_running_time(pts))) {
            (Some(earliest), Some(rt)) if rt < earliest => {
                s.qos_dropped += 1;
                Some((s.qos_processed, s.qos_dropped))
            }
            _ => None,
        }
    }

    /// Restore a frame; returns the buffer to push (none for a frame skipped under QoS).
    fn process_buffer(&self, w: &mut Worker, inbuf: gst::Buffer) -> Result<Option<gst::Buffer>, gst::FlowError> {
        let t0 = Instant::now();
        let (Some(in_info), Some(out_info)) = (w.in_info.clone(), w.out_info.clone()) else {
            gst::element_imp_error!(self, gst::CoreError::Negotiation, ("Buffer before caps"));
            return Err(gst::FlowError::NotNegotiated);
        };
        if let Some((processed, dropped)) = self.qos_skip(&inbuf, &w.segment) {
            messages::qos_skipped(self.obj().upcast_ref(), &inbuf, &w.segment, processed, dropped);
            gst::debug!(CAT, imp = self, "QoS: skipping late frame {:?}", inbuf.pts());
            w.frame_index += 1;
            return Ok(None);
        }

        let (frame, alpha) = {
            let map = gst_video::VideoFrameRef::from_buffer_ref_readable(inbuf.as_ref(), &in_info).map_err(|_| {
                gst::element_imp_error!(self, gst::StreamError::Format, ("Cannot map input frame"));
                gst::FlowError::Error
            })?;
            let stride = map.plane_stride()[0] as usize;
            let data = map.plane_data(0).map_err(|_| gst::FlowError::Error)?;
            video::read(in_info.format(), in_info.width() as usize, in_info.height() as usize, stride, data)
        };

        let (property_prompt, analyse_only) = {
            let s = self.settings.lock().unwrap();
            (s.engine.prompt.clone(), s.analyse_only)
        };
        if let Some(req) = self.state.lock().unwrap().upstream_clip.take() {
            w.clips.request(req);
        }
        let index = w.frame_index;
        let pos = w.clips.observe(&frame, &property_prompt);
        messages::clip(self.obj().upcast_ref(), &pos, index, inbuf.pts());

        let outbuf = if analyse_only {
            // Segmentation only (a pre-pass): the frame goes on untouched.
            inbuf.clone()
        } else {
            let ctx = FrameContext {
                index,
                clip_index: pos.clip_index,
                position: pos.position,
                new_clip: pos.reason,
                prompt: pos.prompt,
                cancel: self.cancel.clone(),
            };
            let engine = w.engine.as_mut().ok_or(gst::FlowError::Error)?;
            let restored = match engine.restore(frame, &ctx) {
                Ok(r) => r,
                Err(EngineError::Cancelled) => return Err(gst::FlowError::Flushing),
                Err(e) => {
                    post_engine_error(self, &e);
                    return Err(gst::FlowError::Error);
                }
            };
            self.post_warnings(&restored.warnings);
            gst::debug!(CAT, imp = self, "frame {index}: {}", restored.timings);
            self.output_buffer(&inbuf, &restored.image, &alpha, &in_info, &out_info)?
        };

        // Bookkeeping and progress before pushing, so a blocking downstream doesn't skew fps.
        w.frame_index += 1;
        w.frames_done += 1;
        let started = *w.started.get_or_insert(t0);
        let fps = w.frames_done as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let duration = {
            let mut s = self.state.lock().unwrap();
            s.qos_processed += 1;
            if !analyse_only {
                s.frame_time = Some(t0.elapsed());
            }
            s.duration
        };
        messages::progress(self.obj().upcast_ref(), index, w.frames_done, fps, inbuf.pts(), duration, in_info.fps());
        Ok(Some(outbuf))
    }

    /// The restored image in a new buffer of the output format, with the input's timestamps and
    /// flags.
    fn output_buffer(
        &self,
        inbuf: &gst::Buffer,
        image: &Image,
        alpha: &video::Alpha,
        in_info: &gst_video::VideoInfo,
        out_info: &gst_video::VideoInfo,
    ) -> Result<gst::Buffer, gst::FlowError> {
        if image.width != out_info.width() as usize || image.height != out_info.height() as usize {
            gst::element_imp_error!(
                self,
                gst::StreamError::Failed,
                (
                    "Engine returned {}x{}, expected {}x{}",
                    image.width,
                    image.height,
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
            let mut frame = gst_video::VideoFrameRef::from_buffer_ref_writable(outref, out_info)
                .map_err(|_| gst::FlowError::Error)?;
            let stride = frame.plane_stride()[0] as usize;
            let data = frame.plane_data_mut(0).map_err(|_| gst::FlowError::Error)?;
            video::write(out_info.format(), image, alpha, in_info.width() as usize, stride, data);
        }
        Ok(outbuf)
    }

    // ---- engine loading --------------------------------------------------------------------

    /// Build the engine (READY→PAUSED), unless the one built from the same settings is there.
    fn load_engine(&self, w: &mut Worker) -> Result<(), gst::StateChangeError> {
        let settings = self.settings.lock().unwrap().clone();
        if settings.analyse_only {
            gst::info!(CAT, imp = self, "analyse-only: no model is loaded");
            w.engine = None;
            w.built_with = None;
            return Ok(());
        }
        if w.engine.is_some() && w.built_with.as_ref() == Some(&settings.engine) {
            return Ok(());
        }
        let factory = settings.factory.clone().unwrap_or_else(crate::engine::dpir::factory);
        let obj = self.obj();
        let what = settings
            .engine
            .model
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "embedded dpir-nano".into());
        messages::load(obj.upcast_ref(), gst::ProgressType::Start, &format!("Loading model {what}"));
        let t0 = Instant::now();
        match factory(&settings.engine) {
            Ok(engine) => {
                gst::info!(
                    CAT,
                    imp = self,
                    "engine ready in {:.2} s, process resident {:.2} GiB: {}",
                    t0.elapsed().as_secs_f64(),
                    crate::engine::resident_memory() as f64 / (1u64 << 30) as f64,
                    engine.describe()
                );
                messages::load(obj.upcast_ref(), gst::ProgressType::Complete, &engine.describe());
                self.post_warnings(&engine.load_warnings());
                w.engine = Some(engine);
                w.built_with = Some(settings.engine);
                Ok(())
            }
            Err(e) => {
                messages::load(obj.upcast_ref(), gst::ProgressType::Error, &e.to_string());
                post_engine_error(self, &e);
                Err(gst::StateChangeError)
            }
        }
    }

    /// A new stream: the worker's bookkeeping and the shared state start afresh (the engine
    /// stays).
    fn reset_stream(&self, w: &mut Worker) {
        let clips = self.settings.lock().unwrap().clip_settings();
        let (engine, built_with) = (w.engine.take(), w.built_with.take());
        *w = Worker::new(clips);
        w.engine = engine;
        w.built_with = built_with;
        let mut s = self.state.lock().unwrap();
        s.reset_stream();
        s.duration = None;
    }
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
            worker: Mutex::new(Worker::new(ClipTrackerSettings::default())),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            settings: Mutex::new(Settings::default()),
            cancel: CancelFlag::default(),
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
                    .blurb(
                        "Precision the weights are held in: f32, or f16/bf16 for half the memory. On the CPU every \
                         precision computes in f32; on a GPU in this precision (an f16 overflow falls back to bf16 \
                         with a warning)",
                    )
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
                            Smaller tiles need less memory (the autoencoder's tiles shrink too). A size the model's \
                            position table cannot take is refused when the element starts")
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
                    .blurb(
                        "Keep the T5 text encoder only while it embeds a new prompt (reloaded on the next prompt \
                         change). Chosen automatically, with a warning, when T5 does not fit beside the rest",
                    )
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
            // The task is not running: the worker lock is free. Properties may have changed in
            // READY: an engine built from other settings is rebuilt.
            let mut w = self.worker.lock().unwrap();
            self.reset_stream(&mut w);
            self.load_engine(&mut w)?;
        }
        let ret = self.parent_change_state(transition)?;
        if transition == gst::StateChange::PausedToReady {
            self.reset_stream(&mut self.worker.lock().unwrap());
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
