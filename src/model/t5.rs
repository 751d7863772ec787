//! T5 encoder (HF `T5EncoderModel`, v1.1 style as SD3's `text_encoder_3`) and its tokenizer.
//!
//! Own implementation instead of wrapping candle-transformers' `T5EncoderModel`: that one takes
//! `&mut self` (a decoder KV cache the encoder never uses), which would force a `Mutex` around
//! a 4.7 B-parameter model shared by the clip cache. This one is `&self`, `Send + Sync`, and
//! follows HF exactly as DPIR calls it: **no attention mask** (pad tokens are attended to),
//! unscaled attention logits, relative-position bias computed once (layer 0's table) and shared
//! by all layers, RMSNorm in f32 (eps from config), gated FF `wo(act(wi_0 x) · wi_1 x)`.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

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
    "gated-gelu".into()
}

/// The HF `T5Config` fields the encoder needs; extra keys are ignored.
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
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

impl T5Config {
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        serde_json::from_value(v.clone()).context("T5 config")
    }
}

#[derive(Debug, Clone, Copy)]
enum FfAct {
    Relu,
    GeluTanh,
    GeluErf,
    Silu,
}

impl FfAct {
    /// `feed_forward_proj` → (gated, activation), as transformers parses it
    /// (`gated-gelu` means `gelu_new`, the tanh approximation).
    fn parse(s: &str) -> Result<(bool, Self)> {
        let (gated, name) = match s.strip_prefix("gated-") {
            Some(n) => (true, n),
            None => (false, s),
        };
        let act = match (gated, name) {
            (_, "relu") => Self::Relu,
            (true, "gelu") | (_, "gelu_new") | (_, "gelu_pytorch_tanh") => Self::GeluTanh,
            (false, "gelu") => Self::GeluErf,
            (_, "silu") | (_, "swish") => Self::Silu,
            _ => bail!("unsupported T5 feed_forward_proj `{s}`"),
        };
        Ok((gated, act))
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::Silu => x.silu(),
        }
    }
}

/// T5's RMSNorm: no mean subtraction, no bias, computed in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self { weight: vb.get(size, "weight")?, eps })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dt = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        // HF casts back to the weight dtype before scaling.
        x.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)?.to_dtype(dt)
    }
}

struct Block {
    ln_attn: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln_ff: RmsNorm,
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
}

/// `T5EncoderModel`.
pub struct T5EncoderModel {
    cfg: T5Config,
    embed: Embedding,
    relative_attention_bias: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    act: FfAct,
    device: Device,
    dtype: DType,
}

