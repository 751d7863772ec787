//! Per-clip temporal reuse on real footage: scene cuts found exactly where the hand-checked cuts
//! are (the 1906 film and `bikes.mp4`, concatenated), `clip-max-frames`, `dpir-clip` events
//! (downstream and upstream) and tags as prompt; with the DPIR engine (tiny fixture model):
//! encoders run once per clip, a clip re-renders alone bit-identically (per-clip and per-frame
//! noise, warm start), and the warm start never crosses a clip boundary.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use gst::prelude::*;
use gstdpir::dpirrestore::DpirRestore;
use gstdpir::engine::clip_state::ReuseStats;
use gstdpir::engine::dpir::DpirEngine;
use gstdpir::engine::{
    EngineError, EngineSettings, Frame, FrameContext, FrameTimings, Image, Pixels, RestoreEngine, Restored, StreamInfo,
};

const FILM: &str = "Shepard_Calais_1906_FrenchGP.ogv";
const BIKES: &str = "bikes.mp4";
/// Frames of the film (15 fps) and of bikes.mp4 (25 fps), decoded.
const FILM_FRAMES: u64 = 288;
/// Hand-checked cuts (first frame of each new shot): the film has one camera change; bikes.mp4
/// has five. Everything else in them (film flicker, dust, scratches, fast pans) is not a cut.
const FILM_CUTS: [u64; 1] = [81];
const BIKES_CUTS: [u64; 5] = [30, 76, 137, 187, 242];

/// One `dpir-clip` message.
#[derive(Debug, Clone, PartialEq)]
struct Clip {
    index: u64,
    frame: u64,
    reason: String,
    difference: f64,
}

/// Decoded frames of a real video scaled to `w × h` RGB: the raw bytes of each buffer.
fn decode(file: &str, w: u32, h: u32) -> Vec<Vec<u8>> {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! videoscale ! \
         video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! fakesink name=s sync=false",
        media(file).display()
    ));
    let store = capture(&p, "s", 10_000);
    run_pipeline(&p).expect("decode");
    store.lock().unwrap().iter().map(|(b, _)| b.map_readable().unwrap().to_vec()).collect()
}

/// A short real clip with a hard cut: the first `film` frames of the 1906 film then the first
/// `bikes` frames of bikes.mp4, at `w × h`, as a raw RGB file (exact frame counts: `identity
/// eos-after` on a decoder is not exact).
fn raw_clip(film: usize, bikes: usize, w: u32, h: u32) -> std::path::PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // Made once per test run (a few MB in the temporary directory, this process's own: a file
    // left by an earlier run, or another build, is never trusted).
    let path = std::env::temp_dir().join(format!("gst-dpir-clip-{film}-{bikes}-{w}x{h}-{}.rgb", std::process::id()));
    if !path.exists() {
        let mut data = Vec::new();
        for (file, n) in [(FILM, film), (BIKES, bikes)] {
            if n > 0 {
                let frames = decode(file, w, h);
                assert!(frames.len() >= n, "{file}: {} frames", frames.len());
                frames[..n].iter().for_each(|f| data.extend_from_slice(f));
            }
        }
        let tmp = path.with_extension(format!("part{}", std::process::id()));
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// `raw_clip` through `dpirrestore name=d {props}` into `identity name=o ! fakesink`. The sink
/// does not sync: a syncing sink sends QoS events, and upstream filters then drop late frames.
fn clip_pipeline(film: usize, bikes: usize, w: u32, h: u32, props: &str) -> gst::Pipeline {
    launch(&format!(
        "filesrc location=\"{}\" ! rawvideoparse format=rgb width={w} height={h} framerate=15/1 ! queue name=in ! \
         dpirrestore name=d {props} ! identity name=o ! fakesink sync=false",
        raw_clip(film, bikes, w, h).display()
    ))
}

/// The whole film then the whole of bikes.mp4 (GStreamer `concat`), both scaled to `w × h` RGB
/// (bikes.mp4 letterboxed), through `dpirrestore name=d {props}`.
fn concat_pipeline(w: u32, h: u32, props: &str) -> gst::Pipeline {
    let branch = |file: &str| {
        format!(
            "filesrc location=\"{}\" ! decodebin ! videoconvert ! videoscale ! \
             video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! c. ",
            media(file).display()
        )
    };
    launch(&format!(
        "concat name=c ! queue name=in ! dpirrestore name=d {props} ! identity name=o ! fakesink sync=false {} {}",
        branch(FILM),
        branch(BIKES)
    ))
}

/// Collect the `dpir-clip` messages (synchronously, in order).
fn clip_messages(p: &gst::Pipeline) -> Arc<Mutex<Vec<Clip>>> {
    let clips = Arc::new(Mutex::new(Vec::new()));
    let c2 = clips.clone();
    p.bus().unwrap().set_sync_handler(move |_, msg| {
        if let gst::MessageView::Element(e) = msg.view()
            && let Some(s) = e.structure()
            && s.name() == "dpir-clip"
        {
            c2.lock().unwrap().push(Clip {
                index: s.get("index").unwrap(),
                frame: s.get("frame-index").unwrap(),
                reason: s.get::<String>("reason").unwrap(),
                difference: s.get("difference").unwrap(),
            });
        }
        gst::BusSyncReply::Pass
    });
    clips
}

/// Nearest-neighbour engine that records the contexts it sees (segmentation tests: no model).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<FrameContext>>>);

struct RecordingEngine {
    scale: usize,
    rec: Recorder,
}

impl RestoreEngine for RecordingEngine {
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        self.scale = info.scale;
        Ok(())
    }
    fn restore(&mut self, frame: Frame, ctx: &FrameContext) -> Result<Restored, EngineError> {
        self.rec.0.lock().unwrap().push(ctx.clone());
        Ok(Restored {
            image: Image::upscale_nearest(&frame, self.scale),
            timings: FrameTimings::default(),
            warnings: vec![],
        })
    }
}

