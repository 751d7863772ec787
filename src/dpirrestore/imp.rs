//! `dpirrestore` implementation: a sink pad whose chain function only queues, and a source pad
//! task that runs the engine and pushes. Serialized events travel through the same queue so
//! they stay in order with the frames around them.

use std::collections::VecDeque;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_video::prelude::*;

use super::video;
use super::{ColorFix, LqLatent, Noise, Precision, Tiling};
use crate::cache::{ClipRequest, ClipTracker, ClipTrackerSettings};
use crate::engine::{CancelFlag, EngineError, EngineFactory, EngineSettings, FrameContext, RestoreEngine, StreamInfo};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "dpirrestore",
        gst::DebugColorFlags::empty(),
        Some("DPIR (dual prompting, DiT) restoration"),
    )
});

const DEFAULT_SCALE: u32 = 1;
/// 0: the model's own default (`sampler.default_steps` in model.json; DPIR: 28).
const DEFAULT_STEPS: u32 = 0;
const DEFAULT_MAX_INFLIGHT: u32 = 2;
const DEFAULT_SCENE_THRESHOLD: f64 = crate::cache::DEFAULT_SCENE_THRESHOLD;

#[derive(Debug, Clone)]
struct Settings {
    model: Option<String>,
    device: String,
    precision: Precision,
    steps: u32,
    seed: u64,
    prompt: String,
    scale: u32,
    tile_size: u32,
    tile_overlap: u32,
    color_fix: ColorFix,
    lq_latent: LqLatent,
    tiling: Tiling,
    noise: Noise,
    low_memory: bool,
    max_inflight: u32,
    qos: bool,
    scene_threshold: f64,
    clip_max_frames: u32,
    tags_as_prompt: bool,
    warm_start: f64,
    first_clip_index: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: None,
            device: "auto".into(),
            precision: Precision::F32,
            steps: DEFAULT_STEPS,
            seed: 0,
            prompt: String::new(),
            scale: DEFAULT_SCALE,
            tile_size: 128,
            tile_overlap: 8,
            color_fix: ColorFix::Wavelet,
            lq_latent: LqLatent::Sample,
            tiling: Tiling::Reference,
            noise: Noise::PerClip,
            low_memory: false,
            max_inflight: DEFAULT_MAX_INFLIGHT,
            qos: false,
            scene_threshold: DEFAULT_SCENE_THRESHOLD,
            clip_max_frames: 0,
            tags_as_prompt: false,
            warm_start: 0.0,
            first_clip_index: 0,
        }
    }
}

