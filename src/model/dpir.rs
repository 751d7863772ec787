//! A whole DPIR model built from a model directory (or the embedded dpir-nano): transformer,
//! autoencoder, the two CLIP vision towers, the optional T5 text encoder and fusion stage, on
//! one device with one storage precision; and its memory plan.
//!
//! **Memory.** Every weight is held once, in the precision asked for ([`Precision`]), read from
//! its file straight into place ([`super::loader`]). Before anything is built, the weights'
//! size (from the files' headers) is checked against what this process may use
//! ([`super::memory::budget`]): when everything does not fit but the model without T5 does,
//! T5 is loaded first, embeds the prompt and is released before the rest is loaded (and again for
//! each new prompt); when even that does not fit, loading stops with an error that gives the
//! figures and the settings that would fit. [`DpirModel::activation_estimate`] gives the peak
//! of each stage of a frame, for the same check once the frame size is known.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

use super::autoencoder::Autoencoder;
use super::clip::{ClipVisionConfig, ClipVisionModel};
use super::fusion::{Fusion, FusionConfig};
use super::layers;
use super::loader::{AutoencoderSpec, Component, LoadError, ModelFiles, ModelSource};
use super::memory::{self, gib};
use super::prompt::{ImagePromptEncoder, PromptConfig, TilingMode, global_tiles};
use super::scheduler::FlowMatchEulerConfig;
use super::t5::{T5Config, T5Encoder, T5Tokenizer, TextEncoder};
use super::taesd::{Taesd, TaesdConfig};
use super::tiling::{LatentTiling, TileConfig};
use super::transformer::{DpirTransformer, DpirTransformerConfig};
use super::vae::{AutoencoderKl, AutoencoderKlConfig};

/// Where the model runs: `auto`, `cpu`, `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA GPU if this build has CUDA and one is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let name = s.trim().to_ascii_lowercase();
        match name.as_str() {
            "auto" | "" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            s if s.starts_with("cuda") => {
                let idx = s.strip_prefix("cuda").unwrap().trim_start_matches(':');
                if idx.is_empty() {
                    return Ok(Self::Cuda(0));
                }
                idx.parse().map(Self::Cuda).map_err(|_| format!("device `{name}`: expected cuda:N"))
            }
            _ => Err(format!("unknown device `{name}`: use cpu, cuda:N or auto")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    pub fn device(self) -> std::result::Result<Device, String> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(cuda_device(0).unwrap_or(Device::Cpu)),
            Self::Cuda(i) => cuda_device(i),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(idx: usize) -> std::result::Result<Device, String> {
    Device::new_cuda(idx).map_err(|e| format!("CUDA device {idx} is not usable: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_idx: usize) -> std::result::Result<Device, String> {
    Err("this build of gst-dpir has no CUDA support: rebuild with `--features cuda`, or use device=cpu".into())
}

/// The precision the weights are held in. On the CPU activations are computed in f32 whatever
/// it is (a half weight is converted where a layer uses it), so f16 and bf16 halve the memory of
/// the weights and change results only by the weights' rounding; on a GPU the computation runs in
/// it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}`: use f32, f16 or bf16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl Precision {
    /// The storage dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Bytes of each component's weights at one precision (from the files' headers: only the tensors
/// the model loads, e.g. not the text tower of a full CLIP checkpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightBytes {
    pub transformer: u64,
    pub autoencoder: u64,
    pub image_encoders: u64,
    pub text_encoder: u64,
    pub fusion: u64,
}

impl WeightBytes {
    pub fn of(files: &ModelFiles, dtype: DType) -> Self {
        let m = &files.manifest;
        let size = dtype.size_in_bytes() as u64;
        let count = |weights: &[String], keep: &dyn Fn(&str) -> bool| -> u64 {
            files
                .headers(weights)
                .flat_map(|h| h.tensors())
                .filter(|(name, _)| keep(name))
                .map(|(_, info)| info.shape.iter().product::<usize>() as u64 * size)
                .sum()
        };
        let all = |_: &str| true;
        let vision = |n: &str| n.starts_with("vision_model.") || n.starts_with("visual_projection.");
        let autoencoder = match &m.vae {
            AutoencoderSpec::AutoencoderKl { weights, .. } => count(weights, &all),
            AutoencoderSpec::Taesd { encoder, decoder, .. } => {
                count(std::slice::from_ref(encoder), &all) + count(std::slice::from_ref(decoder), &all)
            }
        };
        let text_encoder = m.text_encoder.as_ref().map_or(0, |t| {
            let has_shared = files.headers(&t.weights).any(|h| h.tensors().any(|(n, _)| n == "shared.weight"));
            let keep = |n: &str| {
                !(n.starts_with("decoder.")
                    || n.starts_with("lm_head.")
                    || (has_shared && n == "encoder.embed_tokens.weight"))
            };
            count(&t.weights, &keep)
        });
        Self {
            transformer: count(&m.transformer.weights, &all),
            autoencoder,
            image_encoders: count(&m.image_encoder_one.weights, &vision) + count(&m.image_encoder_two.weights, &vision),
            text_encoder,
            fusion: m.fusion.as_ref().map_or(0, |f| count(&f.weights, &all)),
        }
    }

    pub fn total(&self) -> u64 {
        self.without_text() + self.text_encoder
    }

    pub fn without_text(&self) -> u64 {
        self.transformer + self.autoencoder + self.image_encoders + self.fusion
    }
}

impl fmt::Display for WeightBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "transformer {}, T5 {}, image encoders {}, autoencoder {}",
            gib(self.transformer),
            gib(self.text_encoder),
            gib(self.image_encoders),
            gib(self.autoencoder + self.fusion)
        )
    }
}

