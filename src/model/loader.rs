//! Model directories: a `model.json` manifest naming each component's config and weights,
//! validated before anything is built, so a user gets one error naming the file, the tensor and
//! what was expected — not a panic halfway through the first frame.
//!
//! ```json
//! {
//!   "format": "gst-dpir/1",
//!   "name": "my-dpir",
//!   "transformer": {"config": "transformer/config.json",
//!                   "weights": ["transformer/diffusion_pytorch_model.safetensors"]},
//!   "vae": {"kind": "autoencoder_kl", "config": "vae/config.json",
//!           "weights": ["vae/diffusion_pytorch_model.safetensors"]},
//!   "image_encoder_one": {"config": "clip-b32/config.json", "weights": ["clip-b32/model.safetensors"]},
//!   "image_encoder_two": {"config": "clip-bigg/config.json", "weights": ["clip-bigg/model.safetensors"]},
//!   "text_encoder": {"config": "text_encoder_3/config.json",
//!                    "weights": ["text_encoder_3/model-00001-of-00002.safetensors",
//!                                "text_encoder_3/model-00002-of-00002.safetensors"],
//!                    "tokenizer": "tokenizer_3/tokenizer.json"},
//!   "sampler": {"shift": 3.0, "default_steps": 28},
//!   "sha256": {"transformer/diffusion_pytorch_model.safetensors": "…"}
//! }
//! ```
//! `vae` may instead be `{"kind": "taesd", "encoder": "…", "decoder": "…"}`; either may carry
//! `"tiling": {"tile": 128, "overlap": 16, "halo": 16}` (latent units) for frames larger than
//! one tile. `text_encoder`
//! may be `null` or absent: the text slots are then zeros (DPIR's unconditional text input).
//! `fusion` (optional, `{"config": "fusion/config.json", "weights": ["fusion/model.safetensors"]}`)
//! adds the full-resolution stage after the colour fix (`src/model/fusion.rs`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use safetensors::SafeTensors;
use serde::Deserialize;
use sha2::{Digest, Sha256};

include!(concat!(env!("OUT_DIR"), "/embedded_model.rs"));

