//! `pipeline_e2e`: the official one-image pipeline (dual prompt, VAE encode with the posterior
//! mode, 4 Euler steps, decode, postprocess, wavelet colour fix), run **through the engine the
//! element uses** (`DpirEngine`, from a model directory holding the case's components) with the
//! fixture's initial noise passed in. Per-step debug tensors are compared with
//! DPIR_PARITY_VERBOSE (not enforced).
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};
use gstdpir::engine::dpir::DpirEngine;
use gstdpir::engine::{
    ClipReason, ColorFix, DeviceSpec, EngineSettings, Frame, FrameContext, LqLatent, Pixels, Precision, RestoreEngine,
    StreamInfo, TilingMode,
};
use gstdpir::model::color_fix::color_fix_uint8;
use gstdpir::model::pipeline::{DpirPipeline, SamplerOptions, postprocess_uint8};
use gstdpir::model::tiling::LatentTiling;
use serde_json::{Value, json};

use crate::common::{Case, E2E_FLOAT, FLOAT, Produced, T5_FLOAT, Tol, UINT8, diff_stats, produced};

/// A model directory (as a user lays out real checkpoints) holding the case's components.
fn model_dir(case: &Case, t5_len: usize, steps: usize) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("dpir-parity-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let put = |src: &Path, dst: &str| -> Result<()> {
        let d = dir.join(dst);
        std::fs::create_dir_all(d.parent().unwrap())?;
        std::fs::copy(src, &d).with_context(|| format!("copying {}", src.display()))?;
        Ok(())
    };
    let json = |v: &Value, dst: &str| -> Result<()> {
        let d = dir.join(dst);
        std::fs::create_dir_all(d.parent().unwrap())?;
        Ok(std::fs::write(d, serde_json::to_vec_pretty(v)?)?)
    };
    for (component, folder, file) in [
        ("transformer", "transformer", "diffusion_pytorch_model.safetensors"),
        ("vae", "vae", "diffusion_pytorch_model.safetensors"),
        ("image_encoder_one", "image_encoder_one", "model.safetensors"),
        ("image_encoder_two", "image_encoder_two", "model.safetensors"),
        ("text_encoder_three", "text_encoder_3", "model.safetensors"),
    ] {
        put(&case.weight_path(component), &format!("{folder}/{file}"))?;
        json(case.library_config(component)?, &format!("{folder}/config.json"))?;
    }
    let tok = case.cfg("/tokenizer_files/tokenizer_json")?.as_str().context("tokenizer_json")?;
    put(&case.dir.join(tok), "tokenizer_3/tokenizer.json")?;
    let sched = case.library_config("scheduler")?;
    json(
        &json!({
            "format": "gst-dpir/1",
            "name": "pipeline_e2e",
            "transformer": {"config": "transformer/config.json", "weights": ["transformer/diffusion_pytorch_model.safetensors"]},
            "vae": {"kind": "autoencoder_kl", "config": "vae/config.json", "weights": ["vae/diffusion_pytorch_model.safetensors"]},
            "image_encoder_one": {"config": "image_encoder_one/config.json", "weights": ["image_encoder_one/model.safetensors"]},
            "image_encoder_two": {"config": "image_encoder_two/config.json", "weights": ["image_encoder_two/model.safetensors"]},
            "text_encoder": {"config": "text_encoder_3/config.json", "weights": ["text_encoder_3/model.safetensors"],
                             "tokenizer": "tokenizer_3/tokenizer.json", "max_length": t5_len},
            "sampler": {"shift": sched["shift"], "num_train_timesteps": sched["num_train_timesteps"], "default_steps": steps}
        }),
        "model.json",
    )?;
    Ok(dir)
}

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let verbose = std::env::var_os("DPIR_PARITY_VERBOSE").is_some();
    let prompt = case.cfg("/prompt")?.as_str().unwrap_or_default().to_string();
    crate::t5::check_tokenizer(case, std::slice::from_ref(&prompt), "t5_input_ids")?;
    let t5_len = case.io("t5_input_ids")?.dim(1)?;
    let steps = case.cfg("/call/pipeline/num_inference_steps")?.as_u64().context("steps")? as usize;
    let guidance_scale = case.cfg("/call/pipeline/guidance_scale")?.as_f64().unwrap_or(1.0);
    ensure!(guidance_scale <= 1.0, "the case uses CFG; the element runs without it");
    ensure!(
        case.cfg("/call/pipeline/denoise_vae_use_mode")?.as_bool() == Some(true),
        "the case draws a posterior sample: no engine setting reproduces its draw"
    );
    let dir = model_dir(case, t5_len, steps)?;

    // The element's engine with the settings that match the case: official tiling (quirk and
    // all), posterior mode, wavelet colour fix, the model's default steps (the case's).
    let settings = EngineSettings {
        model: Some(dir.clone()),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        lq_latent: LqLatent::Mode,
        color_fix: ColorFix::Wavelet,
        tiling: TilingMode::Reference,
        prompt: prompt.clone(),
        ..Default::default()
    };
    let mut engine = DpirEngine::load(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    let lq_u8 = case.io("lq_image_uint8")?;
    let (h, w, _) = lq_u8.dims3()?;
    engine
        .configure(&StreamInfo { in_width: w, in_height: h, scale: 1, fps: None, depth: 8 })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(engine.sampler().steps == steps, "the engine runs {} steps, the case {steps}", engine.sampler().steps);
    // The frame as the element hands it over: 8-bit values / 255.
    let frame = Frame { width: w, height: h, pixels: Pixels::Rgb8(lq_u8.flatten_all()?.to_vec1::<u8>()?) };
    let ctx = FrameContext {
        index: 0,
        clip_index: 0,
        position: 0,
        new_clip: Some(ClipReason::Start),
        prompt,
        cancel: Default::default(),
    };
    let init = case.io_f32("initial_latents")?;
    let (image, trace) = engine.restore_traced(frame, &ctx, Some(&init)).map_err(|e| anyhow::anyhow!("{e}"))?;

    // The element writes the float result rounded; the official script quantises the decoded
    // image (round), colour-fixes it and truncates. Rounding then truncating can each move a
    // value by under one level: at most 2 levels apart; truncation alone averages half a level
    // (measured: max 1, mean 0.444).
    let want = case.io("image_wavelet_fixed_uint8")?.flatten_all()?.to_vec1::<u8>()?;
    let (mut worst, mut sum) = (0f32, 0f64);
    for (i, &e) in want.iter().enumerate() {
        let o = image.pixel((i / 3) % w, i / 3 / w)[i % 3];
        let d = ((o.clamp(0.0, 1.0) * 255.0).round() - e as f32).abs();
        worst = worst.max(d);
        sum += d as f64;
    }
    let mean = sum / want.len() as f64;
    if verbose {
        eprintln!("{}::element output vs official uint8: max {worst} levels, mean {mean:.3}", case.name);
    }
    ensure!(worst <= 2.0 && mean < 0.6, "element output vs official uint8 result: max {worst} levels, mean {mean:.3}");

    // Sampling from the stored prompt isolates the sampler from prompt assembly.
    let model = engine.model().clone();
    let pipe = DpirPipeline::new(&model.transformer, model.autoencoder.as_ref(), model.scheduler());
    let opts = SamplerOptions { steps, guidance_scale: 1.0, tiling: None, autoencoder_tiles: None };
    let mut trace_steps: Vec<(Tensor, f32, Tensor, Tensor)> = Vec::new();
    let stored = pipe
        .denoise(
            &trace.z_lq,
            &init,
            &case.io_f32("prompt_embeds")?,
            &case.io_f32("pooled_prompt_embeds")?,
            &opts,
            0,
            &mut |s| {
                trace_steps.push((s.model_input.clone(), s.timestep, s.velocity.clone(), s.latents.clone()));
                ControlFlow::Continue(())
            },
        )?
        .context("sampling stopped")?;
    ensure!(trace_steps.len() == steps, "expected {steps} step callbacks, got {}", trace_steps.len());
    ensure!(diff_stats(&stored, &case.io("final_latents")?)?.0 <= 2e-4, "sampling from the stored prompt drifts");
    if verbose {
        let stack = |k: usize| -> Result<Tensor> {
            let v: Vec<Tensor> = trace_steps
                .iter()
                .map(|t| match k {
                    0 => t.0.clone(),
                    2 => t.2.clone(),
                    _ => t.3.clone(),
                })
                .collect();
            Ok(Tensor::stack(&v, 0)?)
        };
        let ts = Tensor::from_vec(trace_steps.iter().map(|t| t.1).collect::<Vec<_>>(), (steps, 1), &Device::Cpu)?;
        for (name, t) in [
            ("debug_step_model_inputs", stack(0)?),
            ("debug_step_timesteps", ts),
            ("debug_step_velocity", stack(2)?),
            ("debug_step_latents", stack(3)?),
        ] {
            if let Ok(e) = case.io(name) {
                eprintln!("{}::{name} (debug): max |diff| = {:.3e}", case.name, diff_stats(&t, &e)?.0);
            }
        }
    }

    // Multi-tile sampling (2×2 tiles of 8 with overlap 4 on the 10×12 latent) and CFG: smoke
    // checks of the paths the fixture does not cover (finite, right shape).
    for (tiling, g) in [(Some(LatentTiling { tile: 8, overlap: 4, batch: 3 }), 1.0), (None, 2.0)] {
        let o = SamplerOptions { tiling, guidance_scale: g, ..opts.clone() };
        let x =
            pipe.denoise(&trace.z_lq, &init, &trace.prompt_embeds, &trace.pooled, &o, 0, &mut |_| {
                ControlFlow::Continue(())
            })?
            .context("sampling stopped")?;
        ensure!(x.dims() == init.dims(), "tiled/guided sampling changed the shape");
        let m = x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        ensure!(m.is_finite(), "tiled/guided sampling is not finite");
    }

    let tiles = gstdpir::model::prompt::global_tiles(w, h, &model.image.config)?;
    let boxes = |eff: bool| -> Result<Tensor> {
        let v: Vec<i64> = tiles
            .iter()
            .flat_map(|t| {
                let b = if eff { t.effective } else { t.raw };
                [b.h0, b.h1, b.w0, b.w1]
            })
            .collect();
        Ok(Tensor::from_vec(v, (tiles.len(), 4), &Device::Cpu)?)
    };
    // The official script's quantisation steps, on the engine's tensors.
    let image_u8 = postprocess_uint8(&trace.decoded)?;
    let fixed = color_fix_uint8(ColorFix::Wavelet, &image_u8, &lq_u8)?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(vec![
        produced("z_lq", trace.z_lq, E2E_FLOAT),
        produced("final_latents", trace.final_latents, E2E_FLOAT),
        produced("decoded", trace.decoded, E2E_FLOAT),
        produced("image_uint8", image_u8, UINT8),
        produced("image_wavelet_fixed_uint8", fixed, UINT8),
        produced("prompt_embeds", trace.prompt_embeds, T5_FLOAT),
        produced("pooled_prompt_embeds", trace.pooled, FLOAT),
        produced("tile_boxes_raw", boxes(false)?, Tol::Exact),
        produced("tile_boxes_effective", boxes(true)?, Tol::Exact),
    ])
}
