//! The DPIR engine behind the element: the per-frame policy around a loaded model
//! ([`crate::model::dpir`]), with the clip cache deciding what is computed once per clip.
//!
//! Per frame: LQ → bicubic upsample to the output size (8-bit input exactly as Pillow, deeper
//! input in float) → pad to a multiple of 16 → local prompt → [`DpirPipeline::restore`] (VAE
//! encode, Euler sampling in latent tiles if large, decode) → colour fix → crop.
//! Per clip (see [`crate::cache::ClipCache`]): text embedding, global visual prompt, noise.
//! Optionally (`warm_start`), a clip's frames after the first start sampling from the previous
//! frame's result instead of from noise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::cache::{CacheStats, ClipCache};
use crate::engine::{
    EngineError, EngineFactory, EngineSettings, FrameContext, Image, LqLatent, NoiseMode, Precision, RestoreEngine,
    StreamInfo,
};
use crate::model::autoencoder::LatentDraw;
use crate::model::dpir::{DpirModel, SharedModelError, shared_model};
use crate::model::loader::ModelSource;
use crate::model::pipeline::{DpirPipeline, SamplerOptions, Start};
use crate::model::preprocess::{RgbImage, resize_bicubic, resize_bicubic_f32};
use crate::model::prompt::assemble;
use crate::model::tiling::LatentTiling;

/// The engine the element builds unless told otherwise: DPIR from the `model` directory (or the
/// embedded dpir-nano).
pub fn factory() -> EngineFactory {
    Arc::new(|settings: &EngineSettings| DpirEngine::load(settings).map(|e| Box::new(e) as Box<dyn RestoreEngine>))
}

/// Standard-normal noise from a seed (reproducible across runs and devices).
pub fn seeded_noise(shape: (usize, usize, usize, usize), seed: u64, device: &Device) -> candle_core::Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f32> = (0..n).map(|_| rand_distr::StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, shape, device)
}

/// Mix a seed with stream positions so that each clip (and frame) gets its own noise.
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut x = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

/// A frame at the output size, as the model sees it (float RGB in [0, 1]) and as the CLIP
/// pre-processing sees it (8-bit, as the official code feeds it).
#[derive(Debug, Clone)]
pub struct Upsampled {
    pub width: usize,
    pub height: usize,
    /// `width · height · 3` values, RGB interleaved.
    pub rgb: Vec<f32>,
    pub rgb8: RgbImage,
}

impl Upsampled {
    /// From an 8-bit image: exact (`v / 255`, torchvision's `ToTensor`).
    pub fn from_rgb8(rgb8: RgbImage) -> Self {
        let rgb = rgb8.data.iter().map(|&v| v as f32 / 255.0).collect();
        Self { width: rgb8.width, height: rgb8.height, rgb, rgb8 }
    }

    /// From float RGB: the 8-bit copy is rounded.
    pub fn from_float(width: usize, height: usize, rgb: Vec<f32>) -> Self {
        let data = rgb.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
        Self { width, height, rgb, rgb8: RgbImage { width, height, data } }
    }
}

/// Tensors of one restored frame: what the parity tests compare and tools inspect.
#[derive(Debug, Clone)]
pub struct FrameTrace {
    /// Conditioning `[1, tokens, d]` and pooled vector `[1, d_pooled]`.
    pub prompt_embeds: Tensor,
    pub pooled: Tensor,
    /// The LQ frame as the VAE and the colour fix see it: NCHW in [0, 1], at the padded size.
    pub lq: Tensor,
    /// LQ latent, final latents (model space) and the decoded image (NCHW, about [-1, 1]), all at
    /// the padded size.
    pub z_lq: Tensor,
    pub final_latents: Tensor,
    pub decoded: Tensor,
    /// The colour-fixed result, NCHW in [0, 1], cropped to the output size.
    pub output: Tensor,
}