/// Memory kept free beyond the weights for the runtime (libraries, threads, allocator slack)
/// and the smallest frame, when nothing is known of the frame yet.
pub const RUNTIME_RESERVE: u64 = 768 << 20;

/// What the loader decided, and what it needs to estimate a frame's memory.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub weights: WeightBytes,
    /// T5 stays loaded between prompts (false: loaded for each new prompt, then released).
    pub text_resident: bool,
    /// The budget checked against, if known.
    pub budget: Option<memory::Budget>,
    shapes: Shapes,
    /// Activations are f32 (4 bytes) on the CPU; the weights' storage dtype.
    compute_bytes: u64,
    storage: DType,
}

impl MemoryPlan {
    /// T5 is released after each prompt because the budget says so (not because of `low-memory`).
    pub fn text_released_to_fit(&self, low_memory: bool) -> bool {
        self.weights.text_encoder > 0 && !self.text_resident && !low_memory
    }
}

/// How to load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    pub tiling: TilingMode,
    /// Release T5 after each new prompt (`low-memory`), whatever the budget.
    pub low_memory: bool,
    /// Prompts to embed while T5 is loaded (the stream's first prompt), so that a model whose T5
    /// is released does not load it again for the first frame.
    pub prompts: Vec<String>,
}

/// The sizes the activation estimate needs, read from the components' configs (before any
/// weight is loaded).
#[derive(Debug, Clone)]
pub struct Shapes {
    /// Autoencoder level widths, full resolution first: encoder and decoder.
    enc_widths: Vec<usize>,
    dec_widths: Vec<usize>,
    clip: [ClipVisionConfig; 2],
    /// T5's config and token count.
    t5: Option<(T5Config, usize)>,
    fusion: Option<FusionConfig>,
    /// Context tokens of the transformer (CLIP + text).
    context_tokens: usize,
    inner: usize,
    patch: usize,
    prompt: PromptConfig,
    /// The model's own latent tile (`sampler.tile_size`, else DPIR's 128) and autoencoder tiles.
    tile: usize,
    vae_tiles: TileConfig,
}