fn element(p: &gst::Pipeline) -> DpirRestore {
    p.by_name("d").unwrap().downcast::<DpirRestore>().unwrap()
}

fn use_recorder(p: &gst::Pipeline) -> Recorder {
    let rec = Recorder::default();
    let r2 = rec.clone();
    element(p).set_engine_factory(move |_| Ok(Box::new(RecordingEngine { scale: 1, rec: r2.clone() })));
    rec
}

/// (first frame, reason) of each clip.
fn boundaries(clips: &[Clip]) -> Vec<(u64, &str)> {
    clips.iter().map(|c| (c.frame, c.reason.as_str())).collect()
}

#[test]
fn hard_cuts_in_two_real_videos_concatenated_are_found_exactly() {
    // Whole film (its own cut at 81, lots of flicker) then the whole of bikes.mp4 (five cuts),
    // at the film's size: the hard cut between them is at frame 288.
    let p = concat_pipeline(214, 160, "");
    let rec = use_recorder(&p);
    let clips = clip_messages(&p);
    run_pipeline(&p).expect("concat pipeline");
    let clips = clips.lock().unwrap();
    let mut expected = vec![(0, "start")];
    expected.extend(FILM_CUTS.iter().map(|&f| (f, "scene-cut")));
    expected.push((FILM_FRAMES, "scene-cut"));
    expected.extend(BIKES_CUTS.iter().map(|&f| (FILM_FRAMES + f, "scene-cut")));
    eprintln!("{} frames restored", rec.0.lock().unwrap().len());
    for c in clips.iter() {
        eprintln!("clip {} at frame {} ({}, difference {:.3})", c.index, c.frame, c.reason, c.difference);
    }
    assert_eq!(boundaries(&clips), expected);
    assert_eq!(clips.iter().map(|c| c.index).collect::<Vec<_>>(), (0..expected.len() as u64).collect::<Vec<_>>());

    // The engine saw the same segmentation, frame by frame.
    let ctxs = rec.0.lock().unwrap();
    assert_eq!(ctxs.len() as u64, FILM_FRAMES + 250);
    let mut clip = 0;
    for (i, ctx) in ctxs.iter().enumerate() {
        if expected.iter().skip(1).any(|&(f, _)| f == i as u64) {
            clip += 1;
        }
        assert_eq!(ctx.index, i as u64);
        assert_eq!(ctx.clip_index, clip, "frame {i}");
        assert_eq!(ctx.new_clip.is_some(), expected.iter().any(|&(f, _)| f == i as u64), "frame {i}");
    }
}