/// Where the time of one frame went.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameTimings {
    pub upsample: Duration,
    pub prompts: Duration,
    pub encode: Duration,
    pub sample: Duration,
    pub decode: Duration,
    pub color_fix: Duration,
    /// The model's fusion stage (zero when it has none).
    pub fusion: Duration,
}

impl std::fmt::Display for FrameTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "upsample {:.1} ms, prompts {:.1} ms, encode {:.1} ms, sample {:.1} ms, decode {:.1} ms, colour fix {:.1} ms, \
             fusion {:.1} ms",
            ms(self.upsample),
            ms(self.prompts),
            ms(self.encode),
            ms(self.sample),
            ms(self.decode),
            ms(self.color_fix),
            ms(self.fusion)
        )
    }
}

pub struct DpirEngine {
    model: Arc<DpirModel>,
    settings: EngineSettings,
    info: Option<StreamInfo>,
    cache: ClipCache,
    sampler: SamplerOptions,
    last_time: Option<Duration>,
    /// Stage timings of the last frame, for the debug log and benchmarks.
    pub last_timings: FrameTimings,
    warnings: Vec<String>,
}

fn settings_err(e: SharedModelError) -> EngineError {
    match e {
        SharedModelError::Settings(m) => EngineError::Settings(m),
        SharedModelError::Model(m) => EngineError::Model(m),
    }
}

/// The latent tiling for a model: the settings' explicit values (refused if the model cannot
/// take them), else the model's own (`sampler.tile_size` / `tile_overlap`), else DPIR's 128 / 8
/// within the model's position table.
pub fn latent_tiling(model: &DpirModel, settings: &EngineSettings) -> Result<LatentTiling, EngineError> {
    let max = model.max_tile();
    let spec = &model.files.manifest.sampler;
    let tile = match settings.tile_size as usize {
        0 => spec.tile_size.unwrap_or(128).min(max),
        n if n > max => {
            return Err(EngineError::Settings(format!(
                "tile-size {n} is larger than the {max} latents ({} px) {}'s position table takes: set \
                 tile-size to {max} or less, or to 0 for the model's own",
                max * 8,
                model.name
            )));
        }
        n => n,
    };
    let overlap = match usize::try_from(settings.tile_overlap) {
        Ok(o) => o,
        Err(_) => spec.tile_overlap.unwrap_or(8).min(tile / 4),
    };
    // Small tiles go through the transformer together (one official 1024-px tile's worth of
    // tokens, 4096, at most): a 64-token tile alone leaves the matrix products tiny. A tile of
    // DPIR's own size (128 latents = 4096 tokens) still goes alone, as memory wants.
    let patch = model.transformer_config.patch_size.max(1);
    let tokens_per_tile = (tile / patch).pow(2).max(1);
    let batch = (4096 / tokens_per_tile).clamp(1, 16);
    let tiling = LatentTiling { tile, overlap, batch };
    tiling.validate().map_err(|e| EngineError::Settings(format!("tile-size {tile} / tile-overlap {overlap}: {e}")))?;
    Ok(tiling)
}

impl DpirEngine {
    pub fn load(settings: &EngineSettings) -> Result<Self, EngineError> {
        let source = settings.model.clone().map(ModelSource::Dir);
        let model = shared_model(source, settings.device, settings.precision, settings.tiling).map_err(settings_err)?;
        Self::with_model(model, settings)
    }

