//! `taesd3`: real TAESD3 weights (bf16 on disk, run in f32 as the reference does):
//! `latent = Encoder(image_in_0_1)`, `decoded_unclamped = Decoder(latent)`.
//! Also checks the `Autoencoder` trait's [-1, 1] image convention against the same data.
use anyhow::{Result, ensure};
use gstdpir::model::autoencoder::{Autoencoder, LatentDraw};
use gstdpir::model::taesd::{Taesd, TaesdConfig};

use crate::common::{Case, FLOAT, Produced, diff_stats, produced};

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    // No library config in this case: TAESD3's shape is the default; check it against the
    // latent the fixture stores.
    let cfg = TaesdConfig::default();
    let taesd = Taesd::new(&cfg, Some(case.var_builder("encoder")?), Some(case.var_builder("decoder")?))?;
    let x = case.io_f32("image_in_0_1")?;
    let latent = taesd.encode(&x)?;
    // The decoder is fed the stored latent so its check is independent of the encoder.
    let decoded = taesd.decode(&case.io_f32("latent")?)?;

    let x_pm1 = ((&x * 2.0)? - 1.0)?;
    let z_trait = taesd.encode_latent(&x_pm1, &LatentDraw::Mode, Some(Default::default()))?;
    ensure!(diff_stats(&z_trait, &latent)?.0 < 1e-5, "trait encode differs");
    let d_trait = ((taesd.decode_latent(&case.io_f32("latent")?, Some(Default::default()))? + 1.0)? * 0.5)?;
    ensure!(diff_stats(&d_trait, &decoded)?.0 < 1e-5, "trait decode differs");

    Ok(vec![produced("latent", latent, FLOAT), produced("decoded_unclamped", decoded, FLOAT)])
}
