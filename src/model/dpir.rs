//! A whole DPIR model built from a model directory (or the embedded dpir-nano): transformer,
//! autoencoder, the two CLIP vision towers and the optional T5 text encoder, on one device in
//! one dtype; plus the device and precision choices, and a process-wide cache so elements of
//! one process share one copy of each model.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::autoencoder::Autoencoder;
use super::clip::{ClipVisionConfig, ClipVisionModel};
use super::fusion::{Fusion, FusionConfig};
use super::loader::{AutoencoderSpec, Component, LoadError, ModelFiles, ModelSource};
use super::prompt::{ImagePromptEncoder, PromptConfig, TilingMode};
use super::scheduler::FlowMatchEulerConfig;
use super::t5::{T5Tokenizer, TextEncoder};
use super::taesd::{Taesd, TaesdConfig};
use super::transformer::{DpirTransformer, DpirTransformerConfig};
use super::vae::{AutoencoderKl, AutoencoderKlConfig};

/// Where the model runs (`device` property: `auto`, `cpu`, `cuda:N`).
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

/// Numeric precision of every component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    /// GPU only: candle's CPU matmul has no bf16.
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

impl Precision {
    pub fn dtype(self, device: &Device) -> std::result::Result<DType, String> {
        match self {
            Self::F32 => Ok(DType::F32),
            Self::F16 => Ok(DType::F16),
            Self::Bf16 if device.is_cpu() => {
                Err("precision=bf16 is not supported on the CPU (candle's CPU matmul has no bf16): use f32 or f16"
                    .into())
            }
            Self::Bf16 => Ok(DType::BF16),
        }
    }
}

/// A loaded DPIR model: every component on one device in one dtype.
pub struct DpirModel {
    pub name: String,
    pub files: ModelFiles,
    pub transformer: DpirTransformer,
    pub transformer_config: DpirTransformerConfig,
    pub autoencoder: Box<dyn Autoencoder>,
    pub image: ImagePromptEncoder,
    /// The optional full-resolution stage after the colour fix (`fusion` in model.json).
    pub fusion: Option<Fusion>,
    /// T5 (SD3: 4.7 B parameters, ~9 GB in bf16). With `low-memory` it is dropped after each
    /// new prompt's embedding and loaded again for the next one: prompts are computed once per
    /// clip, so this costs a reload per prompt change, not per frame. candle-transformers' T5
    /// takes `&mut self`; it runs once per prompt, so the lock costs nothing.
    text: Mutex<Option<TextEncoder>>,
    has_text: bool,
    pub device: Device,
    pub dtype: DType,
}

fn model_err(what: &str, files: &ModelFiles, e: impl fmt::Display) -> LoadError {
    LoadError::Invalid(format!("{} ({}): {e}", what, files.source.describe()))
}

