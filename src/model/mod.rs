//! The DPIR model: pure candle, no GStreamer types.
//!
//! One file per model piece, candle-transformers style (`Config`, `new(cfg, vb)`, `forward`).

/// `anyhow::ensure!` for `candle_core::Result`, the model's one error style.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            candle_core::bail!($($arg)+)
        }
    };
}

pub mod autoencoder;
pub mod clip;
pub mod color_fix;
pub mod cpu;
pub mod dpir;
pub mod fusion;
pub mod layers;
pub mod loader;
pub mod memory;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod scheduler;
pub mod t5;
pub mod taesd;
pub mod tiling;
pub mod transformer;
pub mod vae;

/// A shared test-data folder named by an environment variable (`DPIR_FIXTURES`, `DPIR_WEIGHTS`,
/// `DPIR_MEDIA`; `tests/run` points them at `../shared`). Missing is a failure, never a skip.
#[cfg(test)]
pub(crate) fn test_data(var: &str) -> std::path::PathBuf {
    let p = std::env::var_os(var).map(std::path::PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with `bash tests/run`, which points it at ../shared")
    });
    assert!(p.is_dir(), "{var}={} is not a directory", p.display());
    p
}
