//! The DPIR engine behind the element: the per-frame policy around a loaded model
//! ([`crate::model::dpir`]), with the clip state ([`super::clip_state`]) holding what is computed
//! once per clip.
//!
//! Per frame: the frame upsampled to the output size (8-bit input exactly as Pillow, deeper
//! input in float) → the LQ tensor, padded to a multiple of 16, in one pass → local prompt →
//! [`DpirPipeline::restore`] (VAE encode, Euler sampling in latent tiles if large, decode) →
//! [`finish`] (colour fix, fusion, fidelity, crop). Per clip: text embedding, global visual
//! prompt, noise. Optionally (`warm_start`), a clip's frames after the first start sampling from
//! the previous frame's result instead of from noise.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use super::clip_state::{ClipState, ReuseStats};
use super::models::shared_model;
use super::{
    EngineError, EngineFactory, EngineSettings, Frame, FrameContext, FrameTimings, Image, LqLatent, NoiseMode, Pixels,
    Precision, RestoreEngine, Restored, StreamInfo,
};
use crate::model::autoencoder::LatentDraw;
use crate::model::dpir::{DpirModel, LoadOptions};
use crate::model::loader::ModelSource;
use crate::model::memory::{self, gib};
use crate::model::pipeline::{DpirPipeline, Finish, SamplerOptions, Start, finish};
use crate::model::preprocess::{RgbImage, RgbPixels, lq_tensor, resize_bicubic, resize_bicubic_f32};
use crate::model::prompt::{PromptEmbeds, assemble};
use crate::model::tiling::{LatentTiling, TileConfig};

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

/// A frame at the output size, as the model and the CLIP pre-processing see it.
pub struct Upsampled {
    pub width: usize,
    pub height: usize,
    /// The LQ frame, `[1, 3, ph, pw]` in [0, 1], padded to the model's multiple.
    pub lq: Tensor,
    /// 8-bit RGB for the CLIP towers (the official code feeds them 8-bit images).
    pub rgb8: RgbImage,
}

/// The tensors of one restored frame, for the parity tests (`parity` feature).
#[cfg(feature = "parity")]
#[derive(Debug, Clone)]
pub struct FrameTrace {
    /// Conditioning `[1, tokens, d]` and pooled vector `[1, d_pooled]`.
    pub prompt_embeds: Tensor,
    pub pooled: Tensor,
    /// LQ latent, final latents (model space) and the decoded image (NCHW, about [-1, 1]), all at
    /// the padded size.
    pub z_lq: Tensor,
    pub final_latents: Tensor,
    pub decoded: Tensor,
}

/// What [`DpirEngine::run`] makes of a frame.
struct Run {
    image: Image,
    /// The tensors the parity tests compare (`parity` feature).
    #[cfg_attr(not(feature = "parity"), allow(dead_code))]
    tensors: (PromptEmbeds, Tensor, Tensor, Tensor),
}

/// Per-stage peak resident memory (`DPIR_PROFILE_MEMORY=1`): each stage's peak measured from a
/// reset of the kernel's high-water mark.
struct MemoryProbe {
    on: bool,
    peaks: [u64; 7],
}

impl MemoryProbe {
    fn new() -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var_os("DPIR_PROFILE_MEMORY").is_some_and(|v| v == "1"));
        if on {
            memory::reset_peak();
        }
        Self { on, peaks: [0; 7] }
    }

    /// Record stage `i`'s peak and start the next one.
    fn stage(&mut self, i: usize) {
        if self.on {
            self.peaks[i] = memory::peak_rss();
            memory::reset_peak();
        }
    }

    fn result(&self) -> Option<[u64; 7]> {
        self.on.then_some(self.peaks)
    }
}

pub struct DpirEngine {
    model: Arc<DpirModel>,
    settings: EngineSettings,
    info: Option<StreamInfo>,
    clip: ClipState,
    sampler: SamplerOptions,
    warnings: Vec<String>,
    /// The memory estimate of the configured frame size, for the debug log.
    estimate: Option<String>,
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

/// The autoencoder's tiles: the model's own, shrunk to an explicit `tile-size` below them.
fn autoencoder_tiles(model: &DpirModel, settings: &EngineSettings) -> TileConfig {
    let own = model.autoencoder_tiles;
    match settings.tile_size as usize {
        0 => own,
        n if n < own.tile => TileConfig { tile: n, overlap: own.overlap.min(n / 4), halo: own.halo.min(n / 4) },
        _ => own,
    }
}

impl DpirEngine {
    pub fn load(settings: &EngineSettings) -> Result<Self, EngineError> {
        let source = settings.model.clone().map(ModelSource::Dir);
        let opts = LoadOptions {
            tiling: settings.tiling,
            low_memory: settings.low_memory,
            prompts: vec![settings.prompt.clone()],
        };
        let model = shared_model(source, settings.device, settings.precision, &opts)?;
        Self::with_model(model, settings)
    }