    /// An engine on an already loaded model (the model's own device, dtype and tiling).
    pub fn with_model(model: Arc<DpirModel>, settings: &EngineSettings) -> Result<Self, EngineError> {
        if !(0.0..=1.0).contains(&settings.warm_start) {
            return Err(EngineError::Settings(format!(
                "warm-start {} is out of range: 0 (off) or a strength in (0, 1]",
                settings.warm_start
            )));
        }
        if !(-1.0..=1.0).contains(&settings.fidelity) {
            return Err(EngineError::Settings(format!(
                "fidelity {} is out of range: -1 (the model's own), 0 (full restoration) to 1 (the input)",
                settings.fidelity
            )));
        }
        // Negative: the model's own default (its validation table chose it), else full restoration.
        let mut settings = settings.clone();
        if settings.fidelity < 0.0 {
            settings.fidelity = model.files.manifest.fidelity.unwrap_or(0.0);
        }
        let settings = &settings;
        let default_steps = model.files.manifest.sampler.default_steps.unwrap_or(28);
        let tiling = latent_tiling(&model, settings)?;
        let steps = match settings.steps {
            0 => default_steps as usize,
            n => n as usize,
        };
        let mut warnings = Vec::new();
        if settings.warm_start > 0.0 && steps < 2 {
            warnings.push(format!(
                "warm-start={} has no effect with {steps} sampling step: set steps to 2 or more",
                settings.warm_start
            ));
        }
        Ok(Self {
            model,
            settings: settings.clone(),
            info: None,
            cache: ClipCache::default(),
            sampler: SamplerOptions { steps, guidance_scale: 1.0, tiling: Some(tiling) },
            last_time: None,
            last_timings: FrameTimings::default(),
            warnings,
        })
    }

    pub fn model(&self) -> &Arc<DpirModel> {
        &self.model
    }

    /// The sampler options in force (steps, latent tiling).
    pub fn sampler(&self) -> &SamplerOptions {
        &self.sampler
    }

    /// How often each encoder ran and how long it took (the clip cache's savings).
    pub fn stats(&self) -> CacheStats {
        self.cache.stats
    }

    /// The LQ frame at the output size: 8-bit input through Pillow's exact 8-bit bicubic (the
    /// official code's), deeper input in float so no precision is lost.
    pub fn upsample(&self, frame: &Image) -> Result<Upsampled> {
        let info = self.info.as_ref().context("restore before configure")?;
        let (ow, oh) = (info.out_width(), info.out_height());
        if info.depth <= 8 {
            let lq = image_to_rgb8(frame);
            let up = if (ow, oh) == (lq.width, lq.height) { lq } else { resize_bicubic(&lq, ow, oh)? };
            Ok(Upsampled::from_rgb8(up))
        } else if (ow, oh) == (frame.width, frame.height) {
            Ok(Upsampled::from_float(ow, oh, frame.data.clone()))
        } else {
            Ok(Upsampled::from_float(ow, oh, resize_bicubic_f32(&frame.data, frame.width, frame.height, ow, oh)?))
        }
    }

