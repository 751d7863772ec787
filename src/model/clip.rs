//! CLIP vision tower with projection (HF `CLIPVisionModelWithProjection`, key names as in the
//! checkpoint, `pre_layrnorm` spelling included).
//!
//! Written here rather than reusing candle-transformers' CLIP: that one only has QuickGELU and
//! no `visual_projection`. Its linear layers and attention run in the reference's order
//! ([`layers::Lin::forward_reference`], [`layers::attention_reference`]): the prompts, which every
//! frame's conditioning depends on, keep the values they had (and that dpir-nano was made with)
//! whatever the CPU kernels do. DPIR needs both activations (B/32: QuickGELU, bigG: exact erf-GELU)
//! and both outputs: `last_hidden_state` (encoder output *before* `post_layernorm`) and
//! `image_embeds = visual_projection(post_layernorm(CLS))` (no bias).

use candle_core::{DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::layers::{self, Conv, LayerNorm, Lin};

/// The activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x · sigmoid(1.702 x)` (`quick_gelu`, OpenAI checkpoints).
    QuickGelu,
    /// Exact erf GELU (`gelu`, OpenCLIP bigG).
    GeluErf,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl ClipActivation {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            other => bail!("unsupported CLIP hidden_act `{other}`"),
        })
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

/// The HF vision config (`CLIPVisionConfig`); extra keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    pub patch_size: usize,
    pub image_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

impl ClipVisionConfig {
    /// From a `CLIPVisionConfig` dict, or from a full `CLIPConfig` (uses its `vision_config`;
    /// `projection_dim` then comes from the top level when the vision part lacks it).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        if let Some(vc) = v.get("vision_config") {
            let mut vc = vc.clone();
            if let (None, Some(p), Some(o)) =
                (vc.get("projection_dim").cloned(), v.get("projection_dim"), vc.as_object_mut())
            {
                o.insert("projection_dim".into(), p.clone());
            }
            return serde_json::from_value(vc).map_err(|e| candle_core::Error::Msg(format!("CLIP vision_config: {e}")));
        }
        serde_json::from_value(v.clone()).map_err(|e| candle_core::Error::Msg(format!("CLIP vision config: {e}")))
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// What one forward returns.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// Encoder output before `post_layernorm`, `[B, 1 + patches, hidden]`.
    pub last_hidden_state: Tensor,
    /// `post_layernorm(last_hidden_state[:, 0])`, `[B, hidden]`.
    pub pooled: Tensor,
    /// `visual_projection(pooled)`, `[B, projection_dim]`.
    pub image_embeds: Tensor,
}

struct Attention {
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        if !h.is_multiple_of(cfg.num_attention_heads) {
            bail!("hidden_size {h} not divisible by {} heads", cfg.num_attention_heads);
        }
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            q: layers::linear(h, h, vb.pp("q_proj"))?,
            k: layers::linear(h, h, vb.pp("k_proj"))?,
            v: layers::linear(h, h, vb.pp("v_proj"))?,
            out: layers::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let q = self.q.forward_reference(xs)?;
        let (k, v) = (self.k.forward_reference(xs)?, self.v.forward_reference(xs)?);
        self.out.forward_reference(&layers::attention_reference(&q, &k, &v, self.heads, self.scale)?)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Lin,
    fc2: Lin,
    act: ClipActivation,
}

impl EncoderLayer {
    fn new(cfg: &ClipVisionConfig, act: ClipActivation, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            ln1: layers::layer_norm(h, eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            ln2: layers::layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: layers::linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: layers::linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.ln1.forward(xs)?)?)?;
        let h = self.act.apply(&self.fc1.forward_reference(&self.ln2.forward(&xs)?)?)?;
        xs + self.fc2.forward_reference(&h)?
    }
}

/// `CLIPVisionModelWithProjection`.
pub struct ClipVisionModel {
    cfg: ClipVisionConfig,
    class_embedding: Tensor,
    patch_embedding: Conv,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Lin,
    device: Device,
    dtype: DType,
}

impl ClipVisionModel {
    /// `vb` at the checkpoint root (keys `vision_model.*`, `visual_projection.weight`).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let act = ClipActivation::from_name(&cfg.hidden_act)?;
        if !cfg.image_size.is_multiple_of(cfg.patch_size) {
            bail!("image_size {} not a multiple of patch_size {}", cfg.image_size, cfg.patch_size);
        }
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let p = cfg.patch_size;
        let patch_embedding = layers::conv_no_bias(cfg.num_channels, h, p, p, 0, emb.pp("patch_embedding"))?;
        let position_embedding = emb.get((cfg.num_patches() + 1, h), "position_embedding.weight")?;
        let encoder_layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(cfg, act, vm.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_embedding,
            position_embedding,
            pre_layrnorm: layers::layer_norm(h, eps, vm.pp("pre_layrnorm"))?,
            layers: encoder_layers,
            post_layernorm: layers::layer_norm(h, eps, vm.pp("post_layernorm"))?,
            visual_projection: layers::linear_no_bias(h, cfg.projection_dim, vb.pp("visual_projection"))?,
            device: vb.device().clone(),
            dtype: layers::compute_dtype(vb.dtype(), vb.device()),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `pixel_values [B, 3, S, S]` (any device/dtype: moved to the model's) → outputs.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let (b, c, hh, ww) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != self.cfg.num_channels || hh != s || ww != s {
            bail!("CLIP tower expects [B, {}, {s}, {s}], got {:?}", self.cfg.num_channels, pixel_values.dims());
        }
        let px = pixel_values.to_device(&self.device)?.to_dtype(self.dtype)?;
        let h = self.cfg.hidden_size;
        let patches = self.patch_embedding.forward(&px)?.flatten_from(2)?.transpose(1, 2)?; // [B, P, h]
        let cls = self.class_embedding.to_dtype(self.dtype)?.reshape((1, 1, h))?.expand((b, 1, h))?;
        let pos = self.position_embedding.to_dtype(self.dtype)?.unsqueeze(0)?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&pos)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        let pooled = self.post_layernorm.forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        let image_embeds = self.visual_projection.forward_reference(&pooled)?;
        Ok(ClipVisionOutput { last_hidden_state: xs, pooled, image_embeds })
    }
}

/// The CLS token of `last_hidden_state` (raw, before `post_layernorm`), `[B, hidden]`.
pub fn raw_cls(out: &ClipVisionOutput) -> Result<Tensor> {
    out.last_hidden_state.narrow(1, 0, 1)?.squeeze(1)?.contiguous()
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<ClipVisionModel>();
    send_sync::<ClipVisionOutput>();
};