    /// An engine on an already loaded model (the model's own device, precision and tiling).
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
        let default_steps = model.files.manifest.sampler.default_steps.unwrap_or(28);
        let tiling = latent_tiling(&model, &settings)?;
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
        if model.plan.text_released_to_fit(settings.low_memory) {
            let b = model.plan.budget.as_ref().map(|b| b.to_string()).unwrap_or_default();
            warnings.push(format!(
                "the T5 text encoder ({}) does not fit beside the rest of the model in the memory this process may \
                 use ({b}): it is loaded only to embed a new prompt and released after it (a prompt change costs \
                 a reload)",
                gib(model.plan.weights.text_encoder)
            ));
        }
        let sampler = SamplerOptions {
            steps,
            guidance_scale: 1.0,
            tiling: Some(tiling),
            autoencoder_tiles: Some(autoencoder_tiles(&model, &settings)),
        };
        Ok(Self { model, settings, info: None, clip: ClipState::default(), sampler, warnings, estimate: None })
    }

    pub fn model(&self) -> &Arc<DpirModel> {
        &self.model
    }

    /// The sampler options in force (steps, latent tiling).
    pub fn sampler(&self) -> &SamplerOptions {
        &self.sampler
    }

    /// How often each encoder ran and how long it took (what the per-clip reuse saves).
    pub fn stats(&self) -> ReuseStats {
        self.clip.stats
    }

    /// The precision in force (after an f16 fallback, the wider one).
    pub fn precision(&self) -> Precision {
        self.settings.precision
    }

    /// The frame at the output size: 8-bit input through Pillow's exact 8-bit bicubic (the
    /// official code's), deeper input in float so no precision is lost; then the LQ tensor.
    pub fn upsample(&self, frame: Frame) -> candle_core::Result<Upsampled> {
        let Some(info) = self.info.as_ref() else { candle_core::bail!("restore before configure") };
        let (ow, oh) = (info.out_width(), info.out_height());
        let m = 2 * self.model.autoencoder.downscale();
        let (pw, ph) = (ow.div_ceil(m) * m, oh.div_ceil(m) * m);
        let dev = &self.model.device;
        match frame.pixels {
            Pixels::Rgb8(data) => {
                let img = RgbImage::new(frame.width, frame.height, data)?;
                let rgb8 = if (ow, oh) == (img.width, img.height) { img } else { resize_bicubic(&img, ow, oh)? };
                let lq = lq_tensor(RgbPixels::U8(&rgb8.data), ow, oh, pw, ph, dev)?;
                Ok(Upsampled { width: ow, height: oh, lq, rgb8 })
            }
            Pixels::RgbF32(data) => {
                let rgb = if (ow, oh) == (frame.width, frame.height) {
                    data
                } else {
                    resize_bicubic_f32(&data, frame.width, frame.height, ow, oh)?
                };
                let lq = lq_tensor(RgbPixels::F32(&rgb), ow, oh, pw, ph, dev)?;
                let bytes = rgb.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
                Ok(Upsampled { width: ow, height: oh, lq, rgb8: RgbImage::new(ow, oh, bytes)? })
            }
        }
    }