impl Shapes {
    fn read(files: &ModelFiles, tiling: TilingMode) -> std::result::Result<Self, LoadError> {
        let m = &files.manifest;
        let tr: DpirTransformerConfig = files.config(&m.transformer.config)?;
        let (enc_widths, dec_widths, vae_tiles) = match &m.vae {
            AutoencoderSpec::AutoencoderKl { config, tiling, .. } => {
                let cfg: AutoencoderKlConfig = files.config(config)?;
                let dec = cfg.block_out_channels.iter().rev().copied().collect();
                (cfg.block_out_channels, dec, tiling.unwrap_or_default())
            }
            AutoencoderSpec::Taesd { tiling, .. } => {
                let cfg = TaesdConfig::default();
                (cfg.encoder_block_out_channels, cfg.decoder_block_out_channels, tiling.unwrap_or_default())
            }
        };
        let clip = |c: &Component| {
            ClipVisionConfig::from_json(&files.config_json(&c.config)?)
                .map_err(|e| LoadError::Invalid(format!("{}: {e}", files.path(&c.config))))
        };
        let t5 = match &m.text_encoder {
            None => None,
            Some(t) => Some((files.config::<T5Config>(&t.config)?, t.max_length)),
        };
        let fusion = match &m.fusion {
            None => None,
            Some(c) => Some(files.config::<FusionConfig>(&c.config)?),
        };
        let text_tokens = t5.as_ref().map_or(m.prompt.text_tokens, |(_, l)| *l);
        Ok(Self {
            enc_widths,
            dec_widths,
            clip: [clip(&m.image_encoder_one)?, clip(&m.image_encoder_two)?],
            t5,
            fusion,
            context_tokens: m.prompt.clip_tokens + text_tokens,
            inner: tr.inner_dim(),
            patch: tr.patch_size,
            prompt: PromptConfig {
                tile_size: m.prompt.tile_size,
                tile_stride: m.prompt.tile_stride,
                clip_tokens: m.prompt.clip_tokens,
                tiling,
            },
            tile: m.sampler.tile_size.unwrap_or(128).min(tr.pos_embed_max_size * tr.patch_size),
            vae_tiles,
        })
    }
}

/// The text encoder and the prompts it embedded.
#[derive(Default)]
struct TextState {
    encoder: Option<TextEncoder>,
    /// Embeddings made while loading (the first prompt), so a released T5 is not loaded again
    /// for them.
    embedded: HashMap<String, Tensor>,
}

/// A loaded DPIR model.
pub struct DpirModel {
    pub name: String,
    pub files: ModelFiles,
    pub transformer: DpirTransformer,
    pub transformer_config: DpirTransformerConfig,
    pub autoencoder: Box<dyn Autoencoder>,
    /// The autoencoder's tiles for large frames (`vae.tiling` in model.json, else 1024-px cores).
    pub autoencoder_tiles: TileConfig,
    pub image: ImagePromptEncoder,
    /// The optional full-resolution stage after the colour fix (`fusion` in model.json).
    pub fusion: Option<Fusion>,
    text: Mutex<TextState>,
    has_text: bool,
    pub device: Device,
    /// The weights' storage dtype.
    pub dtype: DType,
    pub plan: MemoryPlan,
}

fn model_err(what: &str, files: &ModelFiles, e: impl fmt::Display) -> LoadError {
    LoadError::Invalid(format!("{} ({}): {e}", what, files.source.describe()))
}

