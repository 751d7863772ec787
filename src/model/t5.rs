//! SD3's text encoder (`text_encoder_3`, HF `T5EncoderModel`, T5 v1.1) as DPIR calls it, and its
//! tokenizer (HF `tokenizers`, SD3's padding).
//!
//! HF semantics: no attention mask (pad tokens are attended to, as DPIR calls it), unscaled
//! attention logits, one relative-position table (block 0's) shared by all layers, RMS layer
//! norms without bias, gated-GELU with the tanh approximation (`gelu_new`). Written on
//! [`super::layers`] rather than taken from candle-transformers so that its 4.7 B weights stay
//! in their stored f16/bf16 on the CPU and are computed in f32 (candle-transformers' T5 computes
//! in the weights' dtype: f16 overflows in T5 v1.1, bf16 has no CPU matmul, f32 storage is 19 GB).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::layers::{self, Lin, RmsNorm};

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

/// HF `T5Config` (`text_encoder_3/config.json`); unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gelu`, `gated-gelu` (T5 v1.1), `gated-silu`, ….
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

#[derive(Debug, Clone, Copy)]
enum Act {
    Relu,
    /// HF maps `gelu` in `feed_forward_proj` to `gelu_new`, the tanh approximation.
    GeluTanh,
    Silu,
}

impl Act {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Act::Relu => x.relu(),
            Act::GeluTanh => x.gelu(),
            Act::Silu => x.silu(),
        }
    }
}

impl T5Config {
    /// `(gated, activation)` of `feed_forward_proj`.
    fn feed_forward(&self) -> Result<(bool, Act)> {
        let (gated, name) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(n) => (true, n),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = match name {
            "relu" => Act::Relu,
            "gelu" | "gelu_new" => Act::GeluTanh,
            "silu" => Act::Silu,
            other => bail!("unsupported T5 feed_forward_proj activation `{other}`"),
        };
        Ok((gated, act))
    }
}

/// T5's bidirectional relative-position bucket of `key − query` (HF `_relative_position_bucket`,
/// its f32 logarithm and truncation included).
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let log_ratio = ((n as f32) / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (log_ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

struct SelfAttention {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    heads: usize,
    /// `[num_buckets, heads]`, block 0 only.
    relative_attention_bias: Option<Tensor>,
}

impl SelfAttention {
    fn new(cfg: &T5Config, has_bias: bool, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_bias {
            Some(vb.get((cfg.relative_attention_num_buckets, cfg.num_heads), "relative_attention_bias.weight")?)
        } else {
            None
        };
        Ok(Self {
            q: layers::linear_no_bias(cfg.d_model, inner, vb.pp("q"))?,
            k: layers::linear_no_bias(cfg.d_model, inner, vb.pp("k"))?,
            v: layers::linear_no_bias(cfg.d_model, inner, vb.pp("v"))?,
            o: layers::linear_no_bias(inner, cfg.d_model, vb.pp("o"))?,
            heads: cfg.num_heads,
            relative_attention_bias,
        })
    }

    /// `x` `[B, L, d_model]`, `bias` `[1, heads, L, L]` (f32).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            let d = t.dim(2)? / self.heads;
            t.reshape((b, l, self.heads, d))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.broadcast_add(bias)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, ()))?;
        self.o.forward(&o)
    }
}

struct FeedForward {
    wi: Lin,
    /// The gate's second projection (`wi_1`), gated variants only.
    wi_1: Option<Lin>,
    wo: Lin,
    act: Act,
}