impl Settings {
    fn engine_settings(&self) -> EngineSettings {
        let nick = |v: &dyn ToValue| {
            let v = v.to_value();
            glib::EnumValue::from_value(&v).map(|(_, e)| e.nick().to_string()).unwrap_or_default()
        };
        EngineSettings {
            model: self.model.as_ref().map(Into::into),
            device: self.device.clone(),
            precision: nick(&self.precision),
            steps: self.steps,
            seed: self.seed,
            prompt: self.prompt.clone(),
            color_fix: nick(&self.color_fix),
            lq_latent: nick(&self.lq_latent),
            tiling: nick(&self.tiling),
            tile_size: self.tile_size,
            tile_overlap: self.tile_overlap,
            noise: nick(&self.noise),
            low_memory: self.low_memory,
            reuse_prompts: true,
            warm_start: self.warm_start,
        }
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

/// State owned by the worker (source pad task).
struct Worker {
    engine: Option<Box<dyn RestoreEngine>>,
    in_info: Option<gst_video::VideoInfo>,
    out_info: Option<gst_video::VideoInfo>,
    frame_index: u64,
    frames_done: u64,
    started: Option<Instant>,
    segment: gst::FormattedSegment<gst::ClockTime>,
    clips: ClipTracker,
    tag_prompt: Option<String>,
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
        let scale = self.settings.lock().unwrap().scale as i32;
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
        let scale = self.settings.lock().unwrap().scale;
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
            EventView::Segment(_) | EventView::Eos(_) | EventView::StreamStart(_) | EventView::Gap(_) => {
                self.enqueue_event(event)
            }
            EventView::Tag(t) => {
                if self.settings.lock().unwrap().tags_as_prompt {
                    let tags = t.tag();
                    let text = tags
                        .get::<gst::tags::Description>()
                        .map(|v| v.get().to_string())
                        .or_else(|| tags.get::<gst::tags::Title>().map(|v| v.get().to_string()));
                    if let Some(text) = text {
                        self.worker.lock().unwrap().tag_prompt = Some(text);
                    }
                }
                self.enqueue_event(event)
            }
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
            // From a downstream application: applies to the next frame the worker takes.
            self.worker.lock().unwrap().clips.request(req);
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
                    scale: self.settings.lock().unwrap().scale as usize,
                    fps: (in_info.fps().numer() > 0).then(|| (in_info.fps().numer(), in_info.fps().denom())),
                };
                let mut w = self.worker.lock().unwrap();
                let Some(engine) = w.engine.as_mut() else {
                    gst::element_imp_error!(self, gst::CoreError::StateChange, ("No engine loaded"));
                    return Err(gst::FlowError::Error);
                };
                if let Err(e) = engine.configure(&info) {
                    self.post_engine_error(&e);
                    return Err(gst::FlowError::NotNegotiated);
                }
                gst::info!(CAT, imp = self, "configured {}x{} ×{}", info.in_width, info.in_height, info.scale);
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

        let settings_prompt = self.settings.lock().unwrap().prompt.clone();
        let prompt =
            if settings_prompt.is_empty() { w.tag_prompt.clone().unwrap_or_default() } else { settings_prompt };
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

        let engine = w.engine.as_mut().ok_or(gst::FlowError::Error)?;
        let restored = match engine.restore(&image, &ctx) {
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

        // Bookkeeping and progress before pushing, so a blocking downstream doesn't skew fps.
        let elapsed = t0.elapsed();
        *self.frame_time.lock().unwrap() = Some(engine.latency().unwrap_or(elapsed));
        let engine_timings = engine.timings();
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
        let settings = self.settings.lock().unwrap().engine_settings();
        let factory = self.factory.lock().unwrap().clone().unwrap_or_else(crate::engine::default_factory);
        let obj = self.obj();
        let what =
            settings.model.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded dpir-nano".into());
        let _ = obj.post_message(
            gst::message::Progress::builder(gst::ProgressType::Start, "load-model", &format!("Loading model {what}"))
                .src(&*obj)
                .build(),
        );
        match factory(&settings) {
            Ok(engine) => {
                gst::info!(CAT, imp = self, "engine ready: {}", engine.describe());
                let _ = obj.post_message(
                    gst::message::Progress::builder(gst::ProgressType::Complete, "load-model", &engine.describe())
                        .src(&*obj)
                        .build(),
                );
                let mut w = self.worker.lock().unwrap();
                w.engine = Some(engine);
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
        w.in_info = None;
        w.out_info = None;
        w.frame_index = 0;
        w.frames_done = 0;
        w.started = None;
        w.segment = gst::FormattedSegment::new();
        w.clips = ClipTracker::new(clip_settings);
        w.tag_prompt = None;
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
            worker: Mutex::new(Worker {
                engine: None,
                in_info: None,
                out_info: None,
                frame_index: 0,
                frames_done: 0,
                started: None,
                segment: gst::FormattedSegment::new(),
                clips: ClipTracker::new(ClipTrackerSettings::default()),
                tag_prompt: None,
            }),
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
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Model directory (with model.json); unset: the embedded dpir-nano model")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("Compute device: cpu, cuda:N, or auto (first CUDA GPU if built with CUDA, else cpu)")
                    .default_value(Some("auto"))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("precision", Precision::F32)
                    .nick("Precision")
                    .blurb("Numeric precision of the model (bf16 needs a GPU)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("steps")
                    .nick("Steps")
                    .blurb("Sampling steps per frame; 0: the model's default (DPIR: 28, the embedded dpir-nano: few)")
                    .minimum(0)
                    .maximum(1000)
                    .default_value(DEFAULT_STEPS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("seed")
                    .nick("Seed")
                    .blurb("Random seed of the sampler noise (with clip index: any clip re-renders alone)")
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("prompt")
                    .nick("Prompt")
                    .blurb("Text prompt for the T5 encoder (empty: no text; a change starts a new clip)")
                    .default_value(Some(""))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("scale")
                    .nick("Scale")
                    .blurb("Upscaling factor: 1, 2 or 4 (output size = input size × scale)")
                    .minimum(1)
                    .maximum(4)
                    .default_value(DEFAULT_SCALE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("tile-size")
                    .nick("Tile size")
                    .blurb("Latent tile size for large frames (8 px per latent; official 128 = 1024 px)")
                    .minimum(16)
                    .maximum(1024)
                    .default_value(128)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("tile-overlap")
                    .nick("Tile overlap")
                    .blurb("Overlap of latent tiles (official 8 = 64 px), blended with Gaussian weights")
                    .minimum(0)
                    .maximum(512)
                    .default_value(8)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("color-fix", ColorFix::Wavelet)
                    .nick("Colour fix")
                    .blurb("Colour correction of the output towards the input")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("lq-latent", LqLatent::Sample)
                    .nick("LQ latent")
                    .blurb("How the input's latent is drawn: sample (official) or mode (deterministic)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("tiling", Tiling::Reference)
                    .nick("Global prompt tiling")
                    .blurb("Tiling of the global visual prompt: reference (official, quirk included) or corrected")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("noise", Noise::PerClip)
                    .nick("Noise")
                    .blurb("Initial sampler noise: one field per clip (less flicker) or per frame")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("low-memory")
                    .nick("Low memory")
                    .blurb("Free the T5 text encoder after each new prompt is embedded (reloaded on the next prompt change)")
                    .default_value(false)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-inflight")
                    .nick("Max in flight")
                    .blurb("Frames queued for the worker before the streaming thread blocks")
                    .minimum(1)
                    .maximum(64)
                    .default_value(DEFAULT_MAX_INFLIGHT)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("qos")
                    .nick("QoS")
                    .blurb("Skip frames that are already late downstream (off: every frame is restored)")
                    .default_value(false)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("scene-threshold")
                    .nick("Scene threshold")
                    .blurb("Frame difference (0-1) above which a new clip starts and prompts are refreshed")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_SCENE_THRESHOLD)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("clip-max-frames")
                    .nick("Clip max frames")
                    .blurb("Start a new clip after this many frames (0: no limit)")
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("tags-as-prompt")
                    .nick("Tags as prompt")
                    .blurb("Use the stream's description or title tag as the prompt when `prompt` is empty")
                    .default_value(false)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecDouble::builder("warm-start")
                    .nick("Warm start")
                    .blurb(
                        "0: off. Else a strength in (0,1]: within a clip, start each frame's sampling from the previous \
                         output re-noised, running about strength x steps (faster, steadier on static shots; can \
                         ghost on motion). A clip's first frame always starts from noise. Needs 2 or more steps \
                         (dpir-nano's default is 1: set steps too)",
                    )
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(0.0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt64::builder("first-clip-index")
                    .nick("First clip index")
                    .blurb("Index of the stream's first clip: render clip N alone (same seed) as it was in the whole film")
                    .default_value(0)
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => s.model = value.get::<Option<String>>().unwrap().filter(|m| !m.is_empty()),
            "device" => s.device = value.get::<Option<String>>().unwrap().unwrap_or_else(|| "auto".into()),
            "precision" => s.precision = value.get().unwrap(),
            "steps" => s.steps = value.get().unwrap(),
            "seed" => s.seed = value.get().unwrap(),
            "prompt" => s.prompt = value.get::<Option<String>>().unwrap().unwrap_or_default(),
            "scale" => {
                let v: u32 = value.get().unwrap();
                if v == 3 {
                    gst::warning!(CAT, imp = self, "scale must be 1, 2 or 4; using 2");
                    s.scale = 2;
                } else {
                    s.scale = v;
                }
            }
            "tile-size" => s.tile_size = value.get().unwrap(),
            "tile-overlap" => s.tile_overlap = value.get().unwrap(),
            "color-fix" => s.color_fix = value.get().unwrap(),
            "lq-latent" => s.lq_latent = value.get().unwrap(),
            "tiling" => s.tiling = value.get().unwrap(),
            "noise" => s.noise = value.get().unwrap(),
            "low-memory" => s.low_memory = value.get().unwrap(),
            "max-inflight" => s.max_inflight = value.get().unwrap(),
            "qos" => s.qos = value.get().unwrap(),
            "scene-threshold" => s.scene_threshold = value.get().unwrap(),
            "clip-max-frames" => s.clip_max_frames = value.get().unwrap(),
            "tags-as-prompt" => s.tags_as_prompt = value.get().unwrap(),
            "warm-start" => s.warm_start = value.get().unwrap(),
            "first-clip-index" => s.first_clip_index = value.get().unwrap(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => s.model.to_value(),
            "device" => s.device.to_value(),
            "precision" => s.precision.to_value(),
            "steps" => s.steps.to_value(),
            "seed" => s.seed.to_value(),
            "prompt" => s.prompt.to_value(),
            "scale" => s.scale.to_value(),
            "tile-size" => s.tile_size.to_value(),
            "tile-overlap" => s.tile_overlap.to_value(),
            "color-fix" => s.color_fix.to_value(),
            "lq-latent" => s.lq_latent.to_value(),
            "tiling" => s.tiling.to_value(),
            "noise" => s.noise.to_value(),
            "low-memory" => s.low_memory.to_value(),
            "max-inflight" => s.max_inflight.to_value(),
            "qos" => s.qos.to_value(),
            "scene-threshold" => s.scene_threshold.to_value(),
            "clip-max-frames" => s.clip_max_frames.to_value(),
            "tags-as-prompt" => s.tags_as_prompt.to_value(),
            "warm-start" => s.warm_start.to_value(),
            "first-clip-index" => s.first_clip_index.to_value(),
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
            self.reset_worker();
            let need_load = self.worker.lock().unwrap().engine.is_none();
            if need_load {
                self.load_engine()?;
            }
        }
        let ret = self.parent_change_state(transition)?;
        if transition == gst::StateChange::PausedToReady {
            self.reset_worker();
        }
        if transition == gst::StateChange::ReadyToNull {
            // Settings may change in NULL/READY: rebuild the engine next time.
            self.worker.lock().unwrap().engine = None;
        }
        Ok(ret)
    }
}
