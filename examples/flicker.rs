//! Temporal flicker of `dpirrestore` on a static-camera real clip: the mean absolute
//! frame-to-frame difference of the output divided by that of the input (1: as steady as the
//! input; below 1: steadier), for `noise=per-clip` vs `noise=per-frame` (and, with `warm=S`,
//! per-clip noise plus `warm-start=S`).
//!
//! Driven by `pipelines/flicker.sh`; arguments are `key=value`:
//! - `model=DIR` a model directory; `model=fixture` the tiny fixture model assembled from
//!   `$DPIR_FIXTURES` (for a quick check of the machinery); default: the embedded dpir-nano.
//! - `media=FILE` (default: the 1906 film, whose first shot, frames 0–80, is a static camera),
//!   `skip=N` frames skipped first (default 4), `frames=N` frames measured (default 24).
//! - `steps=N` (default 4), `scale=N` (default 1), `device=D` (default auto), `seed=N` (default 0),
//!   `warm=S` adds a row with `warm-start=S`, `props="..."` extra element properties.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use gst::prelude::*;

/// Mean absolute difference of consecutive frames (8-bit values, colour channels), averaged.
fn mean_abs_diff(frames: &[(gst::Buffer, gst::Caps)]) -> f64 {
    let mut total = 0.0;
    let mut pairs = 0;
    for pair in frames.windows(2) {
        let info = gst_video::VideoInfo::from_caps(&pair[0].1).unwrap();
        let (w, h, stride) = (info.width() as usize, info.height() as usize, info.stride()[0] as usize);
        let bpp = info.format_info().pixel_stride()[0] as usize;
        let channels = 3.min(bpp);
        let (a, b) = (pair[0].0.map_readable().unwrap(), pair[1].0.map_readable().unwrap());
        let mut sum = 0u64;
        for y in 0..h {
            for x in 0..w {
                for c in 0..channels {
                    let i = y * stride + x * bpp + c;
                    sum += (a[i] as i32 - b[i] as i32).unsigned_abs() as u64;
                }
            }
        }
        total += sum as f64 / (w * h * channels) as f64;
        pairs += 1;
    }
    total / pairs.max(1) as f64
}

fn main() {
    let args: HashMap<String, String> = std::env::args()
        .skip(1)
        .filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let get = |k: &str, d: &str| args.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num =
        |k: &str, d: u64| get(k, &d.to_string()).parse::<u64>().unwrap_or_else(|_| panic!("{k}= must be a number"));
    let (skip, frames, steps, scale, seed) =
        (num("skip", 4), num("frames", 24), num("steps", 4), num("scale", 1), num("seed", 0));
    let device = get("device", "auto");
    let media_file =
        args.get("media").map(std::path::PathBuf::from).unwrap_or_else(|| media("Shepard_Calais_1906_FrenchGP.ogv"));
    let (model_prop, model_desc, temp) = match args.get("model").map(String::as_str) {
        None | Some("") => (String::new(), "embedded dpir-nano".to_string(), None),
        Some("fixture") => {
            let d = fixture_model_dir("flicker", false);
            (format!("model=\"{}\"", d.display()), "tiny fixture model".to_string(), Some(d))
        }
        Some(dir) => (format!("model=\"{dir}\""), dir.to_string(), None),
    };
    let extra = get("props", "");

    let mut modes = vec![("per-clip", "noise=per-clip".to_string()), ("per-frame", "noise=per-frame".to_string())];
    if let Some(w) = args.get("warm") {
        modes.push(("per-clip + warm-start", format!("noise=per-clip warm-start={w}")));
    }
    println!(
        "flicker: frames {}..{} of {}, model {model_desc}, {steps} steps, scale {scale}, device {device}",
        skip,
        skip + frames,
        media_file.display()
    );
    println!("{:<24} {:>10} {:>11} {:>7} {:>8}", "noise", "input MAD", "output MAD", "ratio", "s/frame");
    for (name, props) in modes {
        let p = launch(&format!(
            "filesrc location=\"{}\" ! decodebin ! videoconvert ! video/x-raw,format=RGB ! \
             identity name=cut eos-after={} ! dpirrestore name=d {model_prop} device={device} steps={steps} \
             scale={scale} seed={seed} {props} {extra} ! fakesink name=out sync=false",
            media_file.display(),
            // `identity eos-after=N` passes N − 1 frames exactly (then maybe stray later ones, not
            // captured below). The sink does not sync: QoS would make upstream drop frames.
            skip + frames + 1
        ));
        // Drop the first `skip` frames before the element.
        let seen = Arc::new(AtomicU64::new(0));
        p.by_name("cut").unwrap().static_pad("src").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            if seen.fetch_add(1, Ordering::SeqCst) < skip { gst::PadProbeReturn::Drop } else { gst::PadProbeReturn::Ok }
        });
        let ins = capture(&p, "d", frames as usize);
        let outs = capture(&p, "out", frames as usize);
        let t0 = std::time::Instant::now();
        if let Err(e) = run_pipeline(&p) {
            eprintln!("{name}: pipeline failed: {e}");
            std::process::exit(1);
        }
        let secs = t0.elapsed().as_secs_f64();
        let (ins, outs) = (ins.lock().unwrap(), outs.lock().unwrap());
        let (mi, mo) = (mean_abs_diff(&ins), mean_abs_diff(&outs));
        println!("{:<24} {:>10.3} {:>11.3} {:>7.3} {:>8.2}", name, mi, mo, mo / mi, secs / outs.len().max(1) as f64);
    }
    if let Some(d) = temp {
        std::fs::remove_dir_all(d).ok();
    }
}