#[test]
fn scene_cut_statistic_separates_cuts_from_flicker_and_motion_with_a_margin() {
    // The statistic itself, frame by frame (no element): every hand-checked cut scores well above
    // the default threshold, every other frame well below, in both videos and across the join.
    use gstdpir::clip::{ClipTracker, ClipTrackerSettings, DEFAULT_SCENE_THRESHOLD};
    let (w, h) = (214usize, 160usize);
    let stride = (w * 3).next_multiple_of(4);
    let mut tracker = ClipTracker::new(ClipTrackerSettings { scene_threshold: 1.0, ..Default::default() });
    let mut scores = Vec::new();
    for file in [FILM, BIKES] {
        for raw in decode(file, w as u32, h as u32) {
            let mut rgb = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                rgb.extend_from_slice(&raw[y * stride..y * stride + w * 3]);
            }
            let frame = Frame { width: w, height: h, pixels: Pixels::Rgb8(rgb) };
            scores.push(tracker.observe(&frame, "").difference);
        }
    }
    let cuts: Vec<usize> = FILM_CUTS
        .iter()
        .chain(&[FILM_FRAMES])
        .chain(&BIKES_CUTS.map(|f| FILM_FRAMES + f))
        .map(|&f| f as usize)
        .collect();
    let min_cut = cuts.iter().map(|&i| scores[i]).fold(f64::INFINITY, f64::min);
    let (max_other, at) = scores
        .iter()
        .enumerate()
        .filter(|(i, _)| !cuts.contains(i))
        .map(|(i, &d)| (d, i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    eprintln!("cuts score ≥ {min_cut:.3}; other frames ≤ {max_other:.3} (frame {at})");
    assert!(min_cut > DEFAULT_SCENE_THRESHOLD + 0.1, "weakest cut {min_cut:.3}");
    assert!(max_other < DEFAULT_SCENE_THRESHOLD - 0.05, "frame {at} scores {max_other:.3}");
}

#[test]
fn clip_max_frames_refreshes_long_shots() {
    let p = clip_pipeline(100, 0, 214, 160, "clip-max-frames=30");
    use_recorder(&p);
    let clips = clip_messages(&p);
    run_pipeline(&p).unwrap();
    let clips = clips.lock().unwrap();
    assert_eq!(boundaries(&clips), vec![(0, "start"), (30, "max-frames"), (60, "max-frames"), (81, "scene-cut")]);
}

#[test]
fn clip_events_from_downstream_and_upstream_start_clips_at_the_next_frame() {
    // No queue between `d` and `o`: a probe on `o` runs on the element's worker thread while
    // frame k is pushed, so an upstream event sent from there applies to frame k + 1.
    let p = clip_pipeline(40, 0, 214, 160, "prompt=\"a street\"");
    let rec = use_recorder(&p);
    let clips = clip_messages(&p);
    let d = element(&p);
    // Downstream (serialized) event just before frame 10, with a prompt.
    let seen = Arc::new(AtomicU64::new(0));
    let sink = d.static_pad("sink").unwrap();
    p.by_name("in").unwrap().static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        if seen.fetch_add(1, Ordering::SeqCst) == 10 {
            let s = gst::Structure::builder("dpir-clip").field("prompt", "a 1906 racing car").build();
            assert!(sink.send_event(gst::event::CustomDownstream::new(s)));
        }
        gst::PadProbeReturn::Ok
    });
    // Upstream event (from a sink-side application) while frame 25 leaves: clip at 26.
    let out = Arc::new(AtomicU64::new(0));
    let src = d.static_pad("src").unwrap();
    p.by_name("o").unwrap().static_pad("sink").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        if out.fetch_add(1, Ordering::SeqCst) == 25 {
            let s = gst::Structure::builder("dpir-clip").build();
            assert!(src.send_event(gst::event::CustomUpstream::new(s)));
        }
        gst::PadProbeReturn::Ok
    });
    run_pipeline(&p).unwrap();
    let clips = clips.lock().unwrap();
    assert_eq!(boundaries(&clips), vec![(0, "start"), (10, "event"), (26, "event")]);
    let ctxs = rec.0.lock().unwrap();
    assert_eq!(ctxs[9].prompt, "a street");
    // The event's prompt holds for its clip and the following ones.
    assert!(ctxs[10..].iter().all(|c| c.prompt == "a 1906 racing car"));
    assert_eq!((ctxs[10].clip_index, ctxs[26].clip_index, ctxs[39].clip_index), (1, 2, 2));
}

