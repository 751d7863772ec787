//! The DPIR engine behind the element: a model directory (or the embedded dpir-nano) turned
//! into restored frames, with the clip cache deciding what is computed once per clip.
//!
//! Per frame: LQ → bicubic upsample to the output size → pad to a multiple of 16 → local prompt
//! → VAE encode → Euler sampling (latent tiles if large) → decode → colour fix → crop.
//! Per clip (see [`crate::cache::ClipCache`]): text embedding, global visual prompt, noise.
//! Optionally (`warm_start`), a clip's frames after the first start sampling from the previous
//! frame's result instead of from noise.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::cache::{CacheStats, ClipCache};
use crate::engine::{EngineError, EngineSettings, FrameContext, Image, RestoreEngine, StreamInfo};
use crate::model::autoencoder::{Autoencoder, LatentDraw};
use crate::model::clip::{ClipVisionConfig, ClipVisionModel};
use crate::model::color_fix::{self, ColorFix};
use crate::model::loader::{AutoencoderSpec, LoadError, ModelFiles, ModelSource};
use crate::model::pipeline::{DpirPipeline, SamplerOptions};
use crate::model::preprocess::{RgbImage, resize_bicubic};
use crate::model::prompt::{ImagePromptEncoder, PromptConfig, TilingMode, assemble};
use crate::model::scheduler::FlowMatchEulerConfig;
use crate::model::t5::{T5Config, T5EncoderModel, T5Tokenizer, TextEncoder};
use crate::model::taesd::{Taesd, TaesdConfig};
use crate::model::tiling::LatentTiling;
use crate::model::transformer::{DpirTransformer, DpirTransformerConfig};
use crate::model::vae::{AutoencoderKl, AutoencoderKlConfig, TileConfig};

/// A loaded DPIR model: every component on one device in one dtype.
pub struct DpirModel {
    pub name: String,
    pub files: ModelFiles,
    pub transformer: DpirTransformer,
    pub transformer_config: DpirTransformerConfig,
    pub autoencoder: Box<dyn Autoencoder>,
    pub image: ImagePromptEncoder,
    /// T5 (SD3: 4.7 B parameters, ~9 GB in bf16). With `low-memory` it is dropped after each
    /// new prompt's embedding and loaded again for the next one: prompts are computed once per
    /// clip, so this costs a reload per prompt change, not per frame.
    text: Mutex<Option<TextEncoder>>,
    has_text: bool,
    pub device: Device,
    pub dtype: DType,
}

fn model_err(what: &str, files: &ModelFiles, e: impl std::fmt::Display) -> LoadError {
    LoadError::Invalid(format!("{} ({}): {e}", what, files.source.describe()))
}

