//! SD3's text encoder (`text_encoder_3`, HF `T5EncoderModel`, T5 v1.1) as DPIR calls it: the
//! model is candle-transformers' T5 encoder (HF semantics: no attention mask, so pad tokens are
//! attended to; unscaled attention logits; one relative-position table shared by all layers;
//! gated-GELU with the tanh approximation), the tokenizer HF `tokenizers` with SD3's padding.

use std::path::Path;

use anyhow::{Result, anyhow, ensure};
use candle_core::{Device, Tensor};
pub use candle_transformers::models::t5::{Config as T5Config, T5EncoderModel};

/// The T5 config of an HF `config.json` (SD3's `text_encoder_3/config.json`).
pub fn t5_config(v: &serde_json::Value) -> Result<T5Config> {
    serde_json::from_value(v.clone()).map_err(|e| anyhow!("T5 config: {e}"))
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
    device: Device,
}

impl TextEncoder {
    pub fn new(model: T5EncoderModel, tokenizer: T5Tokenizer, device: Device) -> Self {
        Self { model, tokenizer, device }
    }

    /// `[1, max_length, d_model]` embedding of `prompt` (DPIR's `_encode_prompt_with_t5`).
    pub fn embed(&mut self, prompt: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        let ids = Tensor::from_vec(ids, (1, self.tokenizer.max_length()), &self.device)?;
        Ok(self.model.forward(&ids)?)
    }
}

const _: () = {
    const fn send<T: Send>() {}
    send::<TextEncoder>();
};