    /// Restore one frame already at the output size. `noise` replaces the engine's own initial
    /// noise (the parity tests pass the fixture's). Public for tools that drive the model without
    /// GStreamer (benchmarks, evaluation).
    pub fn restore_upsampled(
        &mut self,
        up: &Upsampled,
        ctx: &FrameContext,
        noise: Option<&Tensor>,
    ) -> Result<(Image, FrameTrace)> {
        let model = self.model.clone();
        let m = 2 * model.autoencoder.downscale();
        let (ow, oh) = (up.width, up.height);
        let (pw, ph) = (ow.div_ceil(m) * m, oh.div_ceil(m) * m);
        let dev = &model.device;
        let t_frame = Instant::now();

        // Per clip: global prompt from the key frame, noise field; per prompt string: text.
        // Without reuse (`reuse_prompts = false`, for measurements) both are recomputed from
        // every frame.
        if ctx.new_clip.is_some() || self.cache.clip_index != Some(ctx.clip_index) {
            self.cache.start_clip(ctx.clip_index, ctx.index);
        }
        // Position inside the clip: noise drawn per frame depends on (seed, clip, position), never
        // on the position in the stream, so a clip rendered alone reproduces itself.
        let pos = ctx.index.saturating_sub(self.cache.start_frame);
        let reuse = self.settings.reuse_prompts;
        let low_memory = self.settings.low_memory;
        let text = self.cache.text(&ctx.prompt, reuse, |p| model.text_embedding(p, low_memory))?;
        let t0 = Instant::now();
        let local = model.image.local_prompt(&up.rgb8).context("local visual prompt")?;
        self.cache.stats.local_encodes += 1;
        self.cache.stats.local_time += t0.elapsed();
        if self.cache.global.is_none() || !reuse {
            let t0 = Instant::now();
            self.cache.global = Some(model.image.global_prompt(&up.rgb8).context("global visual prompt")?);
            self.cache.stats.global_encodes += 1;
            self.cache.stats.global_time += t0.elapsed();
        }
        let embeds = assemble(&local, self.cache.global.as_ref().unwrap(), &text, model.image.config.clip_tokens)?;
        let prompts_time = t_frame.elapsed();

        let t0 = Instant::now();
        let lq = rgb_to_tensor(&pad_edge(&up.rgb, ow, oh, pw, ph), pw, ph, dev)?; // [0, 1]
        let lq_pm = ((&lq * 2.0)? - 1.0)?;
        let pipe = DpirPipeline::new(&model.transformer, model.autoencoder.as_ref(), model.scheduler());
        let shape = pipe.latent_shape(pw, ph)?;
        let seed = self.settings.seed;
        let draw = match self.settings.lq_latent {
            LqLatent::Mode => LatentDraw::Mode,
            LqLatent::Sample => {
                LatentDraw::Sample(seeded_noise(shape, mix(seed, ctx.clip_index, pos.wrapping_add(1 << 40)), dev)?)
            }
        };
        let noise = match (noise, self.settings.noise) {
            (Some(n), _) => n.clone(),
            (None, NoiseMode::PerFrame) => seeded_noise(shape, mix(seed, ctx.clip_index, pos + 1), dev)?,
            (None, NoiseMode::PerClip) => match &self.cache.noise {
                Some(n) if n.dims4()? == shape => n.clone(),
                _ => {
                    let n = seeded_noise(shape, mix(seed, ctx.clip_index, 0), dev)?;
                    self.cache.noise = Some(n.clone());
                    n
                }
            },
        };
        // Warm start: from the clip's second frame on, start from the previous frame's final
        // latents re-noised to the σ of step k (the scheduler does it) and run steps k.. only; a
        // clip's first frame always starts from pure noise, so clips stay independent.
        let steps = self.sampler.steps;
        let warm = self.settings.warm_start;
        let start = match &self.cache.previous {
            Some(prev) if warm > 0.0 && prev.dims4()? == shape => {
                let run = ((warm * steps as f64).round() as usize).clamp(1, steps);
                let step = steps - run;
                if step > 0 {
                    self.cache.stats.warm_starts += 1;
                }
                Start::Warm { previous: prev, noise: &noise, step }
            }
            _ => Start::Noise(&noise),
        };
        let cancel = ctx.cancel.clone();
        let mut on_step = |_: &crate::model::pipeline::StepInfo| -> candle_core::Result<()> {
            if cancel.is_cancelled() { Err(candle_core::Error::Msg("cancelled".into())) } else { Ok(()) }
        };
        let out =
            pipe.restore(&lq_pm, &embeds.prompt_embeds, &embeds.pooled, start, &draw, &self.sampler, &mut on_step)?;
        if warm > 0.0 {
            self.cache.previous = Some(out.final_latents.clone());
        }
        if model.dtype == DType::F16 && !all_finite(&out.decoded)? {
            return Err(NonFiniteF16.into()); // `restore` falls back to a wider dtype
        }
        let t_prep = t0.elapsed().saturating_sub(out.times.encode + out.times.sample + out.times.decode);
        let t0 = Instant::now();
        // As the official script: the decoded image is clamped to [0, 1] (diffusers'
        // postprocess) before the colour fix, which is computed on the float values (the
        // official quantises to 8 bits in between; 16-bit output keeps them).
        let out01 = ((&out.decoded + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
        let fixed = self.settings.color_fix.apply(&out01, &lq)?.clamp(0f32, 1f32)?;
        // The model's fusion stage (if any) takes the LQ frame's detail back where the model has
        // nothing better; trained on the colour-fixed output, so it comes after the fix.
        let t1 = Instant::now();
        let fixed = match &model.fusion {
            Some(fusion) => fusion.forward(&lq, &fixed)?.clamp(0f32, 1f32)?,
            None => fixed,
        };
        let t_fusion = t1.elapsed();
        // Fidelity: a pixel-space blend towards the LQ frame (both in [0, 1]: no clamp needed).
        let f = self.settings.fidelity;
        let fixed = if f > 0.0 { ((fixed * (1.0 - f))? + (&lq * f)?)? } else { fixed };
        let fixed = fixed.narrow(2, 0, oh)?.narrow(3, 0, ow)?;
        let image = tensor_to_image(&fixed)?;
        self.last_timings.prompts = prompts_time;
        // Tensor preparation (padding, noise draws) is counted with the encoder.
        self.last_timings.encode = out.times.encode + t_prep;
        self.last_timings.sample = out.times.sample;
        self.last_timings.decode = out.times.decode;
        // The colour fix, fidelity blend and conversion: everything since t0 but the fusion stage.
        self.last_timings.color_fix = t0.elapsed().saturating_sub(t_fusion);
        self.last_timings.fusion = t_fusion;
        self.cache.stats.frames += 1;
        self.cache.stats.frame_time += t_frame.elapsed();
        let trace = FrameTrace {
            prompt_embeds: embeds.prompt_embeds,
            pooled: embeds.pooled,
            lq,
            z_lq: out.z_lq,
            final_latents: out.final_latents,
            decoded: out.decoded,
            output: fixed,
        };
        Ok((image, trace))
    }

    /// [`RestoreEngine::restore`] with the frame's tensors, and an optional initial noise.
    pub fn restore_traced(
        &mut self,
        frame: &Image,
        ctx: &FrameContext,
        noise: Option<&Tensor>,
    ) -> Result<(Image, FrameTrace), EngineError> {
        let t0 = Instant::now();
        let up = self.upsample(frame).map_err(|e| EngineError::Runtime(format!("DPIR: upsampling: {e:#}")))?;
        self.last_timings.upsample = t0.elapsed();
        let out = match self.restore_upsampled(&up, ctx, noise) {
            Err(e) if e.is::<NonFiniteF16>() => {
                self.fall_back_from_f16()?;
                self.restore_upsampled(&up, ctx, noise) // the same frame again, in the wider dtype
            }
            r => r,
        };
        let out = out.map_err(|e| {
            if ctx.cancel.is_cancelled() {
                EngineError::Cancelled
            } else {
                // First line only: with RUST_BACKTRACE set, candle appends a backtrace.
                let msg = format!("{e:#}");
                EngineError::Runtime(format!("DPIR: {}", msg.lines().next().unwrap_or_default()))
            }
        })?;
        self.last_time = Some(t0.elapsed());
        Ok(out)
    }

    /// After an f16 overflow: warn, and go on in bf16 (CUDA) or f32 (CPU, which has no bf16
    /// matmul) for the rest of the stream. The clip cache holds f16 tensors: it starts afresh
    /// (its statistics kept).
    fn fall_back_from_f16(&mut self) -> Result<(), EngineError> {
        let to = if self.model.device.is_cpu() { Precision::F32 } else { Precision::Bf16 };
        self.warnings.push(format!(
            "precision=f16 overflowed (inf/NaN in a frame) on {:?}; falling back to precision={} for the rest \
             of the stream and redoing the frame",
            self.model.device.location(),
            if to == Precision::F32 { "f32" } else { "bf16" }
        ));
        let mut settings = self.settings.clone();
        settings.precision = to;
        let source = settings.model.clone().map(ModelSource::Dir);
        self.model =
            shared_model(source, settings.device, settings.precision, settings.tiling).map_err(settings_err)?;
        self.settings = settings;
        let stats = self.cache.stats;
        self.cache = ClipCache::default();
        self.cache.stats = stats;
        Ok(())
    }

    /// The precision in force (after an f16 fallback, the wider one).
    pub fn precision(&self) -> Precision {
        self.settings.precision
    }
}

impl RestoreEngine for DpirEngine {
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        if ![1, 2, 4].contains(&info.scale) {
            return Err(EngineError::Settings(format!("scale {} is not supported: use 1, 2 or 4", info.scale)));
        }
        if info.in_width < 8 || info.in_height < 8 {
            return Err(EngineError::Stream(format!(
                "{}x{} is too small: DPIR needs frames of at least 8×8 pixels",
                info.in_width, info.in_height
            )));
        }
        // A new size invalidates the noise field (its shape), not the prompts.
        self.cache.noise = None;
        self.info = Some(info.clone());
        Ok(())
    }

    fn restore(&mut self, frame: &Image, ctx: &FrameContext) -> Result<Image, EngineError> {
        if self.settings.fidelity >= 1.0 {
            // fidelity=1 asks for the LQ frame itself: the blend would discard the model's output,
            // so the model does not run (the same values as `(1 − 1)·restored + 1·LQ`).
            let t0 = Instant::now();
            let up = self.upsample(frame).map_err(|e| EngineError::Runtime(format!("DPIR: upsampling: {e:#}")))?;
            self.last_timings = FrameTimings { upsample: t0.elapsed(), ..Default::default() };
            self.last_time = Some(t0.elapsed());
            return Ok(Image { width: up.width, height: up.height, data: up.rgb });
        }
        self.restore_traced(frame, ctx, None).map(|(img, _)| img)
    }

    fn latency(&self) -> Option<Duration> {
        self.last_time
    }

    fn timings(&self) -> Option<String> {
        Some(self.last_timings.to_string())
    }

    fn describe(&self) -> String {
        let t = self.sampler.tiling.unwrap_or_default();
        format!(
            "{} on {:?} ({:?}), {} steps, latent tiles {} / overlap {}, colour fix {}{}",
            self.model.name,
            self.model.device.location(),
            self.model.dtype,
            self.sampler.steps,
            t.tile,
            t.overlap,
            self.settings.color_fix,
            if self.model.fusion.is_some() { ", fusion stage" } else { "" }
        )
    }

    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
}

/// f16 overflowed: a frame came out with inf/NaN (activations past f16's ±65504).
#[derive(Debug, thiserror::Error)]
#[error("precision=f16 overflowed (inf/NaN in the decoded frame)")]
struct NonFiniteF16;

/// No inf/NaN in `t`: one f32 sum (inf − inf is NaN, and NaN stays NaN).
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    Ok(t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// 8-bit frames are exactly `k / 255`: this gives `k` back.
pub fn image_to_rgb8(img: &Image) -> RgbImage {
    let data = img.data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    RgbImage { width: img.width, height: img.height, data }
}

/// Replicate the last row/column of a `w × h` RGB float image up to `pw × ph` (the model needs
/// multiples of 16).
fn pad_edge(rgb: &[f32], w: usize, h: usize, pw: usize, ph: usize) -> Vec<f32> {
    if (w, h) == (pw, ph) {
        return rgb.to_vec();
    }
    let mut data = vec![0f32; pw * ph * 3];
    for y in 0..ph {
        let sy = y.min(h - 1);
        for x in 0..pw {
            let s = (sy * w + x.min(w - 1)) * 3;
            data[(y * pw + x) * 3..(y * pw + x) * 3 + 3].copy_from_slice(&rgb[s..s + 3]);
        }
    }
    data
}

/// Packed RGB floats → NCHW `[1, 3, h, w]`.
fn rgb_to_tensor(rgb: &[f32], w: usize, h: usize, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(rgb, (h, w, 3), dev)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
}

fn tensor_to_image(t: &Tensor) -> Result<Image> {
    let t = t.squeeze(0)?.permute((1, 2, 0))?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (h, w, _) = t.dims3()?;
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(Image { width: w, height: h, data })
}

const _: () = {
    const fn send<T: Send>() {}
    send::<DpirEngine>();
};