#[test]
fn stream_title_tag_is_the_prompt_when_asked_and_none_is_set() {
    let desc = |extra: &str| {
        format!(
            "filesrc location=\"{}\" ! rawvideoparse format=rgb width=214 height=160 ! \
             taginject tags=\"title=\\\"Grand Prix 1906 at Le Mans\\\"\" ! dpirrestore name=d {extra} ! fakesink sync=false",
            raw_clip(3, 0, 214, 160).display()
        )
    };
    for (extra, prompt) in [
        ("tags-as-prompt=true", "Grand Prix 1906 at Le Mans"),
        ("", ""),
        ("tags-as-prompt=true prompt=\"a car\"", "a car"),
    ] {
        let p = launch(&desc(extra));
        let rec = use_recorder(&p);
        run_pipeline(&p).unwrap();
        let ctxs = rec.0.lock().unwrap();
        assert_eq!(ctxs.len(), 3);
        assert!(ctxs.iter().all(|c| c.prompt == prompt), "{extra}: {:?}", ctxs[0].prompt);
    }
}

// ---- the DPIR engine (tiny fixture model) -------------------------------------------------

/// DPIR engine whose cache statistics stay readable after the pipeline is gone.
struct Counting {
    engine: DpirEngine,
    stats: Arc<Mutex<ReuseStats>>,
}

impl RestoreEngine for Counting {
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        self.engine.configure(info)
    }
    fn restore(&mut self, frame: Frame, ctx: &FrameContext) -> Result<Restored, EngineError> {
        let out = self.engine.restore(frame, ctx);
        *self.stats.lock().unwrap() = self.engine.stats();
        out
    }
}

/// Install a DPIR engine built from the element's settings (edited by `tweak`), counting.
fn use_counting_dpir(p: &gst::Pipeline, tweak: fn(&mut EngineSettings)) -> Arc<Mutex<ReuseStats>> {
    let stats = Arc::new(Mutex::new(ReuseStats::default()));
    let s2 = stats.clone();
    element(p).set_engine_factory(move |settings| {
        let mut settings = settings.clone();
        tweak(&mut settings);
        Ok(Box::new(Counting { engine: DpirEngine::load(&settings)?, stats: s2.clone() }))
    });
    stats
}

fn hashes(p: &gst::Pipeline) -> Arc<Mutex<Vec<u64>>> {
    let v = Arc::new(Mutex::new(Vec::new()));
    let v2 = v.clone();
    p.by_name("o").unwrap().static_pad("sink").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        if let Some(b) = info.buffer() {
            let mut h = DefaultHasher::new();
            b.map_readable().unwrap().as_slice().hash(&mut h);
            v2.lock().unwrap().push(h.finish());
        }
        gst::PadProbeReturn::Ok
    });
    v
}

struct Run {
    clips: Vec<Clip>,
    hashes: Vec<u64>,
    stats: ReuseStats,
}