impl FeedForward {
    fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let (dm, dff) = (cfg.d_model, cfg.d_ff);
        Ok(if gated {
            Self {
                wi: layers::linear_no_bias(dm, dff, vb.pp("wi_0"))?,
                wi_1: Some(layers::linear_no_bias(dm, dff, vb.pp("wi_1"))?),
                wo: layers::linear_no_bias(dff, dm, vb.pp("wo"))?,
                act,
            }
        } else {
            Self {
                wi: layers::linear_no_bias(dm, dff, vb.pp("wi"))?,
                wi_1: None,
                wo: layers::linear_no_bias(dff, dm, vb.pp("wo"))?,
                act,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.wi.forward(x)?)?;
        let h = match &self.wi_1 {
            Some(w) => (h * w.forward(x)?)?,
            None => h,
        };
        self.wo.forward(&h)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

/// The T5 encoder stack (`shared.weight`, `encoder.block.N.*`, `encoder.final_layer_norm`).
pub struct T5Encoder {
    cfg: T5Config,
    shared: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    dtype: DType,
}

impl T5Encoder {
    /// `vb` at the checkpoint root. The embedding is `shared.weight` (HF saves the tied
    /// `encoder.embed_tokens.weight` under that name), else `encoder.embed_tokens.weight`.
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (eps, dm) = (cfg.layer_norm_epsilon, cfg.d_model);
        let shared = if vb.contains_tensor("shared.weight") {
            vb.get((cfg.vocab_size, dm), "shared.weight")?
        } else {
            vb.get((cfg.vocab_size, dm), "encoder.embed_tokens.weight")?
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = enc.pp(format!("block.{i}"));
                Ok(Block {
                    attn_norm: layers::rms_norm(dm, eps, b.pp("layer.0.layer_norm"))?,
                    attn: SelfAttention::new(cfg, i == 0, b.pp("layer.0.SelfAttention"))?,
                    ff_norm: layers::rms_norm(dm, eps, b.pp("layer.1.layer_norm"))?,
                    ff: FeedForward::new(cfg, b.pp("layer.1.DenseReluDense"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if blocks.is_empty() {
            bail!("T5 config has no layers");
        }
        Ok(Self {
            cfg: cfg.clone(),
            shared,
            blocks,
            final_norm: layers::rms_norm(dm, eps, enc.pp("final_layer_norm"))?,
            dtype: layers::compute_dtype(vb.dtype(), vb.device()),
        })
    }

    /// `[1, heads, L, L]` f32 position bias from block 0's table.
    fn position_bias(&self, l: usize, device: &Device) -> Result<Tensor> {
        let table = self.blocks[0].attn.relative_attention_bias.as_ref().expect("block 0 has the table");
        let (nb, md) = (self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance);
        let ids: Vec<u32> =
            (0..l).flat_map(|q| (0..l).map(move |k| relative_bucket(k as i64 - q as i64, nb, md) as u32)).collect();
        let ids = Tensor::from_vec(ids, l * l, device)?;
        let values = table.to_dtype(DType::F32)?.index_select(&ids, 0)?; // [L·L, heads]
        values.reshape((l, l, self.cfg.num_heads))?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()
    }

    /// Token ids `[B, L]` (u32) → `last_hidden_state` `[B, L, d_model]` in the compute dtype.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let mut x = self.shared.index_select(&ids.flatten_all()?, 0)?.to_dtype(self.dtype)?.reshape((
            b,
            l,
            self.cfg.d_model,
        ))?;
        let bias = self.position_bias(l, ids.device())?;
        for block in &self.blocks {
            x = (&x + block.attn.forward(&block.attn_norm.forward(&x)?, &bias)?)?;
            x = (&x + block.ff.forward(&block.ff_norm.forward(&x)?)?)?;
        }
        self.final_norm.forward(&x)
    }
}

/// T5 tokenizer from a HF `tokenizer.json` (SD3: `tokenizer_3/tokenizer.json`): adds `</s>`,
/// truncates to `max_length` (keeping `</s>`), pads with `<pad>` (id 0) to exactly
/// `max_length`, like `tokenizer(prompt, padding="max_length", max_length=…, truncation=True)`.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e}"))
}

impl T5Tokenizer {
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let path = path.as_ref();
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| tok_err(&format!("loading tokenizer {}", path.display()), e))?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| tok_err("tokenizer truncation", e))?;
        inner.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: "<pad>".into(),
            ..Default::default()
        }));
        Ok(Self { inner, max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids, exactly `max_length` of them.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(prompt, true).map_err(|e| tok_err("tokenizing", e))?;
        let ids = enc.get_ids().to_vec();
        if ids.len() != self.max_length {
            bail!("tokenizer gave {} ids, expected {}", ids.len(), self.max_length);
        }
        Ok(ids)
    }
}

/// T5 text embedding of one prompt string (computed once per prompt, cached per clip).
pub struct TextEncoder {
    pub model: T5Encoder,
    pub tokenizer: T5Tokenizer,
    device: Device,
}

impl TextEncoder {
    pub fn new(model: T5Encoder, tokenizer: T5Tokenizer, device: Device) -> Self {
        Self { model, tokenizer, device }
    }

    /// `[1, max_length, d_model]` embedding of `prompt` (DPIR's `_encode_prompt_with_t5`).
    pub fn embed(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let ids = Tensor::from_vec(ids, (1, self.tokenizer.max_length()), &self.device)?;
        self.model.forward(&ids)
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<TextEncoder>();
};

#[cfg(test)]
mod tests {
    use super::*;

    /// HF's buckets for a 32-bucket, 128-distance encoder (`_relative_position_bucket`,
    /// bidirectional), at the edges of its exact and logarithmic ranges.
    #[test]
    fn relative_buckets_are_hf_s() {
        let hf = [(-200, 15), (-128, 15), (-40, 12), (-9, 8), (-8, 8), (-7, 7), (-1, 1), (0, 0), (1, 17), (7, 23)];
        for (rel, bucket) in hf {
            assert_eq!(relative_bucket(rel, 32, 128), bucket, "relative position {rel}");
        }
        assert_eq!(relative_bucket(8, 32, 128), 24);
        assert_eq!(relative_bucket(300, 32, 128), 31);
    }
}