    /// Restore one upsampled frame. `noise` replaces the engine's own initial noise (the parity
    /// tests pass the fixture's). `None`: cancelled.
    fn run(
        &mut self,
        up: &Upsampled,
        ctx: &FrameContext,
        noise: Option<&Tensor>,
        t: &mut FrameTimings,
    ) -> Result<Option<Run>, RunError> {
        let model = self.model.clone();
        let dev = &model.device;
        let mut probe = MemoryProbe::new();

        // Per clip: global prompt from the key frame, noise field; per prompt string: text.
        // Without reuse (`reuse_prompts = false`, for measurements) both are recomputed from
        // every frame.
        self.clip.enter(ctx);
        let reuse = self.settings.reuse_prompts;
        let low_memory = self.settings.low_memory;
        let t0 = Instant::now();
        let text = self.clip.text(&ctx.prompt, reuse, |p| model.text_embedding(p, low_memory))?;
        t.text = t0.elapsed();
        probe.stage(0);
        if self.clip.global.is_none() || !reuse {
            let t0 = Instant::now();
            self.clip.global = Some(model.image.global_prompt(&up.rgb8)?);
            self.clip.stats.global_encodes += 1;
            t.global_prompt = t0.elapsed();
            self.clip.stats.global_time += t.global_prompt;
        }
        probe.stage(1);
        let t0 = Instant::now();
        let local = model.image.local_prompt(&up.rgb8)?;
        t.local_prompt = t0.elapsed();
        self.clip.stats.local_encodes += 1;
        self.clip.stats.local_time += t.local_prompt;
        let embeds = assemble(&local, self.clip.global.as_ref().unwrap(), &text, model.image.config.clip_tokens)?;
        probe.stage(2);

        let t0 = Instant::now();
        let lq_pm = ((&up.lq * 2.0)? - 1.0)?; // the autoencoder's [-1, 1]
        let pipe = DpirPipeline::new(&model.transformer, model.autoencoder.as_ref(), model.scheduler());
        let (_, _, ph, pw) = up.lq.dims4()?;
        let shape = pipe.latent_shape(pw, ph)?;
        // Noise depends on (seed, clip, position in the clip), never on the position in the
        // stream, so a clip rendered alone reproduces itself.
        let (seed, pos) = (self.settings.seed, ctx.position);
        let draw = match self.settings.lq_latent {
            LqLatent::Mode => LatentDraw::Mode,
            LqLatent::Sample => {
                LatentDraw::Sample(seeded_noise(shape, mix(seed, ctx.clip_index, pos.wrapping_add(1 << 40)), dev)?)
            }
        };
        let noise = match (noise, self.settings.noise) {
            (Some(n), _) => n.clone(),
            (None, NoiseMode::PerFrame) => seeded_noise(shape, mix(seed, ctx.clip_index, pos + 1), dev)?,
            (None, NoiseMode::PerClip) => match &self.clip.noise {
                Some(n) if n.dims4()? == shape => n.clone(),
                _ => {
                    let n = seeded_noise(shape, mix(seed, ctx.clip_index, 0), dev)?;
                    self.clip.noise = Some(n.clone());
                    n
                }
            },
        };
        // Warm start: from the clip's second frame on, start from the previous frame's final
        // latents re-noised to the σ of step k (the scheduler does it) and run steps k.. only; a
        // clip's first frame always starts from pure noise, so clips stay independent.
        let steps = self.sampler.steps;
        let warm = self.settings.warm_start;
        let start = match &self.clip.previous {
            Some(prev) if warm > 0.0 && prev.dims4()? == shape => {
                let run = ((warm * steps as f64).round() as usize).clamp(1, steps);
                let step = steps - run;
                if step > 0 {
                    self.clip.stats.warm_starts += 1;
                }
                Start::Warm { previous: prev, noise: &noise, step }
            }
            _ => Start::Noise(&noise),
        };
        let tiles = self.sampler.autoencoder_tiles;
        let z_lq = pipe.encode_lq(&lq_pm, &draw, tiles)?;
        t.encode = t0.elapsed();
        probe.stage(3);
        let t0 = Instant::now();
        let (init, first) = pipe.start(start, steps)?;
        let cancel = ctx.cancel.clone();
        let mut on_step = |_: &crate::model::pipeline::StepInfo| {
            if cancel.is_cancelled() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let Some(final_latents) =
            pipe.denoise(&z_lq, &init, &embeds.prompt_embeds, &embeds.pooled, &self.sampler, first, &mut on_step)?
        else {
            return Ok(None);
        };
        t.sample = t0.elapsed();
        t.steps = steps - first;
        probe.stage(4);
        if warm > 0.0 {
            self.clip.previous = Some(final_latents.clone());
        }
        let t0 = Instant::now();
        let decoded = pipe.decode(&final_latents, tiles)?;
        if model.dtype == DType::F16 && !model.device.is_cpu() && !all_finite(&decoded)? {
            return Err(RunError::F16Overflow); // `restore` falls back to a wider dtype
        }
        t.decode = t0.elapsed();
        probe.stage(5);
        let t0 = Instant::now();
        let fin = Finish {
            color_fix: self.settings.color_fix,
            fusion: model.fusion.as_ref(),
            fidelity: self.settings.fidelity,
        };
        let (fixed, fusion_time) = finish(&decoded, &up.lq, &fin)?;
        let image = tensor_to_image(&fixed, up.width, up.height)?;
        t.fusion = fusion_time;
        t.color_fix = t0.elapsed().saturating_sub(fusion_time);
        probe.stage(6);
        t.peak_rss = probe.result();
        self.clip.stats.frames += 1;
        Ok(Some(Run { image, tensors: (embeds, z_lq, final_latents, decoded) }))
    }

    /// Restore a frame, with the frame's tensors and an optional initial noise (the parity tests').
    #[cfg(feature = "parity")]
    pub fn restore_traced(
        &mut self,
        frame: Frame,
        ctx: &FrameContext,
        noise: Option<&Tensor>,
    ) -> Result<(Image, FrameTrace), EngineError> {
        let up = self.upsample(frame)?;
        let mut t = FrameTimings::default();
        let run = self.run(&up, ctx, noise, &mut t).map_err(RunError::into_engine)?.ok_or(EngineError::Cancelled)?;
        let (embeds, z_lq, final_latents, decoded) = run.tensors;
        let trace =
            FrameTrace { prompt_embeds: embeds.prompt_embeds, pooled: embeds.pooled, z_lq, final_latents, decoded };
        Ok((run.image, trace))
    }

    /// After an f16 overflow on a GPU: warn, and go on in bf16 for the rest of the stream. The
    /// clip state holds f16 tensors: it starts afresh (its statistics kept).
    fn fall_back_from_f16(&mut self) -> Result<(), EngineError> {
        self.warnings.push(format!(
            "precision=f16 overflowed (inf/NaN in a frame) on {:?}; falling back to precision=bf16 for the rest of \
             the stream and redoing the frame",
            self.model.device.location(),
        ));
        let mut settings = self.settings.clone();
        settings.precision = Precision::Bf16;
        let source = settings.model.clone().map(ModelSource::Dir);
        let opts = LoadOptions { tiling: settings.tiling, low_memory: settings.low_memory, prompts: Vec::new() };
        self.model = shared_model(source, settings.device, settings.precision, &opts)?;
        self.settings = settings;
        self.clip.clear();
        Ok(())
    }

    /// The frame's memory estimate against this process's budget: a frame that cannot fit stops
    /// the stream before its first frame, with the figures and what to change.
    fn check_memory(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        let m = 2 * self.model.autoencoder.downscale();
        let (pw, ph) = (info.out_width().div_ceil(m) * m, info.out_height().div_ceil(m) * m);
        let tiling = self.sampler.tiling.unwrap_or_default();
        let ae = self.sampler.autoencoder_tiles.unwrap_or_default();
        let stages = self.model.activation_estimate(pw, ph, &tiling, &ae);
        let (worst, peak) = stages.iter().max_by_key(|s| s.1).copied().unwrap_or(("none", 0));
        let list = stages.iter().map(|(n, b)| format!("{n} {}", gib(*b))).collect::<Vec<_>>().join(", ");
        let budget = if self.model.device.is_cpu() { memory::budget() } else { None };
        self.estimate = Some(format!(
            "memory for {pw}x{ph}: weights {} resident ({}), per stage beyond them: {list}; peak {}{}",
            gib(if self.model.text_encoder_loaded() {
                self.model.plan.weights.total()
            } else {
                self.model.plan.weights.without_text()
            }),
            self.model.plan.weights,
            gib(peak),
            budget.as_ref().map(|b| format!(", available {b}")).unwrap_or_default()
        ));
        let Some(b) = budget else { return Ok(()) };
        if peak <= b.bytes {
            return Ok(());
        }
        // What would fit: a smaller tile (transformer and autoencoder tiles), f16/bf16 weights.
        let mut ways = Vec::new();
        let mut tile = tiling.tile / 2;
        while tile >= 16 {
            let t = LatentTiling { tile, overlap: tiling.overlap.min(tile / 4), batch: 1 };
            let a =
                TileConfig { tile: ae.tile.min(tile), overlap: ae.overlap.min(tile / 4), halo: ae.halo.min(tile / 4) };
            let p = self.model.activation_estimate(pw, ph, &t, &a).iter().map(|s| s.1).max().unwrap_or(0);
            if p <= b.bytes {
                ways.push(format!("tile-size={tile} ({} px tiles: peak {})", tile * 8, gib(p)));
                break;
            }
            tile /= 2;
        }
        if self.model.dtype == DType::F32 {
            ways.push("precision=f16 or bf16 (the weights in half: more room for the frame)".into());
        }
        if self.model.text_encoder_loaded() && !self.settings.low_memory {
            ways.push(format!("low-memory=true (frees T5's {})", gib(self.model.plan.weights.text_encoder)));
        }
        Err(EngineError::Stream(format!(
            "restoring {}x{} (×{}) needs about {} more memory at its peak ({worst}), but this process may use {b}: \
             set {}",
            info.in_width,
            info.in_height,
            info.scale,
            gib(peak),
            if ways.is_empty() { "a smaller scale or input, or free memory".to_string() } else { ways.join(", or ") }
        )))
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
        self.check_memory(info)?;
        // A new size invalidates the noise field (its shape), not the prompts.
        self.clip.noise = None;
        self.info = Some(info.clone());
        Ok(())
    }

    fn restore(&mut self, frame: Frame, ctx: &FrameContext) -> Result<Restored, EngineError> {
        let t0 = Instant::now();
        let mut t = FrameTimings::default();
        let up = self.upsample(frame)?;
        t.upsample = t0.elapsed();
        if self.settings.fidelity >= 1.0 {
            // fidelity=1 asks for the LQ frame itself: the blend would discard the model's output,
            // so the model does not run (the same values as `(1 − 1)·restored + 1·LQ`).
            t.total = t0.elapsed();
            let image = tensor_to_image(&up.lq, up.width, up.height)?;
            return Ok(Restored { image, timings: t, warnings: std::mem::take(&mut self.warnings) });
        }
        let run = match self.run(&up, ctx, None, &mut t) {
            Err(RunError::F16Overflow) => {
                self.fall_back_from_f16()?;
                self.run(&up, ctx, None, &mut t) // the same frame again, in the wider dtype
            }
            r => r,
        };
        let run = match run {
            Ok(Some(r)) => r,
            Ok(None) => return Err(EngineError::Cancelled),
            Err(_) if ctx.cancel.is_cancelled() => return Err(EngineError::Cancelled),
            Err(e) => return Err(e.into_engine()),
        };
        t.total = t0.elapsed();
        self.clip.stats.frame_time += t.total;
        Ok(Restored { image: run.image, timings: t, warnings: std::mem::take(&mut self.warnings) })
    }

    fn describe(&self) -> String {
        let t = self.sampler.tiling.unwrap_or_default();
        let mut s = format!(
            "{} on {:?} ({} weights), {} steps, latent tiles {} / overlap {}, colour fix {}{}",
            self.model.name,
            self.model.device.location(),
            self.settings.precision,
            self.sampler.steps,
            t.tile,
            t.overlap,
            self.settings.color_fix,
            if self.model.fusion.is_some() { ", fusion stage" } else { "" }
        );
        if self.model.plan.weights.text_encoder > 0 {
            s.push_str(if self.model.plan.text_resident { ", T5 kept loaded" } else { ", T5 loaded per new prompt" });
        }
        if let Some(e) = &self.estimate {
            s.push_str("; ");
            s.push_str(e);
        }
        s
    }

    fn load_warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }
}

