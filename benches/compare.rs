//! Rust side of `benches/compare_pytorch.sh`: times one DPIR transformer forward, one VAE decode
//! and encode, and one whole dpir-nano frame through the engine the element uses, for the cases
//! listed in a spec file written by `benches/compare_pytorch.py prepare`, plus this machine's f32
//! GEMM rate; writes the outputs so the script can check both sides computed the same thing.
//!
//! `cargo bench --no-default-features --bench compare -- <spec.json>`
//!
//! Spec (JSON): `{"out_dir": DIR, "cases": [{"name", "iters",
//!   "transformer": {"weights", "config", "inputs"},   // diffusers config dict, inputs file
//!   "vae": {"weights", "config", "inputs"}}]}`         // either part may be absent
//! Transformer inputs: `hidden_states`, `controlnet_cond`, `encoder_hidden_states`,
//! `pooled_projections`, `timestep`; VAE inputs: `latent` (raw, unscaled), `image` ([-1, 1]);
//! frame (`"frame": {"model", "inputs"}`): `up_u8` (the frame at the output size, HWC) and `noise`.
//! Prints one `RESULT {json}` line per timing (median ms over `iters` after one warm-up) and
//! writes `<out_dir>/<case>.rust.safetensors`. CPU, f32; threads from `RAYON_NUM_THREADS`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gstdpir::engine::dpir::DpirEngine;
use gstdpir::engine::{
    ClipReason, DeviceSpec, EngineSettings, Frame, FrameContext, LqLatent, Pixels, RestoreEngine, StreamInfo,
};
use gstdpir::model::preprocess::RgbImage;
use gstdpir::model::transformer::{DpirTransformer, DpirTransformerConfig};
use gstdpir::model::vae::{AutoencoderKl, AutoencoderKlConfig};
use serde_json::{Value, json};

fn median_ms(iters: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, Tensor)> {
    let out = f()?; // warm-up (allocator, caches)
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let _ = f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok((v[v.len() / 2], out))
}

fn report(case: &str, component: &str, shape: String, ms: f64, iters: usize) {
    let r = json!({"case": case, "component": component, "shape": shape, "ms": ms, "iters": iters});
    println!("RESULT {r}");
}

/// The machine's f32 matrix-product rate through candle (its `gemm` kernels): `n³` GEMM.
fn gemm_peak(n: usize, dev: &Device) -> Result<()> {
    let a = Tensor::randn(0f32, 1., (n, n), dev)?;
    let b = Tensor::randn(0f32, 1., (n, n), dev)?;
    let (ms, _) = median_ms(5, || Ok(a.matmul(&b)?))?;
    let r = json!({"case": "machine", "component": "f32 GEMM 2048^3", "shape": format!("{n}^3"), "ms": ms,
                   "iters": 5, "gflop": 2.0 * (n as f64).powi(3) / 1e9});
    println!("RESULT {r}");
    Ok(())
}

/// f32 weights through the model loader's own path (each tensor read once, converted from the
/// file's dtype).
fn var_builder(path: &str, dev: &Device) -> Result<VarBuilder<'static>> {
    Ok(gstdpir::model::loader::var_builder_from_files(&[PathBuf::from(path)], DType::F32, dev)?)
}