impl DpirModel {
    /// Build every component from validated files.
    pub fn load(source: ModelSource, device: &Device, dtype: DType, tiling: TilingMode) -> Result<Self, LoadError> {
        let files = ModelFiles::open(source)?;
        let m = files.manifest.clone();

        let tcfg_json = files.config_json(&m.transformer.config)?;
        let transformer_config: DpirTransformerConfig = serde_json::from_value(tcfg_json)
            .map_err(|e| LoadError::Invalid(format!("{}: {e}", files.path(&m.transformer.config))))?;
        let vb = files.var_builder(&m.transformer.weights, dtype, device)?;
        let transformer = DpirTransformer::new(&transformer_config, vb)
            .map_err(|e| model_err(&format!("transformer {}", m.transformer.weights.join(", ")), &files, e))?;

        let autoencoder: Box<dyn Autoencoder> = match &m.vae {
            AutoencoderSpec::AutoencoderKl { config, weights } => {
                let cfg: AutoencoderKlConfig = serde_json::from_value(files.config_json(config)?)
                    .map_err(|e| LoadError::Invalid(format!("{}: {e}", files.path(config))))?;
                let vb = files.var_builder(weights, dtype, device)?;
                Box::new(
                    AutoencoderKl::new(&cfg, vb)
                        .map_err(|e| model_err(&format!("vae {}", weights.join(", ")), &files, e))?
                        .with_tiling(Some(TileConfig::default())),
                )
            }
            AutoencoderSpec::Taesd { encoder, decoder } => {
                let enc = files.var_builder(std::slice::from_ref(encoder), dtype, device)?;
                let dec = files.var_builder(std::slice::from_ref(decoder), dtype, device)?;
                Box::new(
                    Taesd::new(&TaesdConfig::default(), Some(enc), Some(dec))
                        .map_err(|e| model_err(&format!("taesd {encoder}, {decoder}"), &files, e))?
                        .with_tiling(Some(TileConfig::default())),
                )
            }
        };

        let tower = |c: &crate::model::loader::Component, name: &str| -> Result<ClipVisionModel, LoadError> {
            let cfg = ClipVisionConfig::from_json(&files.config_json(&c.config)?)
                .map_err(|e| LoadError::Invalid(format!("{}: {e}", files.path(&c.config))))?;
            let vb = files.var_builder(&c.weights, dtype, device)?;
            ClipVisionModel::new(&cfg, vb)
                .map_err(|e| model_err(&format!("{name} {}", c.weights.join(", ")), &files, e))
        };
        let one = tower(&m.image_encoder_one, "image_encoder_one")?;
        let two = tower(&m.image_encoder_two, "image_encoder_two")?;
        let prompt_cfg = PromptConfig {
            tile_size: m.prompt.tile_size,
            tile_stride: m.prompt.tile_stride,
            clip_tokens: m.prompt.clip_tokens,
            tiling,
        };
        let image =
            ImagePromptEncoder::new(one, two, prompt_cfg).map_err(|e| model_err("image encoders", &files, e))?;
        if image.pooled_width() != transformer_config.pooled_projection_dim {
            return Err(LoadError::Invalid(format!(
                "image encoders give a pooled vector of {} (encoder one hidden + encoder two projection) but the \
                 transformer's pooled_projection_dim is {}: the components do not belong together",
                image.pooled_width(),
                transformer_config.pooled_projection_dim
            )));
        }

        let text = match &m.text_encoder {
            None => None,
            Some(_) => Some(load_text_encoder(&files, dtype, device)?),
        };
        Ok(Self {
            name: m.name.clone().unwrap_or_else(|| files.source.describe()),
            files,
            transformer,
            transformer_config,
            autoencoder,
            image,
            has_text: text.is_some(),
            text: Mutex::new(text),
            device: device.clone(),
            dtype,
        })
    }

    /// The text part of the conditioning: T5 tokens, or zeros when the model has no T5
    /// (DPIR's unconditional text input).
    pub fn text_embedding(&self, prompt: &str, low_memory: bool) -> Result<Tensor> {
        if self.has_text {
            let mut slot = self.text.lock().unwrap();
            if slot.is_none() {
                *slot = Some(load_text_encoder(&self.files, self.dtype, &self.device)?);
            }
            let t = slot.as_ref().unwrap().embed(prompt);
            if low_memory {
                *slot = None;
            }
            return t;
        }
        // No text encoder: the prompt cannot be used.
        Ok(Tensor::zeros(
            (1, self.files.manifest.prompt.text_tokens, self.transformer_config.joint_attention_dim),
            self.dtype,
            &self.device,
        )?)
    }

    /// Whether the T5 encoder is in memory now (it is not after a `low-memory` embedding).
    pub fn text_encoder_loaded(&self) -> bool {
        self.text.lock().unwrap().is_some()
    }
}