/// The manifest format this build reads.
pub const FORMAT: &str = "gst-dpir/1";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, LoadError>;

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(LoadError::Invalid(msg.into()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    pub transformer: Component,
    pub vae: AutoencoderSpec,
    pub image_encoder_one: Component,
    pub image_encoder_two: Component,
    #[serde(default)]
    pub text_encoder: Option<TextSpec>,
    /// Optional full-resolution stage after the colour fix ([`crate::model::fusion`]); DPIR's
    /// own checkpoints have none.
    #[serde(default)]
    pub fusion: Option<Component>,
    /// The element's `fidelity` when it is left at -1 (0 to 1; absent: 0, full restoration).
    #[serde(default)]
    pub fidelity: Option<f64>,
    #[serde(default)]
    pub sampler: SamplerSpec,
    #[serde(default)]
    pub prompt: PromptSpec,
    /// Relative path → expected sha256 (hex) of files to verify.
    #[serde(default)]
    pub sha256: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub config: String,
    pub weights: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AutoencoderSpec {
    AutoencoderKl {
        config: String,
        weights: Vec<String>,
        /// Tiles for frames larger than one (latent units; default: DPIR's 1024-px cores).
        #[serde(default)]
        tiling: Option<crate::model::tiling::TileConfig>,
    },
    Taesd {
        encoder: String,
        decoder: String,
        #[serde(default)]
        tiling: Option<crate::model::tiling::TileConfig>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    pub config: String,
    pub weights: Vec<String>,
    pub tokenizer: String,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
}

fn default_max_length() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplerSpec {
    pub shift: f64,
    pub num_train_timesteps: usize,
    /// Steps when the element's `steps` is 0 (DPIR: 28).
    pub default_steps: Option<u32>,
    /// Latent tile and overlap when the element's `tile-size` / `tile-overlap` are left at
    /// their defaults (DPIR: 128 and 8, i.e. 1024 px and 64 px; a model trained on small crops
    /// names its crop here).
    pub tile_size: Option<usize>,
    pub tile_overlap: Option<usize>,
}

impl Default for SamplerSpec {
    fn default() -> Self {
        Self { shift: 3.0, num_train_timesteps: 1000, default_steps: None, tile_size: None, tile_overlap: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptSpec {
    /// Zero text tokens appended when there is no text encoder (DPIR: 256).
    pub text_tokens: usize,
    pub clip_tokens: usize,
    pub tile_size: usize,
    pub tile_stride: usize,
}

impl Default for PromptSpec {
    fn default() -> Self {
        Self { text_tokens: 256, clip_tokens: 77, tile_size: 1024, tile_stride: 960 }
    }
}

/// Where a model's files come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Dir(PathBuf),
    /// Compiled into the library (the embedded dpir-nano).
    Embedded(&'static [(&'static str, &'static [u8])]),
}

impl ModelSource {
    /// The embedded default model, if this build has one.
    pub fn embedded() -> Option<Self> {
        (!EMBEDDED_MODEL.is_empty()).then_some(ModelSource::Embedded(EMBEDDED_MODEL))
    }

    pub fn describe(&self) -> String {
        match self {
            ModelSource::Dir(p) => p.display().to_string(),
            ModelSource::Embedded(_) => "embedded dpir-nano".into(),
        }
    }

    fn path(&self, rel: &str) -> String {
        match self {
            ModelSource::Dir(d) => d.join(rel).display().to_string(),
            ModelSource::Embedded(_) => format!("<embedded>/{rel}"),
        }
    }

    /// Bytes of a file (mmapped for directories: real checkpoints are many GB).
    fn read(&self, rel: &str) -> Result<Cow<'static, [u8]>> {
        match self {
            ModelSource::Embedded(files) => files
                .iter()
                .find(|(n, _)| *n == rel)
                .map(|(_, d)| Cow::Borrowed(*d))
                .ok_or_else(|| LoadError::Invalid(format!("embedded model has no file {rel}"))),
            ModelSource::Dir(d) => {
                let p = d.join(rel);
                std::fs::read(&p).map(Cow::Owned).map_err(|e| {
                    LoadError::Invalid(format!(
                        "cannot read {}: {e} (the manifest {} names it)",
                        p.display(),
                        d.join("model.json").display()
                    ))
                })
            }
        }
    }
}

/// A parsed, validated model: the manifest plus every config and checked weight file.
pub struct ModelFiles {
    pub source: ModelSource,
    pub manifest: Manifest,
}

fn is_pickle(rel: &str, head: &[u8]) -> bool {
    let ext = Path::new(rel).extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    matches!(ext.as_str(), "pth" | "pt" | "ckpt" | "bin" | "pkl" | "pickle")
        || head.starts_with(b"PK\x03\x04")
        || (head.first() == Some(&0x80) && head.get(1).is_some_and(|v| (2..=5).contains(v)))
}

fn pickle_error(path: &str) -> LoadError {
    LoadError::Invalid(format!(
        "{path} is a PyTorch pickle, which gst-dpir refuses to load (pickles can run code). Convert it once \
         with: python3 -c \"import torch; from safetensors.torch import save_file; \
         sd = torch.load('{path}', map_location='cpu', weights_only=True); \
         save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path}.safetensors')\" and name the \
         .safetensors file in model.json"
    ))
}

impl ModelFiles {
    /// Read and validate `model.json` and everything it names.
    pub fn open(source: ModelSource) -> Result<Self> {
        if let ModelSource::Dir(d) = &source {
            if !d.is_dir() {
                return invalid(format!("model directory {} does not exist", d.display()));
            }
            if !d.join("model.json").is_file() {
                let empty = std::fs::read_dir(d).map(|mut r| r.next().is_none()).unwrap_or(false);
                return invalid(format!(
                    "{} has no model.json{}; see weights/README.md for the model directory format",
                    d.display(),
                    if empty { " (the directory is empty)" } else { "" }
                ));
            }
        }
        let raw = source.read("model.json")?;
        let manifest: Manifest = serde_json::from_slice(&raw)
            .map_err(|e| LoadError::Invalid(format!("{}: {e}", source.path("model.json"))))?;
        if manifest.format != FORMAT {
            return invalid(format!(
                "{}: format `{}` is not supported (this build reads `{FORMAT}`)",
                source.path("model.json"),
                manifest.format
            ));
        }
        if let Some(f) = manifest.fidelity
            && !(0.0..=1.0).contains(&f)
        {
            return invalid(format!(
                "{}: fidelity {f} is out of range (0: full restoration to 1: the input)",
                source.path("model.json")
            ));
        }
        let files = Self { source, manifest };
        for rel in files.weight_files() {
            files.check_weights(&rel)?;
        }
        for rel in files.config_files() {
            files.config_json(&rel)?;
        }
        if let Some(t) = &files.manifest.text_encoder {
            files.source.read(&t.tokenizer)?;
        }
        Ok(files)
    }

    fn weight_files(&self) -> Vec<String> {
        let m = &self.manifest;
        let mut v: Vec<String> = Vec::new();
        v.extend(m.transformer.weights.iter().cloned());
        match &m.vae {
            AutoencoderSpec::AutoencoderKl { weights, .. } => v.extend(weights.iter().cloned()),
            AutoencoderSpec::Taesd { encoder, decoder, .. } => v.extend([encoder.clone(), decoder.clone()]),
        }
        v.extend(m.image_encoder_one.weights.iter().cloned());
        v.extend(m.image_encoder_two.weights.iter().cloned());
        if let Some(t) = &m.text_encoder {
            v.extend(t.weights.iter().cloned());
        }
        if let Some(f) = &m.fusion {
            v.extend(f.weights.iter().cloned());
        }
        v
    }

    fn config_files(&self) -> Vec<String> {
        let m = &self.manifest;
        let mut v =
            vec![m.transformer.config.clone(), m.image_encoder_one.config.clone(), m.image_encoder_two.config.clone()];
        if let AutoencoderSpec::AutoencoderKl { config, .. } = &m.vae {
            v.push(config.clone());
        }
        if let Some(t) = &m.text_encoder {
            v.push(t.config.clone());
        }
        if let Some(f) = &m.fusion {
            v.push(f.config.clone());
        }
        v
    }

    /// A component's config.json.
    pub fn config_json(&self, rel: &str) -> Result<serde_json::Value> {
        let raw = self.source.read(rel)?;
        serde_json::from_slice(&raw)
            .map_err(|e| LoadError::Invalid(format!("{}: not valid JSON: {e}", self.source.path(rel))))
    }

    /// A component's config.json, parsed as `T` (errors name the file).
    pub fn config<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Result<T> {
        serde_json::from_value(self.config_json(rel)?)
            .map_err(|e| LoadError::Invalid(format!("{}: {e}", self.source.path(rel))))
    }

    /// Refuse pickles, truncated files and non-float tensors; verify sha256 when given.
    fn check_weights(&self, rel: &str) -> Result<()> {
        let path = self.source.path(rel);
        let data = self.source.read(rel)?;
        if is_pickle(rel, &data[..data.len().min(8)]) {
            return Err(pickle_error(&path));
        }
        let st = SafeTensors::deserialize(&data).map_err(|e| {
            LoadError::Invalid(format!(
                "{path} is truncated or not a safetensors file ({e}); re-download or re-export it"
            ))
        })?;
        for (name, view) in st.tensors() {
            use safetensors::Dtype;
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
                return invalid(format!(
                    "{path}: tensor `{name}` has dtype {:?}; model weights must be f32, f16 or bf16",
                    view.dtype()
                ));
            }
        }
        if let Some(expected) = self.manifest.sha256.get(rel) {
            let got = format!("{:x}", Sha256::digest(&data));
            if !got.eq_ignore_ascii_case(expected) {
                return invalid(format!("{path}: sha256 {got} does not match model.json's {expected}"));
            }
        }
        Ok(())
    }

    /// A VarBuilder over a component's weight files, in `dtype` on `device`.
    pub fn var_builder(&self, weights: &[String], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match &self.source {
            ModelSource::Dir(d) => {
                let paths: Vec<PathBuf> = weights.iter().map(|w| d.join(w)).collect();
                // Safety: the files were validated above and are not expected to change while loaded.
                unsafe { VarBuilder::from_mmaped_safetensors(&paths, dtype, device) }
                    .map_err(|e| LoadError::Invalid(format!("{}: {e}", weights.join(", "))))
            }
            ModelSource::Embedded(_) => {
                let mut all = std::collections::HashMap::new();
                for w in weights {
                    let data = self.source.read(w)?;
                    let ts = candle_core::safetensors::load_buffer(&data, device)
                        .map_err(|e| LoadError::Invalid(format!("{}: {e}", self.source.path(w))))?;
                    all.extend(ts);
                }
                Ok(VarBuilder::from_tensors(all, dtype, device))
            }
        }
    }

    pub fn path(&self, rel: &str) -> String {
        self.source.path(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_are_recognised_by_extension_and_magic() {
        assert!(is_pickle("model.pth", b"anything"));
        assert!(is_pickle("model.safetensors", b"PK\x03\x04rest"));
        assert!(is_pickle("model.safetensors", &[0x80, 0x02, 0x7d]));
        assert!(!is_pickle("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00"));
    }
}
