//! `pipeline_e2e`: the official one-image pipeline (prompt assembly from the real dual-prompt
//! code, VAE encode with the posterior mode, 4 Euler steps, decode, postprocess, wavelet colour
//! fix). Per-step debug tensors are compared with DPIR_PARITY_VERBOSE (not enforced).
use anyhow::{Result, ensure};
use candle_core::{Device, Tensor};
use gstdpir::model::autoencoder::LatentDraw;
use gstdpir::model::clip::{ClipVisionConfig, ClipVisionModel};
use gstdpir::model::color_fix::{ColorFix, color_fix_uint8};
use gstdpir::model::pipeline::{DpirPipeline, SamplerOptions, postprocess_uint8};
use gstdpir::model::preprocess::RgbImage;
use gstdpir::model::prompt::{DualPromptEncoder, ImagePromptEncoder, PromptConfig};
use gstdpir::model::scheduler::FlowMatchEulerConfig;
use gstdpir::model::t5::{T5Config, T5EncoderModel, T5Tokenizer, TextEncoder};
use gstdpir::model::tiling::LatentTiling;
use gstdpir::model::transformer::{DpirTransformer, DpirTransformerConfig};
use gstdpir::model::vae::{AutoencoderKl, AutoencoderKlConfig};

use crate::common::{Case, E2E_FLOAT, FLOAT, Produced, T5_FLOAT, Tol, UINT8, diff_stats, produced};

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let verbose = std::env::var_os("DPIR_PARITY_VERBOSE").is_some();
    // Prompt: local patch = global image = LQ (as the official test script).
    let tower = |name: &str| -> Result<ClipVisionModel> {
        ClipVisionModel::new(&ClipVisionConfig::from_json(case.library_config(name)?)?, case.var_builder(name)?)
    };
    let image =
        ImagePromptEncoder::new(tower("image_encoder_one")?, tower("image_encoder_two")?, PromptConfig::default())?;
    let prompt = case.cfg("/prompt")?.as_str().unwrap_or_default().to_string();
    crate::t5::check_tokenizer(case, std::slice::from_ref(&prompt), "t5_input_ids")?;
    let t5_len = case.io("t5_input_ids")?.dim(1)?;
    let rel = case.cfg("/tokenizer_files/tokenizer_json")?.as_str().unwrap_or_default();
    let text = TextEncoder::new(
        T5EncoderModel::new(
            &T5Config::from_json(case.library_config("text_encoder_three")?)?,
            case.var_builder("text_encoder_three")?,
        )?,
        T5Tokenizer::from_file(case.dir.join(rel), t5_len)?,
    );
    let prompts = DualPromptEncoder { image, text };
    let lq_u8 = case.io("lq_image_uint8")?;
    let lq_rgb = RgbImage::from_hwc_tensor(&lq_u8)?;
    let pe = prompts.encode_lq(&lq_rgb, &prompt)?;
    let tiles = gstdpir::model::prompt::global_tiles(lq_rgb.width, lq_rgb.height, &prompts.image.config)?;
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

    // Models.
    let tcfg: DpirTransformerConfig = serde_json::from_value(case.library_config("transformer")?.clone())?;
    let transformer = DpirTransformer::new(&tcfg, case.var_builder("transformer")?)?;
    let vcfg: AutoencoderKlConfig = serde_json::from_value(case.library_config("vae")?.clone())?;
    let vae = AutoencoderKl::new(&vcfg, case.var_builder("vae")?)?;
    let scfg: FlowMatchEulerConfig = serde_json::from_value(case.library_config("scheduler")?.clone())?;
    let pipe = DpirPipeline::new(&transformer, &vae, scfg);

    let steps = case.cfg("/call/pipeline/num_inference_steps")?.as_u64().unwrap_or(28) as usize;
    let guidance_scale = case.cfg("/call/pipeline/guidance_scale")?.as_f64().unwrap_or(1.0);
    let opts = SamplerOptions { steps, guidance_scale, tiling: Some(LatentTiling::default()) };
    let lq = case.io_f32("lq_image")?;
    let init = case.io_f32("initial_latents")?;
    let mut trace: Vec<(Tensor, f32, Tensor, Tensor)> = Vec::new();
    let out = pipe.restore(&lq, &pe.prompt_embeds, &pe.pooled, &init, &LatentDraw::Mode, &opts, &mut |s| {
        trace.push((s.model_input.clone(), s.timestep, s.velocity.clone(), s.latents.clone()));
        Ok(())
    })?;
    ensure!(trace.len() == steps, "expected {steps} step callbacks, got {}", trace.len());

    // The same sampling from the stored prompt (isolates the sampler from prompt assembly).
    let stored = pipe.denoise(
        &out.z_lq,
        &init,
        &case.io_f32("prompt_embeds")?,
        &case.io_f32("pooled_prompt_embeds")?,
        &SamplerOptions { tiling: None, ..opts.clone() },
        &mut |_| Ok(()),
    )?;

    if verbose {
        let stack = |k: usize| -> Result<Tensor> {
            Ok(Tensor::stack(
                &trace
                    .iter()
                    .map(|t| match k {
                        0 => t.0.clone(),
                        2 => t.2.clone(),
                        _ => t.3.clone(),
                    })
                    .collect::<Vec<_>>(),
                0,
            )?)
        };
        let ts = Tensor::from_vec(trace.iter().map(|t| t.1).collect::<Vec<_>>(), (steps, 1), &Device::Cpu)?;
        for (name, t) in [
            ("debug_step_model_inputs", stack(0)?),
            ("debug_step_timesteps", ts),
            ("debug_step_velocity", stack(2)?),
            ("debug_step_latents", stack(3)?),
            ("debug_lq_encoder_moments", vae.encode_moments(&lq)?),
        ] {
            if let Ok(e) = case.io(name) {
                eprintln!("{}::{name} (debug): max |diff| = {:.3e}", case.name, diff_stats(&t, &e)?.0);
            }
        }
        eprintln!(
            "{}::final_latents from stored prompt (untiled): max |diff| = {:.3e}",
            case.name,
            diff_stats(&stored, &case.io("final_latents")?)?.0
        );
    }
    ensure!(diff_stats(&stored, &case.io("final_latents")?)?.0 <= 2e-4, "sampling from the stored prompt drifts");

    // Multi-tile sampling (2×2 tiles of 8 with overlap 4 on the 10×12 latent) and CFG: smoke
    // checks of the paths the fixture does not cover (finite, right shape).
    for (tiling, g) in [(Some(LatentTiling { tile: 8, overlap: 4, batch: 3 }), 1.0), (None, 2.0)] {
        let o = SamplerOptions { tiling, guidance_scale: g, ..opts.clone() };
        let x = pipe.denoise(&out.z_lq, &init, &pe.prompt_embeds, &pe.pooled, &o, &mut |_| Ok(()))?;
        ensure!(x.dims() == init.dims(), "tiled/guided sampling changed the shape");
        let m = x.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        ensure!(m.is_finite(), "tiled/guided sampling is not finite");
    }

    let image_u8 = postprocess_uint8(&out.decoded)?;
    let fixed = color_fix_uint8(ColorFix::Wavelet, &image_u8, &lq_u8)?;
    Ok(vec![
        produced("z_lq", out.z_lq, E2E_FLOAT),
        produced("final_latents", out.final_latents, E2E_FLOAT),
        produced("decoded", out.decoded, E2E_FLOAT),
        produced("image_uint8", image_u8, UINT8),
        produced("image_wavelet_fixed_uint8", fixed, UINT8),
        produced("prompt_embeds", pe.prompt_embeds, T5_FLOAT),
        produced("pooled_prompt_embeds", pe.pooled, FLOAT),
        produced("tile_boxes_raw", boxes(false)?, Tol::Exact),
        produced("tile_boxes_effective", boxes(true)?, Tol::Exact),
    ])
}