fn load_text_encoder(files: &ModelFiles, dtype: DType, device: &Device) -> Result<TextEncoder, LoadError> {
    let t =
        files.manifest.text_encoder.as_ref().ok_or_else(|| LoadError::Invalid("model has no text encoder".into()))?;
    let cfg = T5Config::from_json(&files.config_json(&t.config)?)
        .map_err(|e| LoadError::Invalid(format!("{}: {e}", files.path(&t.config))))?;
    let vb = files.var_builder(&t.weights, dtype, device)?;
    let model = T5EncoderModel::new(&cfg, vb)
        .map_err(|e| model_err(&format!("text_encoder {}", t.weights.join(", ")), files, e))?;
    let tok_path = match &files.source {
        ModelSource::Dir(d) => d.join(&t.tokenizer),
        ModelSource::Embedded(_) => return Err(LoadError::Invalid("embedded models cannot carry a tokenizer".into())),
    };
    let tokenizer = T5Tokenizer::from_file(&tok_path, t.max_length)
        .map_err(|e| LoadError::Invalid(format!("{}: {e}", tok_path.display())))?;
    Ok(TextEncoder::new(model, tokenizer))
}

/// Models shared between elements of one process: same directory, device, dtype → one copy.
static MODELS: LazyLock<Mutex<HashMap<String, Weak<DpirModel>>>> = LazyLock::new(Default::default);

fn parse_device(name: &str) -> Result<Device, EngineError> {
    let name = name.trim().to_ascii_lowercase();
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" | "" => Ok(cuda_device(0).unwrap_or(Device::Cpu)),
        s if s.starts_with("cuda") => {
            let idx = s.strip_prefix("cuda").unwrap().trim_start_matches(':');
            let idx: usize = if idx.is_empty() {
                0
            } else {
                idx.parse().map_err(|_| EngineError::Settings(format!("device `{name}`: expected cuda:N")))?
            };
            cuda_device(idx).map_err(EngineError::Settings)
        }
        _ => Err(EngineError::Settings(format!("unknown device `{name}`: use cpu, cuda:N or auto"))),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(idx: usize) -> Result<Device, String> {
    Device::new_cuda(idx).map_err(|e| format!("CUDA device {idx} is not usable: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_idx: usize) -> Result<Device, String> {
    Err("this build of gst-dpir has no CUDA support: rebuild with `--features cuda`, or use device=cpu".into())
}

fn parse_dtype(name: &str, device: &Device) -> Result<DType, EngineError> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" if device.is_cpu() => Err(EngineError::Settings(
            "precision=bf16 is not supported on the CPU (candle's CPU matmul has no bf16): use f32 or f16".into(),
        )),
        "bf16" => Ok(DType::BF16),
        other => Err(EngineError::Settings(format!("unknown precision `{other}`: use f32, f16 or bf16"))),
    }
}

/// Load (or reuse) the model the settings name.
pub fn shared_model(settings: &EngineSettings) -> Result<Arc<DpirModel>, EngineError> {
    let device = parse_device(&settings.device)?;
    let dtype = parse_dtype(&settings.precision, &device)?;
    let tiling = match settings.tiling.as_str() {
        "reference" => TilingMode::Reference,
        "corrected" => TilingMode::Corrected,
        other => return Err(EngineError::Settings(format!("unknown tiling `{other}`"))),
    };
    let source = match &settings.model {
        Some(dir) => ModelSource::Dir(dir.clone()),
        None => ModelSource::embedded().ok_or_else(|| {
            EngineError::Model(
                "this build has no embedded model (weights/dpir-nano was missing at build time): set `model` \
                 to a model directory"
                    .into(),
            )
        })?,
    };
    let key = format!("{}|{:?}|{:?}|{:?}", source.describe(), device.location(), dtype, tiling);
    let mut models = MODELS.lock().unwrap();
    if let Some(m) = models.get(&key).and_then(Weak::upgrade) {
        return Ok(m);
    }
    let model =
        Arc::new(DpirModel::load(source, &device, dtype, tiling).map_err(|e| EngineError::Model(e.to_string()))?);
    models.insert(key, Arc::downgrade(&model));
    Ok(model)
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

pub struct DpirEngine {
    model: Arc<DpirModel>,
    settings: EngineSettings,
    info: Option<StreamInfo>,
    cache: ClipCache,
    color_fix: ColorFix,
    sampler: SamplerOptions,
    last_time: Option<Duration>,
    /// Stage timings of the last frame, for the debug log and benchmarks.
    pub last_timings: FrameTimings,
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
}

impl std::fmt::Display for FrameTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "upsample {:.1} ms, prompts {:.1} ms, encode {:.1} ms, sample {:.1} ms, decode {:.1} ms, colour fix {:.1} ms",
            ms(self.upsample),
            ms(self.prompts),
            ms(self.encode),
            ms(self.sample),
            ms(self.decode),
            ms(self.color_fix)
        )
    }
}

