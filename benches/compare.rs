//! Rust side of `benches/compare_pytorch.sh`: times one DPIR transformer forward and one VAE
//! decode for the cases listed in a spec file written by `benches/compare_pytorch.py prepare`,
//! and writes the outputs so the script can check both sides computed the same thing.
//!
//! `cargo bench --no-default-features --bench compare -- <spec.json>`
//!
//! Spec (JSON): `{"out_dir": DIR, "cases": [{"name", "iters",
//!   "transformer": {"weights", "config", "inputs"},   // diffusers config dict, inputs file
//!   "vae": {"weights", "config", "inputs"}}]}`         // either part may be absent
//! Transformer inputs: `hidden_states`, `controlnet_cond`, `encoder_hidden_states`,
//! `pooled_projections`, `timestep`; VAE inputs: `latent` (raw, unscaled).
//! Prints one `RESULT {json}` line per timing (median ms over `iters` after one warm-up) and
//! writes `<out_dir>/<case>.rust.safetensors`. CPU, f32; threads from `RAYON_NUM_THREADS`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
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

fn var_builder(path: &str, dev: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the weight files are not modified while the bench runs.
    Ok(unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, dev)? })
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
            let (ms, c) = median_ms(iters, || Ok(model.control_features(cond)?))?;
            report(name, "control_conv alone", shape.clone(), ms, iters);
            let (ms, _) = median_ms(iters, || Ok(model.forward_with_control(x, &c, ctx, pooled, ts)?))?;
            report(name, "step, control precomputed", shape, ms, iters);
        }

        if let Some(v) = case.get("vae").filter(|v| !v.is_null()) {
            let cfg: AutoencoderKlConfig = serde_json::from_value(v["config"].clone())?;
            // Untiled, as diffusers' `AutoencoderKL.decode` without `enable_tiling()`.
            let vae = AutoencoderKl::new(&cfg, var_builder(v["weights"].as_str().context("weights")?, &dev)?)?
                .with_tiling(None);
            let io = candle_core::safetensors::load(v["inputs"].as_str().context("inputs")?, &dev)?;
            let z = io.get("latent").with_context(|| format!("{name}: input latent"))?;
            let (b, c, h, w) = z.dims4()?;
            let ds = cfg.downscale();
            let shape = format!("b{b} {c}x{h}x{w} -> {}x{}, ch {:?}", h * ds, w * ds, cfg.block_out_channels);
            let (ms, y) = median_ms(iters, || Ok(vae.decode(z)?))?;
            report(name, "VAE decode", shape, ms, iters);
            outputs.insert("vae_decoded".into(), y);
        }

        let path = out_dir.join(format!("{name}.rust.safetensors"));
        candle_core::safetensors::save(&outputs, &path)?;
    }
    Ok(())
}