impl DpirModel {
    /// Check the files and the memory, then build every component.
    pub fn load(
        source: ModelSource,
        device: &Device,
        precision: Precision,
        opts: &LoadOptions,
    ) -> std::result::Result<Self, LoadError> {
        let files = ModelFiles::open(source)?;
        let dtype = precision.dtype();
        let plan = plan_memory(&files, device, precision, opts)?;
        let m = files.manifest.clone();

        // T5 first when it is not kept: its memory is free again before the rest is loaded.
        let mut text = TextState::default();
        if m.text_encoder.is_some() && !plan.text_resident {
            let encoder = load_text_encoder(&files, dtype, device)?;
            for p in &opts.prompts {
                let e = encoder.embed(p).map_err(|e| model_err("text_encoder", &files, e))?;
                text.embedded.insert(p.clone(), e);
            }
        }

        let transformer_config: DpirTransformerConfig = files.config(&m.transformer.config)?;
        let vb = files.var_builder(&m.transformer.weights, dtype, device)?;
        let transformer = DpirTransformer::new(&transformer_config, vb)
            .map_err(|e| model_err(&format!("transformer {}", m.transformer.weights.join(", ")), &files, e))?;

        let autoencoder: Box<dyn Autoencoder> = match &m.vae {
            AutoencoderSpec::AutoencoderKl { config, weights, .. } => {
                let cfg: AutoencoderKlConfig = files.config(config)?;
                let vb = files.var_builder(weights, dtype, device)?;
                Box::new(
                    AutoencoderKl::new(&cfg, vb)
                        .map_err(|e| model_err(&format!("vae {}", weights.join(", ")), &files, e))?,
                )
            }
            AutoencoderSpec::Taesd { encoder, decoder, .. } => {
                let enc = files.var_builder(std::slice::from_ref(encoder), dtype, device)?;
                let dec = files.var_builder(std::slice::from_ref(decoder), dtype, device)?;
                Box::new(
                    Taesd::new(&TaesdConfig::default(), Some(enc), Some(dec))
                        .map_err(|e| model_err(&format!("taesd {encoder}, {decoder}"), &files, e))?,
                )
            }
        };
        let autoencoder_tiles = plan.shapes.vae_tiles;

        let tower = |c: &Component, cfg: &ClipVisionConfig, name: &str| {
            let vb = files.var_builder(&c.weights, dtype, device)?;
            ClipVisionModel::new(cfg, vb).map_err(|e| model_err(&format!("{name} {}", c.weights.join(", ")), &files, e))
        };
        let [one_cfg, two_cfg] = &plan.shapes.clip;
        let one = tower(&m.image_encoder_one, one_cfg, "image_encoder_one")?;
        let two = tower(&m.image_encoder_two, two_cfg, "image_encoder_two")?;
        let image = ImagePromptEncoder::new(one, two, plan.shapes.prompt.clone())
            .map_err(|e| model_err("image encoders", &files, e))?;
        if image.pooled_width() != transformer_config.pooled_projection_dim {
            return Err(LoadError::Invalid(format!(
                "image encoders give a pooled vector of {} (encoder one hidden + encoder two projection) but the \
                 transformer's pooled_projection_dim is {}: the components do not belong together",
                image.pooled_width(),
                transformer_config.pooled_projection_dim
            )));
        }

        let fusion = match (&m.fusion, &plan.shapes.fusion) {
            (Some(c), Some(cfg)) => {
                let vb = files.var_builder(&c.weights, dtype, device)?;
                Some(
                    Fusion::new(cfg, vb)
                        .map_err(|e| model_err(&format!("fusion {}", c.weights.join(", ")), &files, e))?,
                )
            }
            _ => None,
        };
        if m.text_encoder.is_some() && plan.text_resident {
            text.encoder = Some(load_text_encoder(&files, dtype, device)?);
        }
        Ok(Self {
            name: m.name.clone().unwrap_or_else(|| files.source.describe()),
            files,
            transformer,
            transformer_config,
            autoencoder,
            autoencoder_tiles,
            image,
            fusion,
            has_text: m.text_encoder.is_some(),
            text: Mutex::new(text),
            device: device.clone(),
            dtype,
            plan,
        })
    }

    /// The text part of the conditioning: T5 tokens, or zeros when the model has no T5
    /// (DPIR's unconditional text input). A released T5 is loaded again for a prompt it has not
    /// embedded, if the memory allows, and released after it.
    pub fn text_embedding(&self, prompt: &str, low_memory: bool) -> Result<Tensor> {
        if !self.has_text {
            return Tensor::zeros(
                (1, self.files.manifest.prompt.text_tokens, self.transformer_config.joint_attention_dim),
                self.transformer.dtype(),
                &self.device,
            );
        }
        let mut state = self.text.lock().unwrap();
        if let Some(e) = state.embedded.get(prompt) {
            return Ok(e.clone());
        }
        if state.encoder.is_none() {
            if self.device.is_cpu()
                && let Some(b) = memory::budget()
                && b.bytes < self.plan.weights.text_encoder + self.plan.text_activation_bytes()
            {
                candle_core::bail!(
                    "the prompt {prompt:?} needs the T5 text encoder loaded ({} at precision={}), but this process \
                     may use {b} more: keep the prompt unchanged within the stream, or free memory",
                    gib(self.plan.weights.text_encoder),
                    self.precision_name()
                );
            }
            state.encoder = Some(
                load_text_encoder(&self.files, self.dtype, &self.device)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
            );
        }
        let t = state.encoder.as_ref().unwrap().embed(prompt);
        if low_memory || !self.plan.text_resident {
            state.encoder = None;
        }
        t
    }