/// 4 film frames then 4 bikes frames at 128×96 (or bikes alone), through DPIR.
fn dpir_run(model: &Path, film: usize, props: &str, tweak: fn(&mut EngineSettings)) -> Run {
    let p = clip_pipeline(film, 4, 128, 96, &format!("model=\"{}\" device=cpu seed=11 {props}", model.display()));
    let stats = use_counting_dpir(&p, tweak);
    let clips = clip_messages(&p);
    let h = hashes(&p);
    let t0 = std::time::Instant::now();
    run_pipeline(&p).expect("DPIR pipeline");
    let run =
        Run { clips: clips.lock().unwrap().clone(), hashes: h.lock().unwrap().clone(), stats: *stats.lock().unwrap() };
    eprintln!(
        "[{props}] {} frames in {:.1} s, clips {:?}, stats {:?}",
        run.hashes.len(),
        t0.elapsed().as_secs_f64(),
        boundaries(&run.clips),
        run.stats
    );
    run
}

#[test]
fn dpir_encoders_run_once_per_clip_and_a_clip_re_renders_alone_identically() {
    let model = fixture_model_dir("clips-reuse", true);
    let props = "steps=2 prompt=\"an old film\"";
    let whole = dpir_run(&model, 4, props, |_| {});
    assert_eq!(boundaries(&whole.clips), vec![(0, "start"), (4, "scene-cut")]);
    assert_eq!(whole.hashes.len(), 8);
    let s = whole.stats;
    assert_eq!((s.frames, s.clips), (8, 2));
    assert_eq!((s.text_encodes, s.global_encodes, s.local_encodes), (1, 2, 8), "{s:?}");

    // The same frames without reuse: every prompt is computed for every frame.
    let fresh = dpir_run(&model, 4, props, |s| s.reuse_prompts = false);
    let s = fresh.stats;
    assert_eq!((s.text_encodes, s.global_encodes, s.local_encodes), (8, 8, 8), "{s:?}");
    // Key frames see the same prompts either way; the others see their own global prompt.
    assert_eq!(fresh.hashes[0], whole.hashes[0]);
    assert_eq!(fresh.hashes[4], whole.hashes[4]);

    // Clip 1 (bikes) alone, numbered as in the whole run: the same frames, bit for bit
    // (lq-latent=sample: its draws are per clip and position too).
    let alone = dpir_run(&model, 0, &format!("{props} first-clip-index=1"), |_| {});
    assert_eq!(boundaries(&alone.clips), vec![(0, "start")]);
    assert_eq!(alone.clips[0].index, 1);
    assert_eq!(alone.hashes, whole.hashes[4..]);
    // Numbered 0 instead, it is another rendering (another noise field).
    let renumbered = dpir_run(&model, 0, props, |_| {});
    assert_ne!(renumbered.hashes, whole.hashes[4..]);
    std::fs::remove_dir_all(&model).ok();
}

#[test]
fn dpir_warm_start_stays_inside_clips_and_clips_still_re_render_alone() {
    let model = fixture_model_dir("clips-warm", false);
    // 4 steps, strength 0.5: frames after a clip's first start at step 2.
    let base = "steps=4 noise=per-frame lq-latent=mode";
    let cold = dpir_run(&model, 4, base, |_| {});
    let warm = dpir_run(&model, 4, &format!("{base} warm-start=0.5"), |_| {});
    assert_eq!(boundaries(&warm.clips), vec![(0, "start"), (4, "scene-cut")]);
    assert_eq!(warm.stats.warm_starts, 6, "every frame but the two clips' first");
    // A clip's first frame starts from noise: identical to the cold run. The others differ.
    for i in 0..8 {
        if i == 0 || i == 4 {
            assert_eq!(warm.hashes[i], cold.hashes[i], "frame {i}");
        } else {
            assert_ne!(warm.hashes[i], cold.hashes[i], "frame {i}");
        }
    }
    // Per-frame noise and warm start are keyed by clip and position: clip 1 re-renders alone.
    let alone = dpir_run(&model, 0, &format!("{base} warm-start=0.5 first-clip-index=1"), |_| {});
    assert_eq!(alone.hashes, warm.hashes[4..]);
    let alone_cold = dpir_run(&model, 0, &format!("{base} first-clip-index=1"), |_| {});
    assert_eq!(alone_cold.hashes, cold.hashes[4..]);
    std::fs::remove_dir_all(&model).ok();
}