impl DpirEngine {
    pub fn load(settings: &EngineSettings) -> Result<Self, EngineError> {
        let model = shared_model(settings)?;
        let default_steps = model.files.manifest.sampler.default_steps.unwrap_or(28);
        let color_fix: ColorFix = settings.color_fix.parse().map_err(EngineError::Settings)?;
        if !matches!(settings.lq_latent.as_str(), "sample" | "mode") {
            return Err(EngineError::Settings(format!("unknown lq-latent `{}`", settings.lq_latent)));
        }
        if !matches!(settings.noise.as_str(), "per-clip" | "per-frame") {
            return Err(EngineError::Settings(format!("unknown noise `{}`", settings.noise)));
        }
        if !(0.0..=1.0).contains(&settings.warm_start) {
            return Err(EngineError::Settings(format!(
                "warm-start {} is out of range: 0 (off) or a strength in (0, 1]",
                settings.warm_start
            )));
        }
        // The transformer cannot take a latent larger than its position table: tiles never exceed it.
        let tcfg = &model.transformer_config;
        let max_tile = tcfg.pos_embed_max_size * tcfg.patch_size;
        let tile = (settings.tile_size as usize).min(max_tile);
        let overlap = (settings.tile_overlap as usize).min(tile / 4);
        // Small tiles go through the transformer together (one official 1024-px tile's worth of
        // tokens, 4096, at most): a 64-token tile alone leaves the matrix products tiny. A tile
        // of DPIR's own size (128 latents = 4096 tokens) still goes alone, as memory wants.
        let tokens_per_tile = (tile / tcfg.patch_size.max(1)).pow(2).max(1);
        let batch = (4096 / tokens_per_tile).clamp(1, 16);
        let tiling = LatentTiling { tile, overlap, batch };
        tiling.validate().map_err(|e| EngineError::Settings(format!("tile-size/tile-overlap: {e}")))?;
        Ok(Self {
            model,
            settings: settings.clone(),
            info: None,
            cache: ClipCache::default(),
            color_fix,
            sampler: SamplerOptions {
                steps: match settings.steps {
                    0 => default_steps as usize,
                    n => n as usize,
                },
                guidance_scale: 1.0,
                tiling: Some(tiling),
            },
            last_time: None,
            last_timings: FrameTimings::default(),
        })
    }

    pub fn model(&self) -> &Arc<DpirModel> {
        &self.model
    }

    /// How often each encoder ran and how long it took (the clip cache's savings).
    pub fn stats(&self) -> CacheStats {
        self.cache.stats
    }

    fn scheduler(&self) -> FlowMatchEulerConfig {
        let s = &self.model.files.manifest.sampler;
        FlowMatchEulerConfig { num_train_timesteps: s.num_train_timesteps, shift: s.shift }
    }

