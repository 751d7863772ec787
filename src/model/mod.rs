//! The DPIR model: pure candle, no GStreamer types.
//!
//! One file per model piece, candle-transformers style (`Config`, `new(cfg, vb)`, `forward`).

pub mod autoencoder;
pub mod clip;
pub mod color_fix;
pub mod cpu_ops;
pub mod loader;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod scheduler;
pub mod t5;
pub mod taesd;
pub mod tiling;
pub mod transformer;
pub mod vae;
