//! Frames/s of the DPIR engine on a real clip, without GStreamer: the frames come as raw RGBx
//! (4 bytes a pixel, no row padding) in one file, so that the model-only GPU build (no GStreamer
//! on the GPU machine) can restore the 1906 film. `tests/gpu/run.sh` drives it; the frames are
//! made beforehand with GStreamer by `tests/gpu/prepare.sh`:
//! `filesrc ! decodebin ! videoconvert ! video/x-raw,format=RGBx ! filesink`.
//!
//! Environment: `DPIR_RAW` the .rgbx file (required), `DPIR_RAW_SIZE` `WxH` of its frames
//! (required), `DPIR_BENCH_FRAMES` how many frames (default: all), `DPIR_BENCH_MODEL` a model
//! directory (default: the embedded dpir-nano), `DPIR_BENCH_DEVICE` (default `auto`),
//! `DPIR_BENCH_PRECISION` (default `f32`), `DPIR_BENCH_SCALE` (default 2), `DPIR_BENCH_STEPS`
//! (default: the element's default), `DPIR_OUT` a folder to write the last restored frame into
//! (PPM). Clips are cut as the element cuts them (`ClipTracker`), one engine, prompts reused per
//! clip. The last line, `RESULT impl=film ...`, is what run.sh reads.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gstdpir::clip::{ClipTracker, ClipTrackerSettings};
use gstdpir::engine::dpir::DpirEngine;
use gstdpir::engine::{EngineSettings, Frame, FrameContext, Pixels, RestoreEngine, StreamInfo};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<()> {
    let raw = std::env::var_os("DPIR_RAW").context("DPIR_RAW: the .rgbx frames file")?;
    let size = std::env::var("DPIR_RAW_SIZE").context("DPIR_RAW_SIZE: WxH of the frames")?;
    let (w, h): (usize, usize) =
        size.split_once('x').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))).context("DPIR_RAW_SIZE")?;
    let bytes = std::fs::read(&raw).with_context(|| format!("reading {}", raw.to_string_lossy()))?;
    let frame_bytes = w * h * 4;
    if bytes.len() < frame_bytes {
        bail!("{} holds no whole {w}x{h} RGBx frame", raw.to_string_lossy());
    }
    let n = env_or("DPIR_BENCH_FRAMES", bytes.len() / frame_bytes).min(bytes.len() / frame_bytes);
    let video: Vec<Frame> = bytes
        .chunks_exact(frame_bytes)
        .take(n)
        .map(|f| Frame {
            width: w,
            height: h,
            pixels: Pixels::Rgb8(f.chunks_exact(4).flat_map(|p| p[..3].to_vec()).collect()),
        })
        .collect();

    let defaults = EngineSettings::default();
    let settings = EngineSettings {
        model: std::env::var_os("DPIR_BENCH_MODEL").map(Into::into),
        device: env_or("DPIR_BENCH_DEVICE", defaults.device),
        precision: env_or("DPIR_BENCH_PRECISION", defaults.precision),
        steps: env_or("DPIR_BENCH_STEPS", defaults.steps),
        ..defaults
    };
    let scale: usize = env_or("DPIR_BENCH_SCALE", 2);
    let info = StreamInfo { in_width: w, in_height: h, scale, fps: None, depth: 8 };
    let t_load = Instant::now();
    let mut engine = DpirEngine::load(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    engine.configure(&info).map_err(|e| anyhow::anyhow!("{e}"))?;
    let load = t_load.elapsed();

    let mut tracker = ClipTracker::new(ClipTrackerSettings::default());
    let prompt = settings.prompt.clone();
    let mut ctx_of = |i: usize, img: &Frame| {
        let p = tracker.observe(img, &prompt);
        FrameContext {
            index: i as u64,
            clip_index: p.clip_index,
            position: p.position,
            new_clip: p.reason,
            prompt: p.prompt,
            cancel: Default::default(),
        }
    };
    println!(
        "film: {} frames {w}x{h} ×{scale} → {}x{}, {}, loaded in {:.1} s",
        video.len(),
        w * scale,
        h * scale,
        engine.describe(),
        load.as_secs_f64()
    );
    println!("PEAKMEM RESET"); // tests/gpu/peakmem.py: the measured phase starts after loading
    // The first frame pays one-time costs (kernel loading, allocator growth): timed apart.
    let t0 = Instant::now();
    let ctx = ctx_of(0, &video[0]);
    let mut last = engine.restore(video[0].clone(), &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = t0.elapsed();
    let mut wall = Duration::ZERO;
    let mut clips = 1;
    for (i, img) in video.iter().enumerate().skip(1) {
        let ctx = ctx_of(i, img);
        clips += ctx.new_clip.is_some() as usize;
        let t = Instant::now();
        last = engine.restore(img.clone(), &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
        wall += t.elapsed();
    }
    let timed = video.len() - 1;
    let fps = if timed > 0 { timed as f64 / wall.as_secs_f64() } else { 1.0 / first.as_secs_f64() };
    let bad = last.image.planes.iter().filter(|v| !v.is_finite()).count();
    println!("  first frame: {:.1} ms (one-time costs included)", first.as_secs_f64() * 1e3);
    println!(
        "  {timed} frames after it: {:.1} ms/frame, {fps:.2} frames/s, {clips} clip(s); last frame: {}",
        if timed > 0 { wall.as_secs_f64() * 1e3 / timed as f64 } else { f64::NAN },
        last.timings
    );
    if let Some(dir) = std::env::var_os("DPIR_OUT") {
        let p = std::path::Path::new(&dir).join("film-last-restored.ppm");
        let mut f = std::fs::File::create(&p)?;
        let img = &last.image;
        write!(f, "P6\n{} {}\n255\n", img.width, img.height)?;
        let px = (0..img.width * img.height).flat_map(|i| img.pixel(i % img.width, i / img.width));
        f.write_all(&px.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect::<Vec<_>>())?;
        println!("  wrote {}", p.display());
    }
    println!(
        "RESULT impl=film frames={} fps={fps:.3} ms_per_frame={:.3} first_ms={:.1} nonfinite={bad}",
        video.len(),
        1e3 / fps,
        first.as_secs_f64() * 1e3
    );
    Ok(())
}
