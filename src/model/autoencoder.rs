//! The interface shared by the two autoencoders (SD3 `AutoencoderKL`, TAESD3), so the pipeline
//! works in "model latent space" without knowing which one it drives.

use candle_core::{Result, Tensor};

use super::tiling::TileConfig;

/// Which LQ latent the sampler is conditioned on (the `lq-latent` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LqLatent {
    /// A posterior sample (what the official test script does).
    #[default]
    Sample,
    /// The posterior mean: deterministic.
    Mode,
}

/// How the LQ image's latent is drawn from a VAE posterior.
#[derive(Debug, Clone)]
pub enum LatentDraw {
    /// Posterior mean: deterministic (`denoise_vae_use_mode=True` in the official pipeline).
    Mode,
    /// `mean + std * noise`, with the given standard-normal noise shaped like the latent
    /// (what the official test script does).
    Sample(Tensor),
}

/// An image ⇄ latent codec. Images are NCHW in [-1, 1]; latents are in the space the
/// transformer sees (for `AutoencoderKL`: `(raw - shift) * scale`).
pub trait Autoencoder: Send + Sync {
    /// Encode an image to a model-space latent, in tiles (`tiles`) when it is larger than one.
    fn encode_latent(&self, image: &Tensor, draw: &LatentDraw, tiles: Option<TileConfig>) -> Result<Tensor>;
    /// Decode a model-space latent to an image in (roughly) [-1, 1], in tiles when larger than one.
    fn decode_latent(&self, latent: &Tensor, tiles: Option<TileConfig>) -> Result<Tensor>;
    /// Spatial downscale factor between image and latent (8 for SD3's VAEs).
    fn downscale(&self) -> usize;
    /// Latent channels (16 for SD3's VAEs).
    fn latent_channels(&self) -> usize;
}