fn main() -> Result<()> {
    // `cargo bench` appends `--bench`; the spec is the first argument that is not a flag.
    let spec_path = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .context("usage: compare <spec.json> (see benches/compare_pytorch.sh)")?;
    let spec: Value = serde_json::from_slice(&std::fs::read(&spec_path).with_context(|| spec_path.clone())?)?;
    let out_dir = PathBuf::from(spec["out_dir"].as_str().context("spec.out_dir")?);
    let dev = Device::Cpu;
    eprintln!("rust: candle CPU f32, {} threads", candle_core::utils::get_num_threads());
    gemm_peak(spec["gemm_n"].as_u64().unwrap_or(2048) as usize, &dev)?;

    for case in spec["cases"].as_array().context("spec.cases")? {
        let name = case["name"].as_str().context("case.name")?;
        let iters = case["iters"].as_u64().unwrap_or(5) as usize;
        let mut outputs: HashMap<String, Tensor> = HashMap::new();

        if let Some(t) = case.get("transformer").filter(|t| !t.is_null()) {
            let cfg: DpirTransformerConfig = serde_json::from_value(t["config"].clone())?;
            let model = DpirTransformer::new(&cfg, var_builder(t["weights"].as_str().context("weights")?, &dev)?)?;
            let io = candle_core::safetensors::load(t["inputs"].as_str().context("inputs")?, &dev)?;
            let get = |k: &str| io.get(k).with_context(|| format!("{name}: input {k}"));
            let (x, cond, ctx, pooled, ts) = (
                get("hidden_states")?,
                get("controlnet_cond")?,
                get("encoder_hidden_states")?,
                get("pooled_projections")?,
                get("timestep")?,
            );
            let (b, _, h, w) = x.dims4()?;
            let shape = format!("b{b} {h}x{w} lat, {}L x {}, ctx {}", cfg.num_layers, cfg.inner_dim(), ctx.dim(1)?);
            let (ms, y) = median_ms(iters, || Ok(model.forward(x, cond, ctx, pooled, ts)?))?;
            report(name, "transformer forward (incl. control)", shape.clone(), ms, iters);
            outputs.insert("transformer_sample".into(), y);
            if case["rows"].as_str() != Some("forward") {
                let (ms, c) = median_ms(iters, || Ok(model.control_features(cond)?))?;
                report(name, "control_conv alone", shape.clone(), ms, iters);
                let (ms, _) = median_ms(iters, || Ok(model.forward_with_control(x, &c, ctx, pooled, ts)?))?;
                report(name, "step, control precomputed", shape, ms, iters);
            }
        }

        if let Some(v) = case.get("vae").filter(|v| !v.is_null()) {
            let cfg: AutoencoderKlConfig = serde_json::from_value(v["config"].clone())?;
            // Untiled, as diffusers' `AutoencoderKL.decode` without `enable_tiling()`.
            let vae = AutoencoderKl::new(&cfg, var_builder(v["weights"].as_str().context("weights")?, &dev)?)?;
            let io = candle_core::safetensors::load(v["inputs"].as_str().context("inputs")?, &dev)?;
            let z = io.get("latent").with_context(|| format!("{name}: input latent"))?;
            let (b, c, h, w) = z.dims4()?;
            let ds = cfg.downscale();
            let shape = format!("b{b} {c}x{h}x{w} -> {}x{}, ch {:?}", h * ds, w * ds, cfg.block_out_channels);
            let (ms, y) = median_ms(iters, || Ok(vae.decode(z)?))?;
            report(name, "VAE decode", shape, ms, iters);
            outputs.insert("vae_decoded".into(), y);
            let img = io.get("image").with_context(|| format!("{name}: input image"))?;
            let (_, _, ih, iw) = img.dims4()?;
            let shape = format!("b{b} 3x{ih}x{iw} -> {}x{}, ch {:?}", ih / ds, iw / ds, cfg.block_out_channels);
            let (ms, y) = median_ms(iters, || Ok(vae.encode_moments(img)?))?;
            report(name, "VAE encode", shape, ms, iters);
            outputs.insert("vae_moments".into(), y);
        }

        if let Some(f) = case.get("frame").filter(|f| !f.is_null()) {
            let settings = EngineSettings {
                model: Some(PathBuf::from(f["model"].as_str().context("frame.model")?)),
                device: DeviceSpec::Cpu,
                lq_latent: LqLatent::Mode,
                ..Default::default()
            };
            let mut engine = DpirEngine::load(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
            let io = candle_core::safetensors::load(f["inputs"].as_str().context("frame.inputs")?, &dev)?;
            let up = RgbImage::from_hwc_tensor(io.get("up_u8").context("up_u8")?)?;
            let noise = io.get("noise").context("noise")?;
            let (w, h) = (up.width, up.height);
            engine
                .configure(&StreamInfo { in_width: w, in_height: h, scale: 1, fps: None, depth: 8 })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let frame = Frame { width: w, height: h, pixels: Pixels::Rgb8(up.data.clone()) };
            let mut clip = 0;
            // Every call a new clip, so the global prompt is computed each time (as PyTorch does).
            let (ms, y) = median_ms(iters, || {
                clip += 1;
                let ctx = FrameContext {
                    index: 0,
                    clip_index: clip,
                    position: 0,
                    new_clip: Some(ClipReason::Start),
                    prompt: String::new(),
                    cancel: Default::default(),
                };
                let (image, _) =
                    engine.restore_traced(frame.clone(), &ctx, Some(noise)).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(Tensor::from_vec(image.planes, (1, 3, h, w), &dev)?)
            })?;
            report(name, "whole dpir-nano frame x2", format!("{w}x{h} out, {}", engine.describe()), ms, iters);
            outputs.insert("frame_output".into(), y);
        }

        let path = out_dir.join(format!("{name}.rust.safetensors"));
        candle_core::safetensors::save(&outputs, &path)?;
    }
    Ok(())
}
