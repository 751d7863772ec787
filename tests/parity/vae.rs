//! `sd3_vae`: SD3 `AutoencoderKL` encode (posterior mean/std/logvar/sample), decode, and the
//! z_LQ normalisation. Also checks `debug_encoder_moments` (verbose only) and that the
//! `Autoencoder` trait path (tiling on, below one tile) gives the same z_LQ and decode.
use anyhow::{Result, ensure};
use gstdpir::model::autoencoder::{Autoencoder, LatentDraw};
use gstdpir::model::vae::{AutoencoderKl, AutoencoderKlConfig};

use crate::common::{Case, FLOAT, Produced, diff_stats, produced};

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let cfg: AutoencoderKlConfig = serde_json::from_value(case.library_config("vae")?.clone())?;
    let vae = AutoencoderKl::new(&cfg, case.var_builder("vae")?)?;
    let image = case.io_f32("image")?;
    let noise = case.io_f32("noise")?;
    let moments = vae.encode_moments(&image)?;
    let post = gstdpir::model::vae::Posterior::from_moments(&moments)?;
    let decoded = vae.decode(&case.io_f32("decode_latent")?)?;
    let z_mode = vae.to_model_latent(&post.mode()?)?;

    // The trait path must agree with the explicit one (tiling is a no-op at this size).
    let z_trait = vae.encode_latent(&image, &LatentDraw::Mode, Some(Default::default()))?;
    ensure!(diff_stats(&z_trait, &z_mode)?.0 == 0.0, "trait encode differs from encode()");
    let z_sample = vae.encode_latent(&image, &LatentDraw::Sample(noise.clone()), Some(Default::default()))?;
    let expect_sample = vae.to_model_latent(&post.sample(&noise)?)?;
    ensure!(diff_stats(&z_sample, &expect_sample)?.0 == 0.0, "trait sample differs");

    if std::env::var_os("DPIR_PARITY_VERBOSE").is_some()
        && let Ok(e) = case.io("debug_encoder_moments")
    {
        eprintln!("{}::debug_encoder_moments (debug): max |diff| = {:.3e}", case.name, diff_stats(&moments, &e)?.0);
    }
    Ok(vec![
        produced("posterior_mean", post.mean.clone(), FLOAT),
        produced("posterior_std", post.std.clone(), FLOAT),
        produced("posterior_logvar", post.logvar.clone(), FLOAT),
        produced("posterior_sample", post.sample(&noise)?, FLOAT),
        produced("decoded", decoded, FLOAT),
        produced("normalized_latent_mode", z_mode, FLOAT),
        produced("debug_encoder_moments", moments, FLOAT),
    ])
}
