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
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use safetensors::tensor::{Metadata, TensorInfo};
use serde::Deserialize;
use sha2::{Digest, Sha256};

include!(concat!(env!("OUT_DIR"), "/embedded_model.rs"));

/// The manifest format this build reads.
pub const FORMAT: &str = "gst-dpir/1";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The model directory, a manifest, a config or a weight file is missing or wrong.
    #[error("{0}")]
    Invalid(String),
    /// A setting cannot be honoured (device, precision).
    #[error("{0}")]
    Settings(String),
    /// The model does not fit in the memory this process may use.
    #[error("{0}")]
    Memory(String),
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

impl ModelSource {
    /// The bytes `[offset, offset + len)` of a file (embedded: a slice; a directory: one read).
    fn read_at(&self, rel: &str, offset: u64, len: usize) -> Result<Cow<'static, [u8]>> {
        match self {
            ModelSource::Embedded(_) => {
                let Cow::Borrowed(all) = self.read(rel)? else { unreachable!("embedded files are borrowed") };
                let (a, b) = (offset as usize, offset as usize + len);
                all.get(a..b).map(Cow::Borrowed).ok_or_else(|| {
                    LoadError::Invalid(format!("{}: {len} bytes at {offset} are past its end", self.path(rel)))
                })
            }
            ModelSource::Dir(d) => {
                let mut buf = vec![0u8; len];
                let f = std::fs::File::open(d.join(rel))
                    .map_err(|e| LoadError::Invalid(format!("cannot read {}: {e}", self.path(rel))))?;
                f.read_exact_at(&mut buf, offset)
                    .map_err(|e| LoadError::Invalid(format!("cannot read {}: {e}", self.path(rel))))?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// A file's length in bytes.
    fn len(&self, rel: &str) -> Result<u64> {
        match self {
            ModelSource::Embedded(_) => Ok(self.read(rel)?.len() as u64),
            ModelSource::Dir(d) => std::fs::metadata(d.join(rel)).map(|m| m.len()).map_err(|e| {
                LoadError::Invalid(format!(
                    "cannot read {}: {e} (the manifest {} names it)",
                    d.join(rel).display(),
                    d.join("model.json").display()
                ))
            }),
        }
    }
}

/// A weight file's header: refuses pickles, truncated files and non-float tensors from the
/// header alone (real checkpoints are many GB: their data is read once, when the model is built).
fn read_header(source: &ModelSource, rel: &str) -> Result<WeightHeader> {
    let path = source.path(rel);
    let file_len = source.len(rel)?;
    let head = source.read_at(rel, 0, file_len.min(8) as usize)?;
    if is_pickle(rel, &head) {
        return Err(pickle_error(&path));
    }
    let truncated = |why: String| {
        LoadError::Invalid(format!(
            "{path} is truncated or not a safetensors file ({why}); re-download or re-export it"
        ))
    };
    if head.len() < 8 {
        return Err(truncated(format!("{file_len} bytes")));
    }
    let n = u64::from_le_bytes(head[..8].try_into().unwrap());
    if n > 100_000_000 || 8 + n > file_len {
        return Err(truncated(format!("a header of {n} bytes in a file of {file_len}")));
    }
    let raw = source.read_at(rel, 8, n as usize)?;
    let meta: Metadata = std::str::from_utf8(&raw)
        .ok()
        .and_then(|h| serde_json::from_str(h).ok())
        .ok_or_else(|| truncated("its header is not valid safetensors JSON".into()))?;
    let mut tensors = HashMap::new();
    let mut end = 0;
    for (name, info) in meta.tensors() {
        if candle_dtype(info.dtype).is_none() {
            return invalid(format!(
                "{path}: tensor `{name}` has dtype {:?}; model weights must be f32, f16 or bf16",
                info.dtype
            ));
        }
        let bytes = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
        let (a, b) = info.data_offsets;
        if b < a || b - a != bytes {
            return Err(truncated(format!(
                "tensor `{name}` has {} bytes for its shape {:?}",
                b.wrapping_sub(a),
                info.shape
            )));
        }
        end = end.max(b);
        tensors.insert(name, info.clone());
    }
    if 8 + n + end as u64 != file_len {
        return Err(truncated(format!("{} bytes of data expected, {} present", end, file_len - 8 - n)));
    }
    Ok(WeightHeader { data_start: 8 + n, tensors })
}

/// A safetensors file's header: where its data starts and each tensor's dtype, shape and bytes.
#[derive(Debug, Clone)]
pub struct WeightHeader {
    /// Offset of the data section (8 + the header's length).
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl WeightHeader {
    /// Tensor names and shapes with their stored dtypes.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// The candle dtype of a stored safetensors dtype (float types only).
fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        _ => return None,
    })
}

/// A parsed, validated model: the manifest plus every config and checked weight file.
pub struct ModelFiles {
    pub source: ModelSource,
    pub manifest: Manifest,
    /// Each weight file's header (read once, when the files are checked).
    headers: HashMap<String, WeightHeader>,
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
        let mut files = Self { source, manifest, headers: HashMap::new() };
        for rel in files.weight_files() {
            let header = files.check_weights(&rel)?;
            files.headers.insert(rel, header);
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

    /// A weight file's header ([`read_header`]), its sha256 verified when the manifest gives one.
    fn check_weights(&self, rel: &str) -> Result<WeightHeader> {
        let header = read_header(&self.source, rel)?;
        if let Some(expected) = self.manifest.sha256.get(rel) {
            let got = self.sha256(rel)?;
            if !got.eq_ignore_ascii_case(expected) {
                return invalid(format!("{}: sha256 {got} does not match model.json's {expected}", self.path(rel)));
            }
        }
        Ok(header)
    }

    /// sha256 of a file, read in 8 MiB pieces.
    fn sha256(&self, rel: &str) -> Result<String> {
        let mut h = Sha256::new();
        match &self.source {
            ModelSource::Embedded(_) => h.update(self.source.read(rel)?),
            ModelSource::Dir(d) => {
                let io = |e: std::io::Error| LoadError::Invalid(format!("cannot read {}: {e}", self.path(rel)));
                let mut f = std::fs::File::open(d.join(rel)).map_err(io)?;
                let mut buf = vec![0u8; 8 << 20];
                loop {
                    let k = f.read(&mut buf).map_err(io)?;
                    if k == 0 {
                        break;
                    }
                    h.update(&buf[..k]);
                }
            }
        }
        Ok(format!("{:x}", h.finalize()))
    }

    /// The headers of a component's weight files.
    pub fn headers<'a>(&'a self, weights: &'a [String]) -> impl Iterator<Item = &'a WeightHeader> + 'a {
        weights.iter().filter_map(|w| self.headers.get(w))
    }

