//! What per-clip reuse saves, on real footage: the 1906 film then bikes.mp4 (a hard cut between
//! them, segmented by the element's `ClipTracker`), restored by the DPIR engine twice in one
//! run — prompts reused per clip (the default) and every prompt recomputed for every frame
//! (`EngineSettings::reuse_prompts = false`) — with frames/s and the encoders' share of the
//! frame time in each.
//!
//! Run: `cargo bench --bench clip_reuse`. Environment (all optional): `DPIR_BENCH_MODEL` a model
//! directory (default: the tiny fixture model assembled from `$DPIR_FIXTURES`), `DPIR_BENCH_FRAMES`
//! frames per video (default 12), `DPIR_BENCH_STEPS` (default 2), `DPIR_BENCH_SIZE` `WxH` of the
//! frames (default 214x160, the film's own size), `DPIR_BENCH_SCALE` (default 1), `DPIR_BENCH_DEVICE`
//! (default cpu).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use gstdpir::clip::{ClipTracker, ClipTrackerSettings};
use gstdpir::engine::clip_state::ReuseStats;
use gstdpir::engine::dpir::DpirEngine;
use gstdpir::engine::{DeviceSpec, EngineSettings, Frame, FrameContext, LqLatent, Pixels, RestoreEngine, StreamInfo};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Decode the first `n` frames of `file`, scaled to `w × h` RGB.
fn frames(file: &str, n: u64, w: usize, h: usize) -> Vec<Frame> {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! videoscale ! \
         video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! identity eos-after={} ! \
         fakesink name=s sync=false",
        media(file).display(),
        n + 1 // `identity eos-after=N` passes N − 1 frames exactly (then maybe stray ones)
    ));
    let store = capture(&p, "s", n as usize);
    run_pipeline(&p).expect("decode");
    let bufs = store.lock().unwrap();
    bufs.iter()
        .map(|(b, caps)| {
            let info = gst_video::VideoInfo::from_caps(caps).unwrap();
            let stride = info.stride()[0] as usize;
            let map = b.map_readable().unwrap();
            let mut rgb = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                rgb.extend_from_slice(&map[y * stride..y * stride + w * 3]);
            }
            Frame { width: w, height: h, pixels: Pixels::Rgb8(rgb) }
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: u64 = env_or("DPIR_BENCH_FRAMES", 12);
    let steps: u32 = env_or("DPIR_BENCH_STEPS", 2);
    let scale: usize = env_or("DPIR_BENCH_SCALE", 1);
    let device: DeviceSpec = env_or("DPIR_BENCH_DEVICE", DeviceSpec::Cpu);
    let size: String = env_or("DPIR_BENCH_SIZE", "214x160".to_string());
    let (w, h) = size.split_once('x').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))).expect("WxH");
    let (model, temp) = match std::env::var_os("DPIR_BENCH_MODEL") {
        Some(m) => (std::path::PathBuf::from(m), false),
        None => (fixture_model_dir("bench-clip-reuse", true), true),
    };

    let mut video = frames("Shepard_Calais_1906_FrenchGP.ogv", n, w, h);
    video.extend(frames("bikes.mp4", n, w, h));
    let mut tracker = ClipTracker::new(ClipTrackerSettings::default());
    let prompt = "an old film of a motor race";
    let ctxs: Vec<FrameContext> = video
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let p = tracker.observe(img, prompt);
            FrameContext {
                index: i as u64,
                clip_index: p.clip_index,
                position: p.position,
                new_clip: p.reason,
                prompt: p.prompt,
                cancel: Default::default(),
            }
        })
        .collect();
    let clips = ctxs.iter().filter(|c| c.new_clip.is_some()).count();

    let info = StreamInfo { in_width: w, in_height: h, scale, fps: None, depth: 8 };
    let settings = |reuse| EngineSettings {
        model: Some(model.clone()),
        device,
        steps,
        seed: 3,
        lq_latent: LqLatent::Mode,
        reuse_prompts: reuse,
        ..Default::default()
    };
    // One engine per mode (the model itself is loaded once and shared).
    let mut engines: Vec<(bool, DpirEngine)> = [true, false]
        .into_iter()
        .map(|reuse| {
            let mut e = DpirEngine::load(&settings(reuse)).expect("load model");
            e.configure(&info).unwrap();
            (reuse, e)
        })
        .collect();
    println!(
        "clip reuse: {} ({}), {} frames of real footage at {w}x{h} ×{scale} ({n} of the 1906 film, {n} of bikes.mp4), \
         {clips} clips, {steps} steps, device {device}",
        model.display(),
        engines[0].1.describe(),
        video.len(),
    );
    // Warm-up (allocations, first-call costs) on another clip and prompt: the measured run
    // starts with empty caches; statistics are differences.
    for (_, e) in engines.iter_mut() {
        let mut c = ctxs[0].clone();
        c.clip_index = u64::MAX;
        c.prompt = "warm-up".into();
        e.restore(video[0].clone(), &c).unwrap();
    }
    // Frame by frame, both modes in alternating order: background load drifts alike for both.
    let before: Vec<ReuseStats> = engines.iter().map(|(_, e)| e.stats()).collect();
    let mut walls = [Duration::ZERO; 2];
    let mut last = [None, None];
    for (i, (img, ctx)) in video.iter().zip(&ctxs).enumerate() {
        for j in [i % 2, 1 - i % 2] {
            let t0 = Instant::now();
            last[j] = Some(engines[j].1.restore(img.clone(), ctx).unwrap().timings);
            walls[j] += t0.elapsed();
        }
    }
    let results: Vec<(bool, Duration, ReuseStats, ReuseStats)> =
        (0..2).map(|j| (engines[j].0, walls[j], before[j], engines[j].1.stats())).collect();
    println!(
        "{:<28} {:>8} {:>9} {:>7} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "mode",
        "frames/s",
        "ms/frame",
        "T5 runs",
        "global",
        "local",
        "T5 ms/f",
        "global ms/f",
        "local ms/f",
        "enc. ms/f",
        "enc. share"
    );
    for (reuse, wall, a, b) in &results {
        let frames = (b.frames - a.frames) as f64;
        let per = |d: Duration| d.as_secs_f64() * 1e3 / frames;
        let enc = (b.text_time - a.text_time) + (b.global_time - a.global_time) + (b.local_time - a.local_time);
        let share = enc.as_secs_f64() / (b.frame_time - a.frame_time).as_secs_f64();
        println!(
            "{:<28} {:>8.2} {:>9.1} {:>7} {:>7} {:>7} {:>10.2} {:>11.2} {:>10.2} {:>10.2} {:>9.1}%",
            if *reuse { "reuse per clip (default)" } else { "recompute every frame" },
            frames / wall.as_secs_f64(),
            wall.as_secs_f64() * 1e3 / frames,
            b.text_encodes - a.text_encodes,
            b.global_encodes - a.global_encodes,
            b.local_encodes - a.local_encodes,
            per(b.text_time - a.text_time),
            per(b.global_time - a.global_time),
            per(b.local_time - a.local_time),
            per(enc),
            100.0 * share,
        );
    }
    let fps = |i: usize| (results[i].3.frames - results[i].2.frames) as f64 / results[i].1.as_secs_f64();
    println!("speed-up from reuse: ×{:.2}", fps(0) / fps(1));
    for ((reuse, _), t) in engines.iter().zip(&last) {
        println!("last frame, {}: {}", if *reuse { "reuse" } else { "recompute" }, t.unwrap_or_default());
    }
    if temp {
        std::fs::remove_dir_all(&model).ok();
    }
}