    /// Whether the T5 encoder is in memory now.
    pub fn text_encoder_loaded(&self) -> bool {
        self.text.lock().unwrap().encoder.is_some()
    }

    fn precision_name(&self) -> &'static str {
        match self.dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            _ => "f32",
        }
    }

    /// The sampler's schedule (`sampler` in model.json).
    pub fn scheduler(&self) -> FlowMatchEulerConfig {
        let s = &self.files.manifest.sampler;
        FlowMatchEulerConfig { num_train_timesteps: s.num_train_timesteps, shift: s.shift }
    }

    /// Largest latent tile the transformer takes (its position table).
    pub fn max_tile(&self) -> usize {
        self.transformer_config.pos_embed_max_size * self.transformer_config.patch_size
    }

    /// Peak bytes beyond the weights of each stage of one frame (see
    /// [`MemoryPlan::activation_estimate`]), with T5 as it is now (loaded or released).
    pub fn activation_estimate(
        &self,
        width: usize,
        height: usize,
        tiling: &LatentTiling,
        vae_tiles: &TileConfig,
    ) -> Vec<(&'static str, u64)> {
        self.plan.activation_estimate(width, height, tiling, vae_tiles, self.text_encoder_loaded())
    }
}

impl MemoryPlan {
    fn text_activation_bytes(&self) -> u64 {
        let Some((c, l)) = &self.shapes.t5 else { return 0 };
        let e = self.compute_bytes;
        let (l, d, f, inner, h) =
            (*l as u64, c.d_model as u64, c.d_ff as u64, (c.num_heads * c.d_kv) as u64, c.num_heads as u64);
        // hidden states, q/k/v/o, the gated feed-forward's three d_ff-wide tensors, the scores;
        // the largest weight converted to f32 for its call
        e * l * (4 * d + 4 * inner + 3 * f) + e * h * l * l * 3 + if self.storage == DType::F32 { 0 } else { 4 * d * f }
    }