    /// A VarBuilder over a component's weight files that builds each tensor in `dtype` on
    /// `device` when a layer asks for it, reading it from its file once (no mapping kept, no
    /// second copy): what the process holds is the weights at `dtype`, nothing else.
    pub fn var_builder(&self, weights: &[String], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let files = weights
            .iter()
            .map(|w| {
                let h = self.headers.get(w).ok_or_else(|| LoadError::Invalid(format!("{w} was not checked")))?;
                Ok((w.clone(), h.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(weights_var_builder(self.source.clone(), files, dtype, device))
    }

    pub fn path(&self, rel: &str) -> String {
        self.source.path(rel)
    }
}

fn weights_var_builder(
    source: ModelSource,
    files: Vec<(String, WeightHeader)>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let mut index = HashMap::new();
    for (k, (_, header)) in files.iter().enumerate() {
        for (name, info) in &header.tensors {
            index.insert(name.clone(), (k, info.clone()));
        }
    }
    let files = files.into_iter().map(|(w, h)| (w, h.data_start)).collect();
    VarBuilder::from_backend(Box::new(WeightSource { source, files, index }), dtype, device.clone())
}

/// A VarBuilder over safetensors files outside a model directory (the parity fixtures'), on the
/// same loading path as a model's: tensors read on demand into `dtype` on `device`.
pub fn var_builder_from_files(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let source = ModelSource::Dir(PathBuf::from("."));
    let files = paths
        .iter()
        .map(|p| {
            let rel = p.display().to_string();
            Ok((rel.clone(), read_header(&source, &rel)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(weights_var_builder(source, files, dtype, device))
}

/// The tensors of a component's weight files, built on demand in the dtype asked for: each one
/// read from its file straight into the tensor's buffer (or converted piece by piece when the
/// stored dtype differs), so a model never holds a weight twice, nor a mapping of its files.
struct WeightSource {
    source: ModelSource,
    /// `(file, data start)` per weight file.
    files: Vec<(String, u64)>,
    /// Tensor name → (file index, header entry).
    index: HashMap<String, (usize, TensorInfo)>,
}

/// Element types the loader builds tensors of.
trait Elem: candle_core::WithDType + Copy + Default {
    fn from_f32s(src: &[f32], dst: &mut [Self]);
}

impl Elem for f32 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

impl Elem for half::f16 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl Elem for half::bf16 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl Elem for f64 {
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v as f64;
        }
    }
}

/// Little-endian stored values → f32.
fn decode_f32(stored: DType, bytes: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match stored {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap());
            }
        }
        DType::F16 => {
            let v: Vec<half::f16> = bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
            v.convert_to_f32_slice(out);
        }
        DType::BF16 => {
            let v: Vec<half::bf16> = bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect();
            v.convert_to_f32_slice(out);
        }
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        }
    }
}

impl WeightSource {
    fn read(&self, file: usize, info: &TensorInfo, dtype: DType) -> candle_core::Result<Tensor> {
        let stored = candle_dtype(info.dtype).expect("checked when the files were opened");
        match dtype {
            DType::F32 => self.read_as::<f32>(file, info, stored),
            DType::F16 => self.read_as::<half::f16>(file, info, stored),
            DType::BF16 => self.read_as::<half::bf16>(file, info, stored),
            DType::F64 => self.read_as::<f64>(file, info, stored),
            other => candle_core::bail!("weights cannot be loaded as {other:?}"),
        }
    }

    fn read_as<T: Elem>(&self, file: usize, info: &TensorInfo, stored: DType) -> candle_core::Result<Tensor> {
        let (rel, start) = &self.files[file];
        let n: usize = info.shape.iter().product();
        let mut out = vec![T::default(); n];
        let offset = start + info.data_offsets.0 as u64;
        let err = |e: LoadError| candle_core::Error::Msg(e.to_string());
        if stored == T::DTYPE {
            // The stored bytes are the tensor's (little-endian, as this machine): read in place.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
            match &self.source {
                ModelSource::Dir(d) => {
                    let f =
                        std::fs::File::open(d.join(rel)).map_err(|e| candle_core::Error::Msg(format!("{rel}: {e}")))?;
                    f.read_exact_at(dst, offset).map_err(|e| candle_core::Error::Msg(format!("{rel}: {e}")))?;
                }
                ModelSource::Embedded(_) => {
                    dst.copy_from_slice(&self.source.read_at(rel, offset, dst.len()).map_err(err)?)
                }
            }
        } else {
            // Converted in pieces of 1 Mi values: never the whole tensor twice.
            let size = stored.size_in_bytes();
            let mut tmp = vec![0f32; n.min(1 << 20)];
            for (k, chunk) in out.chunks_mut(1 << 20).enumerate() {
                let bytes = self
                    .source
                    .read_at(rel, offset + (k << 20) as u64 * size as u64, chunk.len() * size)
                    .map_err(err)?;
                decode_f32(stored, &bytes, &mut tmp[..chunk.len()]);
                T::from_f32s(&tmp[..chunk.len()], chunk);
            }
        }
        Tensor::from_vec(out, info.shape.clone(), &Device::Cpu)
    }
}

impl candle_nn::var_builder::SimpleBackend for WeightSource {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            let file = self.index.get(name).map(|(k, _)| self.files[*k].0.as_str()).unwrap_or("?");
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} (from the component's config)",
                self.source.path(file),
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((file, info)) = self.index.get(name) else {
            let files: Vec<&str> = self.files.iter().map(|(f, _)| f.as_str()).collect();
            candle_core::bail!("tensor `{name}` is missing from {}", files.join(", "));
        };
        let t = self.read(*file, info, dtype)?;
        if dev.is_cpu() { Ok(t) } else { t.to_device(dev) }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
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