impl T5EncoderModel {
    /// `vb` at the checkpoint root: `shared.weight` (or `encoder.embed_tokens.weight`),
    /// `encoder.block.N.layer.{0,1}.*`, `encoder.final_layer_norm.weight`.
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = FfAct::parse(&cfg.feed_forward_proj)?;
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let emb_name = if vb.contains_tensor("shared.weight") { "shared" } else { "encoder.embed_tokens" };
        let embed = candle_nn::embedding(cfg.vocab_size, d, vb.pp(emb_name))?;
        let enc = vb.pp("encoder");
        let relative_attention_bias = candle_nn::embedding(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = enc.pp(format!("block.{i}"));
            let sa = b.pp("layer.0.SelfAttention");
            let ff = b.pp("layer.1.DenseReluDense");
            let lin = |i, o, vb: VarBuilder| candle_nn::linear_no_bias(i, o, vb);
            let (wi_0, wi_1) = if gated {
                (lin(d, cfg.d_ff, ff.pp("wi_0"))?, Some(lin(d, cfg.d_ff, ff.pp("wi_1"))?))
            } else {
                (lin(d, cfg.d_ff, ff.pp("wi"))?, None)
            };
            blocks.push(Block {
                ln_attn: RmsNorm::new(d, cfg.layer_norm_epsilon, b.pp("layer.0.layer_norm"))?,
                q: lin(d, inner, sa.pp("q"))?,
                k: lin(d, inner, sa.pp("k"))?,
                v: lin(d, inner, sa.pp("v"))?,
                o: lin(inner, d, sa.pp("o"))?,
                ln_ff: RmsNorm::new(d, cfg.layer_norm_epsilon, b.pp("layer.1.layer_norm"))?,
                wi_0,
                wi_1,
                wo: lin(cfg.d_ff, d, ff.pp("wo"))?,
            });
        }
        Ok(Self {
            embed,
            relative_attention_bias,
            blocks,
            final_norm: RmsNorm::new(d, cfg.layer_norm_epsilon, enc.pp("final_layer_norm"))?,
            act,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// Output width (`d_model`: 4096 for T5-XXL).
    pub fn hidden_size(&self) -> usize {
        self.cfg.d_model
    }

    /// Bucket of a relative position `key − query` (HF `_relative_position_bucket`,
    /// bidirectional). The log-spaced part is computed in f32 as torch does, so boundary
    /// positions (16, 32, 64 with the defaults) land in the same bucket.
    pub fn relative_position_bucket(&self, rel: i64) -> usize {
        let nb = self.cfg.relative_attention_num_buckets / 2;
        let max_exact = nb / 2;
        let mut bucket = if rel > 0 { nb } else { 0 };
        let n = rel.unsigned_abs() as usize;
        bucket += if n < max_exact {
            n
        } else {
            let max_d = self.cfg.relative_attention_max_distance as f64;
            let denom = (max_d / max_exact as f64).ln() as f32;
            let v = ((n as f32 / max_exact as f32).ln() / denom * (nb - max_exact) as f32) as usize;
            (max_exact + v).min(nb - 1)
        };
        bucket
    }

    /// Position bias `[1, heads, q, k]`.
    fn position_bias(&self, len: usize) -> Result<Tensor> {
        let mut ids = Vec::with_capacity(len * len);
        for q in 0..len {
            for k in 0..len {
                ids.push(self.relative_position_bucket(k as i64 - q as i64) as u32);
            }
        }
        let ids = Tensor::from_vec(ids, (len, len), &self.device)?;
        Ok(self.relative_attention_bias.forward(&ids)?.permute((2, 0, 1))?.unsqueeze(0)?)
    }

    /// `input_ids [B, L]` (any integer dtype) → `last_hidden_state [B, L, d_model]`, no mask.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let ids = input_ids.to_device(&self.device)?.to_dtype(DType::U32)?;
        let (h, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let bias = self.position_bias(l)?.to_dtype(DType::F32)?;
        let mut xs = self.embed.forward(&ids)?;
        for blk in &self.blocks {
            let n = blk.ln_attn.forward(&xs)?;
            let split =
                |t: Tensor| -> candle_core::Result<Tensor> { t.reshape((b, l, h, dk))?.transpose(1, 2)?.contiguous() };
            let q = split(blk.q.forward(&n)?)?;
            let k = split(blk.k.forward(&n)?)?;
            let v = split(blk.v.forward(&n)?)?;
            // No 1/sqrt(d) scaling in T5; softmax in f32 (HF `scores.float()`).
            let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.broadcast_add(&bias)?;
            let att = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
            let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h * dk))?;
            xs = (xs + blk.o.forward(&o)?)?;
            let n = blk.ln_ff.forward(&xs)?;
            let mut f = self.act.apply(&blk.wi_0.forward(&n)?)?;
            if let Some(wi_1) = &blk.wi_1 {
                f = (f * wi_1.forward(&n)?)?;
            }
            xs = (xs + blk.wo.forward(&f)?)?;
        }
        Ok(self.final_norm.forward(&xs)?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// T5 tokenizer from a HF `tokenizer.json` (SD3: `tokenizer_3/tokenizer.json`): adds `</s>`,
/// truncates to `max_length` (keeping `</s>`), pads with `<pad>` (id 0) to exactly
/// `max_length`, like `tokenizer(prompt, padding="max_length", max_length=…, truncation=True)`.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    max_length: usize,
}

impl T5Tokenizer {
    pub fn from_file(path: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let path = path.as_ref();
        let mut inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| anyhow!("tokenizer truncation: {e}"))?;
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
        let enc = self.inner.encode(prompt, true).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let ids = enc.get_ids().to_vec();
        ensure!(ids.len() == self.max_length, "tokenizer gave {} ids, expected {}", ids.len(), self.max_length);
        Ok(ids)
    }
}

/// T5 text embedding of one prompt string (computed once per prompt, cached per clip).
pub struct TextEncoder {
    pub model: T5EncoderModel,
    pub tokenizer: T5Tokenizer,
}

impl TextEncoder {
    pub fn new(model: T5EncoderModel, tokenizer: T5Tokenizer) -> Self {
        Self { model, tokenizer }
    }

    /// `[1, max_length, d_model]` embedding of `prompt` (DPIR's `_encode_prompt_with_t5`).
    pub fn embed(&self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let ids = Tensor::from_vec(ids, (1, self.tokenizer.max_length()), &self.model.device)?;
        self.model.forward(&ids)
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<T5EncoderModel>();
    send_sync::<T5Tokenizer>();
    send_sync::<TextEncoder>();
};