impl DpirModel {
    /// Build every component from validated files.
    pub fn load(
        source: ModelSource,
        device: &Device,
        dtype: DType,
        tiling: TilingMode,
    ) -> std::result::Result<Self, LoadError> {
        let files = ModelFiles::open(source)?;
        let m = files.manifest.clone();

        let transformer_config: DpirTransformerConfig = files.config(&m.transformer.config)?;
        let vb = files.var_builder(&m.transformer.weights, dtype, device)?;
        let transformer = DpirTransformer::new(&transformer_config, vb)
            .map_err(|e| model_err(&format!("transformer {}", m.transformer.weights.join(", ")), &files, e))?;

        let autoencoder: Box<dyn Autoencoder> = match &m.vae {
            AutoencoderSpec::AutoencoderKl { config, weights, tiling } => {
                let cfg: AutoencoderKlConfig = files.config(config)?;
                let vb = files.var_builder(weights, dtype, device)?;
                Box::new(
                    AutoencoderKl::new(&cfg, vb)
                        .map_err(|e| model_err(&format!("vae {}", weights.join(", ")), &files, e))?
                        .with_tiling(Some(tiling.unwrap_or_default())),
                )
            }
            AutoencoderSpec::Taesd { encoder, decoder, tiling } => {
                let enc = files.var_builder(std::slice::from_ref(encoder), dtype, device)?;
                let dec = files.var_builder(std::slice::from_ref(decoder), dtype, device)?;
                Box::new(
                    Taesd::new(&TaesdConfig::default(), Some(enc), Some(dec))
                        .map_err(|e| model_err(&format!("taesd {encoder}, {decoder}"), &files, e))?
                        .with_tiling(Some(tiling.unwrap_or_default())),
                )
            }
        };

        let tower = |c: &Component, name: &str| -> std::result::Result<ClipVisionModel, LoadError> {
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

        let fusion = match &m.fusion {
            None => None,
            Some(c) => {
                let cfg: FusionConfig = files.config(&c.config)?;
                let vb = files.var_builder(&c.weights, dtype, device)?;
                Some(
                    Fusion::new(&cfg, vb)
                        .map_err(|e| model_err(&format!("fusion {}", c.weights.join(", ")), &files, e))?,
                )
            }
        };
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
            fusion,
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
            let t = slot.as_mut().unwrap().embed(prompt);
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

    /// The sampler's schedule (`sampler` in model.json).
    pub fn scheduler(&self) -> FlowMatchEulerConfig {
        let s = &self.files.manifest.sampler;
        FlowMatchEulerConfig { num_train_timesteps: s.num_train_timesteps, shift: s.shift }
    }

    /// Largest latent tile the transformer takes (its position table).
    pub fn max_tile(&self) -> usize {
        self.transformer_config.pos_embed_max_size * self.transformer_config.patch_size
    }
}

fn load_text_encoder(files: &ModelFiles, dtype: DType, device: &Device) -> std::result::Result<TextEncoder, LoadError> {
    let t =
        files.manifest.text_encoder.as_ref().ok_or_else(|| LoadError::Invalid("model has no text encoder".into()))?;
    let cfg: candle_transformers::models::t5::Config = files.config(&t.config)?;
    let vb = files.var_builder(&t.weights, dtype, device)?;
    let model = candle_transformers::models::t5::T5EncoderModel::load(vb, &cfg)
        .map_err(|e| model_err(&format!("text_encoder {}", t.weights.join(", ")), files, e))?;
    let tok_path = match &files.source {
        ModelSource::Dir(d) => d.join(&t.tokenizer),
        ModelSource::Embedded(_) => return Err(LoadError::Invalid("embedded models cannot carry a tokenizer".into())),
    };
    let tokenizer = T5Tokenizer::from_file(&tok_path, t.max_length)
        .map_err(|e| LoadError::Invalid(format!("{}: {e}", tok_path.display())))?;
    Ok(TextEncoder::new(model, tokenizer, device.clone()))
}

/// Models shared between elements of one process: same source, device, dtype, tiling → one copy.
static MODELS: LazyLock<Mutex<HashMap<String, Weak<DpirModel>>>> = LazyLock::new(Default::default);

/// Errors of [`shared_model`], split as the element reports them.
#[derive(Debug, thiserror::Error)]
pub enum SharedModelError {
    /// A setting cannot be honoured (device, precision).
    #[error("{0}")]
    Settings(String),
    /// The model's files are missing or wrong.
    #[error("{0}")]
    Model(String),
}

/// Load (or reuse) a model. `source` `None`: the embedded dpir-nano.
pub fn shared_model(
    source: Option<ModelSource>,
    device: DeviceSpec,
    precision: Precision,
    tiling: TilingMode,
) -> std::result::Result<Arc<DpirModel>, SharedModelError> {
    let device = device.device().map_err(SharedModelError::Settings)?;
    let dtype = precision.dtype(&device).map_err(SharedModelError::Settings)?;
    let source = match source {
        Some(s) => s,
        None => ModelSource::embedded().ok_or_else(|| {
            SharedModelError::Model(
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
        Arc::new(DpirModel::load(source, &device, dtype, tiling).map_err(|e| SharedModelError::Model(e.to_string()))?);
    models.insert(key, Arc::downgrade(&model));
    Ok(model)
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
    fn bf16_is_refused_on_the_cpu_with_a_reason() {
        assert!(Precision::Bf16.dtype(&Device::Cpu).unwrap_err().contains("bf16"));
        assert_eq!(Precision::F16.dtype(&Device::Cpu).unwrap(), DType::F16);
    }
}