/// Why [`DpirEngine::run`] stopped.
#[derive(Debug)]
enum RunError {
    Model(candle_core::Error),
    /// f16 overflowed on a GPU: the frame came out with inf/NaN (activations past ±65504).
    F16Overflow,
}

impl From<candle_core::Error> for RunError {
    fn from(e: candle_core::Error) -> Self {
        RunError::Model(e)
    }
}

impl RunError {
    fn into_engine(self) -> EngineError {
        match self {
            RunError::Model(e) => EngineError::Runtime(e),
            RunError::F16Overflow => EngineError::Runtime(candle_core::Error::Msg(
                "precision=f16 overflowed again after the fallback to bf16".into(),
            )),
        }
    }
}

/// No inf/NaN in `t`: one f32 sum (inf − inf is NaN, and NaN stays NaN).
fn all_finite(t: &Tensor) -> candle_core::Result<bool> {
    Ok(t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// `[1, 3, ph, pw]` (padded) → the planes of its top-left `w × h`, on the CPU in f32: one copy
/// out of the tensor, the padding dropped in place.
fn tensor_to_image(t: &Tensor, w: usize, h: usize) -> candle_core::Result<Image> {
    let (_, _, ph, pw) = t.dims4()?;
    let mut planes = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if (pw, ph) != (w, h) {
        for c in 0..3 {
            for y in 0..h {
                let src = (c * ph + y) * pw;
                planes.copy_within(src..src + w, (c * h + y) * w);
            }
        }
        planes.truncate(3 * w * h);
    }
    Ok(Image { width: w, height: h, planes })
}

const _: () = {
    const fn send<T: Send>() {}
    send::<DpirEngine>();
};
