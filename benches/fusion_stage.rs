//! Per-pixel cost of dpir-nano's fusion stage (`weights/dpir-nano/fusion`, the shipped weights) on
//! a film-sized frame (the 1906 film at scale=2: 428×320, one tile) and a 3840×2560 frame (tiled),
//! side by side in one run: the stage should cost about the same per pixel at both sizes.
//! Run: `cargo bench --no-default-features --bench fusion_stage` (quiet machine; it prints the load).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gstdpir::model::fusion::{Fusion, FusionConfig};

fn main() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/dpir-nano/fusion");
    let cfg: FusionConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    // SAFETY: the weights file is not modified while the bench runs.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)? };
    let fusion = Fusion::new(&cfg, vb).context("loading the fusion stage")?;
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average before: {}", load().trim());
    let mut per_px = Vec::new();
    for (w, h, reps) in [(428usize, 320usize, 20usize), (3840, 2560, 3)] {
        let lq = Tensor::rand(0f32, 1f32, (1, 3, h, w), &Device::Cpu)?;
        let restored = Tensor::rand(0f32, 1f32, (1, 3, h, w), &Device::Cpu)?;
        fusion.forward(&lq, &restored)?; // warm-up
        let mut times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                fusion.forward(&lq, &restored).map(|_| t.elapsed().as_secs_f64())
            })
            .collect::<candle_core::Result<_>>()?;
        times.sort_by(f64::total_cmp);
        let s = times[reps / 2];
        per_px.push(s * 1e6 / (w * h) as f64);
        println!("{w}x{h}: median {s:.3} s of {reps}, {:.3} us per pixel", per_px.last().unwrap());
    }
    println!("3840x2560 / film per pixel: {:.2}x", per_px[1] / per_px[0]);
    println!("load average after: {}", load().trim());
    Ok(())
}