    /// Peak bytes beyond the weights of each stage of one frame restored at `width × height`
    /// (the output size, padded to the model's multiple), with the sampler's latent tiles and the
    /// autoencoder's tiles; `text_loaded`: T5 is in memory (else a prompt change loads it). A
    /// conservative model of the live tensors of each stage (activations of the widest layer, the
    /// frame's own buffers, converted weights), in the compute dtype (f32 on the CPU);
    /// `benches/real_size.rs` compares it with measured peaks.
    pub fn activation_estimate(
        &self,
        width: usize,
        height: usize,
        tiling: &LatentTiling,
        vae_tiles: &TileConfig,
        text_loaded: bool,
    ) -> Vec<(&'static str, u64)> {
        let e = self.compute_bytes;
        let half = self.storage != DType::F32 && e == 4;
        let converted = |w: u64| if half { 4 * w } else { 0 };
        let (w, h) = (width as u64, height as u64);
        // The frame's own buffers: input, upsampled, padded, NCHW and [-1, 1] copies, the
        // decoded image, colour fix and fusion outputs.
        let frame = e * 3 * w * h * 8;
        let mut stages = Vec::new();
        if self.shapes.t5.is_some() && !text_loaded {
            // Not loaded: a new prompt loads it beside everything else.
            stages.push(("T5 encode", self.weights.text_encoder + self.text_activation_bytes()));
        } else if self.shapes.t5.is_some() {
            stages.push(("T5 encode", self.text_activation_bytes()));
        }
        let clip = |images: u64| -> u64 {
            self.shapes
                .clip
                .iter()
                .map(|c| {
                    let t = (c.num_patches() + 1) as u64;
                    let (hd, i, heads) =
                        (c.hidden_size as u64, c.intermediate_size as u64, c.num_attention_heads as u64);
                    images * e * (t * (6 * hd + 2 * i) + heads * t * t * 2 + 3 * 224 * 224) + converted(hd * i)
                })
                .max()
                .unwrap_or(0)
        };
        let tiles = global_tiles(width, height, &self.shapes.prompt).map(|t| t.len()).unwrap_or(1) as u64;
        stages.push(("global prompt", clip(tiles) + frame));
        stages.push(("local prompt", clip(1) + frame));
        // Autoencoder: one tile (core + context) at a time; per level, the widest block's input
        // (up to twice its width), norm output, and two convolution outputs.
        let ds = 1u64 << (self.shapes.enc_widths.len().saturating_sub(1));
        let side = |full: u64| full.min((vae_tiles.tile + 2 * vae_tiles.halo) as u64 * ds);
        let area = side(w) * side(h);
        let levels = |widths: &[usize], decoder: bool| -> u64 {
            let n = widths.len();
            (0..n)
                .map(|i| {
                    // encoder level i is at area / 4^i; decoder level i at area / 4^(n-1-i)
                    let shrink = if decoder { n - 1 - i } else { i };
                    let a = area >> (2 * shrink);
                    let c = widths[i] as u64;
                    let cin = if i == 0 { c } else { widths[i - 1] as u64 };
                    e * a * (2 * cin.max(c) + 3 * c)
                })
                .max()
                .unwrap_or(0)
        };
        let latent_px = (w / ds) * (h / ds);
        let latents = e * 16 * latent_px * 8;
        stages.push(("VAE encode", levels(&self.shapes.enc_widths, false) + e * 6 * area + frame + latents));
        // Transformer: per call, the hidden and context streams with their norms, q/k/v and the
        // feed-forward's 4×-wide hidden; the control features of every tile, kept for all steps.
        let (p, d) = (self.shapes.patch as u64, self.shapes.inner as u64);
        let (lw, lh) = (w / ds, h / ds);
        let (tw, th) = ((tiling.tile as u64).min(lw), (tiling.tile as u64).min(lh));
        let n_tiles = lw.div_ceil((tiling.tile - tiling.overlap).max(1) as u64).max(1)
            * lh.div_ceil((tiling.tile - tiling.overlap).max(1) as u64).max(1);
        let batch = (tiling.batch as u64).clamp(1, n_tiles);
        let tokens = (tw / p) * (th / p) + self.shapes.context_tokens as u64;
        let step =
            e * batch * tokens * d * 24 + e * n_tiles * d * (tw / p) * (th / p) + converted(4 * d * d) + (64 << 20);
        stages.push(("transformer step", step + frame + latents));
        stages.push(("VAE decode", levels(&self.shapes.dec_widths, true) + e * 6 * area + frame + latents));
        let fusion = self.shapes.fusion.map_or(0, |f| {
            let r = f.downscale as u64;
            let tile = (w / r).min(256 + 2 * f.num_layers as u64) * (h / r).min(256 + 2 * f.num_layers as u64);
            e * tile * (f.channels as u64 * 3 + 9 * r * r)
        });
        stages.push(("colour fix", e * 3 * w * h * 6 + fusion + frame));
        stages
    }

    /// The peak of a frame of one of the model's own tiles (1024 px for DPIR) with nothing
    /// known of the stream yet: what loading keeps free beside the weights.
    fn one_tile_peak(&self) -> u64 {
        let side = self.shapes.tile * (1 << self.shapes.enc_widths.len().saturating_sub(1));
        let tiling = LatentTiling { tile: self.shapes.tile, overlap: 0, batch: 1 };
        self.activation_estimate(side, side, &tiling, &self.shapes.vae_tiles, true)
            .iter()
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    }
}