    /// Restore one RGB8 frame already at the output size. Public for tools that drive the model
    /// without GStreamer (benchmarks, evaluation).
    pub fn restore_rgb8(&mut self, up: &RgbImage, ctx: &FrameContext) -> Result<Image> {
        let model = self.model.clone();
        let m = 2 * model.autoencoder.downscale();
        let (ow, oh) = (up.width, up.height);
        let (pw, ph) = (ow.div_ceil(m) * m, oh.div_ceil(m) * m);
        let padded = pad_edge(up, pw, ph);
        let dev = &model.device;
        let mut t = Instant::now();
        let mut lap = |slot: &mut Duration| {
            *slot = t.elapsed();
            t = Instant::now();
        };
        let mut times = FrameTimings::default();

        // Per clip: global prompt from the key frame, noise field; per prompt string: text.
        // Without reuse (`reuse_prompts = false`, for measurements) both are recomputed from
        // every frame.
        let t_frame = Instant::now();
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
        let local = model.image.local_prompt(up).context("local visual prompt")?;
        self.cache.stats.local_encodes += 1;
        self.cache.stats.local_time += t0.elapsed();
        if self.cache.global.is_none() || !reuse {
            let t0 = Instant::now();
            self.cache.global = Some(model.image.global_prompt(up).context("global visual prompt")?);
            self.cache.stats.global_encodes += 1;
            self.cache.stats.global_time += t0.elapsed();
        }
        let embeds = assemble(&local, self.cache.global.as_ref().unwrap(), &text, model.image.config.clip_tokens)?;
        lap(&mut times.prompts);

        let lq = rgb8_to_tensor(&padded, dev)?; // [0,1]
        let lq_pm = ((&lq * 2.0)? - 1.0)?.to_dtype(model.dtype)?;
        let pipe = DpirPipeline::new(&model.transformer, model.autoencoder.as_ref(), self.scheduler());
        let shape = pipe.latent_shape(pw, ph)?;
        let seed = self.settings.seed;
        let draw = if self.settings.lq_latent == "mode" {
            LatentDraw::Mode
        } else {
            LatentDraw::Sample(seeded_noise(shape, mix(seed, ctx.clip_index, pos.wrapping_add(1 << 40)), dev)?)
        };
        let z_lq = pipe.encode_lq(&lq_pm, &draw)?;
        lap(&mut times.encode);
        let noise = if self.settings.noise == "per-frame" {
            seeded_noise(shape, mix(seed, ctx.clip_index, pos + 1), dev)?
        } else {
            match &self.cache.noise {
                Some(n) if n.dims4()? == shape => n.clone(),
                _ => {
                    let n = seeded_noise(shape, mix(seed, ctx.clip_index, 0), dev)?;
                    self.cache.noise = Some(n.clone());
                    n
                }
            }
        };
        // Warm start: from the clip's second frame on, start from the previous frame's final
        // latent re-noised to the σ of step k and run steps k.. only (the first frame of a clip
        // always starts from pure noise, so clips stay independent).
        let steps = self.sampler.steps;
        let warm = self.settings.warm_start;
        let (start_step, init) = match &self.cache.previous {
            Some(prev) if warm > 0.0 && prev.dims4()? == shape => {
                let run = ((warm * steps as f64).round() as usize).clamp(1, steps);
                let k = steps - run;
                if k == 0 {
                    (0, noise)
                } else {
                    let sigma = pipe.start_sigma(steps, k) as f64;
                    self.cache.stats.warm_starts += 1;
                    (k, ((&noise * sigma)? + (prev * (1.0 - sigma))?)?)
                }
            }
            _ => (0, noise),
        };
        let cancel = ctx.cancel.clone();
        let mut on_step = |_: &crate::model::pipeline::StepInfo| -> candle_core::Result<()> {
            if cancel.is_cancelled() { Err(candle_core::Error::Msg("cancelled".into())) } else { Ok(()) }
        };
        let latents = pipe.denoise_from(
            &z_lq,
            &init,
            &embeds.prompt_embeds,
            &embeds.pooled,
            &self.sampler,
            start_step,
            &mut on_step,
        )?;
        if warm > 0.0 {
            self.cache.previous = Some(latents.clone());
        }
        lap(&mut times.sample);
        let decoded = pipe.decode(&latents)?;
        if model.dtype == DType::F16 && !all_finite(&decoded)? {
            return Err(NonFiniteF16.into()); // `restore` falls back to a wider dtype
        }
        lap(&mut times.decode);
        let out01 = ((decoded + 1.0)? / 2.0)?;
        let fixed = color_fix::apply(self.color_fix, &out01, &lq)?.clamp(0f32, 1f32)?;
        let fixed = fixed.narrow(2, 0, oh)?.narrow(3, 0, ow)?;
        let out = tensor_to_image(&fixed)?;
        lap(&mut times.color_fix);
        times.upsample = self.last_timings.upsample;
        self.last_timings = times;
        self.cache.stats.frames += 1;
        self.cache.stats.frame_time += t_frame.elapsed();
        Ok(out)
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
        let t0 = Instant::now();
        let info = self.info.clone().ok_or_else(|| EngineError::Runtime("restore before configure".into()))?;
        let lq = image_to_rgb8(frame);
        self.last_timings.upsample = Duration::ZERO;
        let up = if info.scale > 1 {
            resize_bicubic(&lq, info.out_width(), info.out_height())
                .map_err(|e| EngineError::Runtime(format!("{e:#}")))?
        } else {
            lq
        };
        self.last_timings.upsample = t0.elapsed();
        let out = match self.restore_rgb8(&up, ctx) {
            Err(e) if e.is::<NonFiniteF16>() => {
                self.fall_back_from_f16()?;
                self.restore_rgb8(&up, ctx) // the same frame again, in the wider dtype
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

    fn latency(&self) -> Option<Duration> {
        self.last_time
    }

    fn timings(&self) -> Option<String> {
        Some(self.last_timings.to_string())
    }

    fn describe(&self) -> String {
        format!(
            "{} on {:?} ({:?}), {} steps, colour fix {}",
            self.model.name,
            self.model.device.location(),
            self.model.dtype,
            self.sampler.steps,
            self.color_fix
        )
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

impl DpirEngine {
    /// After an f16 overflow: warn, and go on in bf16 (CUDA) or f32 (CPU, which has no bf16
    /// matmul) for the rest of the stream. The clip cache holds f16 tensors: it starts afresh
    /// (its statistics kept).
    fn fall_back_from_f16(&mut self) -> Result<(), EngineError> {
        let to = if self.model.device.is_cpu() { "f32" } else { "bf16" };
        eprintln!(
            "gst-dpir WARNING: precision=f16 overflowed (inf/NaN in a frame) on {:?}; falling back to \
             precision={to} for the rest of the stream and redoing the frame",
            self.model.device.location()
        );
        let mut settings = self.settings.clone();
        settings.precision = to.into();
        self.model = shared_model(&settings)?;
        self.settings = settings;
        let stats = self.cache.stats;
        self.cache = ClipCache::default();
        self.cache.stats = stats;
        Ok(())
    }
}

/// Frames are f32 [0,1]; the CLIP pre-processing and bicubic resize work on 8-bit like PIL.
pub fn image_to_rgb8(img: &Image) -> RgbImage {
    let data = img.data.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    RgbImage { width: img.width, height: img.height, data }
}

/// Replicate the last row/column up to `w × h` (the model needs multiples of 16).
fn pad_edge(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    if img.width == w && img.height == h {
        return img.clone();
    }
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        let sy = y.min(img.height - 1);
        for x in 0..w {
            let sx = x.min(img.width - 1);
            let s = (sy * img.width + sx) * 3;
            data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage { width: w, height: h, data }
}

/// RGB8 → NCHW f32 in [0, 1] (torchvision `ToTensor`).
fn rgb8_to_tensor(img: &RgbImage, dev: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(img.data.clone(), (img.height, img.width, 3), dev)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(DType::F32)?
        / 255.0
}

fn tensor_to_image(t: &Tensor) -> Result<Image> {
    let t = t.squeeze(0)?.permute((1, 2, 0))?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (h, w, _) = t.dims3()?;
    let data = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(Image { width: w, height: h, data })
}

const _: () = {
    const fn send<T: Send>() {}
    const fn send_sync<T: Send + Sync>() {}
    send::<DpirEngine>();
    send_sync::<DpirModel>();
};