/// Decide what stays resident, from the weights' size, a one-tile frame's peak and this
/// process's budget; refuse what cannot fit with the figures and the settings that would.
fn plan_memory(
    files: &ModelFiles,
    device: &Device,
    precision: Precision,
    opts: &LoadOptions,
) -> std::result::Result<MemoryPlan, LoadError> {
    let has_text = files.manifest.text_encoder.is_some();
    // On a GPU the weights live in its memory, which this check does not see.
    let budget = if device.is_cpu() { memory::budget() } else { None };
    let plan = |p: Precision, text_resident: bool, shapes: Shapes| MemoryPlan {
        weights: WeightBytes::of(files, p.dtype()),
        text_resident,
        budget: budget.clone(),
        shapes,
        compute_bytes: layers::compute_dtype(p.dtype(), device).size_in_bytes() as u64,
        storage: p.dtype(),
    };
    let shapes = Shapes::read(files, opts.tiling)?;
    let mut plan = plan(precision, has_text && !opts.low_memory, shapes.clone());
    let Some(b) = budget.clone() else { return Ok(plan) };
    // At precision `p`: (everything resident with room for a frame of one of the model's own
    // tiles, every weight at once with no frame in flight). The first decides whether T5 stays
    // between prompts; only the second refuses to load: a new prompt loads T5 beside the rest,
    // so even a released T5 must fit beside it (the frame is checked once its size is known).
    let fits = |p: &MemoryPlan| {
        let w = &p.weights;
        (w.total() + RUNTIME_RESERVE + p.one_tile_peak() <= b.bytes, w.total() + RUNTIME_RESERVE <= b.bytes)
    };
    let (all, least) = fits(&plan);
    if least {
        plan.text_resident = has_text && !opts.low_memory && all;
        return Ok(plan);
    }
    // What would fit instead.
    let mut ways = Vec::new();
    if precision == Precision::F32 {
        let half = MemoryPlan { text_resident: false, ..plan_with(&plan, Precision::F16, files, device) };
        match fits(&half) {
            (true, _) => ways.push(format!("precision=f16 or bf16 (weights {})", gib(half.weights.total()))),
            (false, true) => ways.push(format!(
                "precision=f16 or bf16 (weights {}{})",
                gib(half.weights.total()),
                if has_text { ", with T5 loaded only to embed a new prompt" } else { "" }
            )),
            _ => {}
        }
    }
    let way = if ways.is_empty() {
        "nothing fits: use a machine (or a GPU) with more memory, or raise the limit".to_string()
    } else {
        format!("set {}", ways.join(", or "))
    };
    let w = &plan.weights;
    Err(LoadError::Memory(format!(
        "{} holds {} of weights at precision={precision} ({w}); with {} to run, that does not fit in what this \
         process may use, {b}: {way} (on the CPU every precision computes in f32: f16 and bf16 only hold the \
         weights in half)",
        files.manifest.name.clone().unwrap_or_else(|| files.source.describe()),
        gib(w.total()),
        gib(RUNTIME_RESERVE),
    )))
}

/// `plan` at another precision (its weights and storage).
fn plan_with(plan: &MemoryPlan, p: Precision, files: &ModelFiles, device: &Device) -> MemoryPlan {
    MemoryPlan {
        weights: WeightBytes::of(files, p.dtype()),
        compute_bytes: layers::compute_dtype(p.dtype(), device).size_in_bytes() as u64,
        storage: p.dtype(),
        ..plan.clone()
    }
}

fn load_text_encoder(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<TextEncoder, LoadError> {
    let t =
        files.manifest.text_encoder.as_ref().ok_or_else(|| LoadError::Invalid("model has no text encoder".into()))?;
    let cfg: T5Config = files.config(&t.config)?;
    let vb = files.var_builder(&t.weights, dtype, device)?;
    let model =
        T5Encoder::new(&cfg, vb).map_err(|e| model_err(&format!("text_encoder {}", t.weights.join(", ")), files, e))?;
    let tok_path = match &files.source {
        ModelSource::Dir(d) => d.join(&t.tokenizer),
        ModelSource::Embedded(_) => return Err(LoadError::Invalid("embedded models cannot carry a tokenizer".into())),
    };
    let tokenizer = T5Tokenizer::from_file(&tok_path, t.max_length)
        .map_err(|e| LoadError::Invalid(format!("{}: {e}", tok_path.display())))?;
    Ok(TextEncoder::new(model, tokenizer, device.clone()))
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<DpirModel>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, d) in [("auto", DeviceSpec::Auto), ("cpu", DeviceSpec::Cpu), ("cuda:1", DeviceSpec::Cuda(1))] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert!("gpu".parse::<DeviceSpec>().unwrap_err().contains("cpu, cuda:N or auto"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn precisions_parse_and_name_their_storage_dtype() {
        for (s, p, d) in [
            ("f32", Precision::F32, DType::F32),
            ("f16", Precision::F16, DType::F16),
            ("bf16", Precision::Bf16, DType::BF16),
        ] {
            assert_eq!(s.parse::<Precision>().unwrap(), p);
            assert_eq!(p.to_string(), s);
            assert_eq!(p.dtype(), d);
        }
    }
}
