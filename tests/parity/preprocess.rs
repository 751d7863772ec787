//! `clip_preprocess`: the default CLIPImageProcessor, PIL path and channels-first tile path.
use anyhow::Result;
use candle_core::Device;
use gstdpir::model::preprocess::{ClipPreprocessConfig, RgbImage};

use crate::common::{Case, Produced, Tol, produced};

/// The processor settings from `library_config` (defaults where absent).
fn config(case: &Case) -> Result<ClipPreprocessConfig> {
    let lc = case.library_config("clip_image_processor")?;
    let mut c = ClipPreprocessConfig::default();
    if let Some(s) = lc.pointer("/size/shortest_edge").and_then(|v| v.as_u64()) {
        c.shortest_edge = s as usize;
    }
    if let Some(s) = lc.pointer("/crop_size/height").and_then(|v| v.as_u64()) {
        c.crop_height = s as usize;
    }
    if let Some(s) = lc.pointer("/crop_size/width").and_then(|v| v.as_u64()) {
        c.crop_width = s as usize;
    }
    if let Some(s) = lc.get("rescale_factor").and_then(|v| v.as_f64()) {
        c.rescale_factor = s;
    }
    for (key, dst) in [("image_mean", &mut c.mean), ("image_std", &mut c.std)] {
        if let Some(a) = lc.get(key).and_then(|v| v.as_array()) {
            for (d, v) in dst.iter_mut().zip(a) {
                *d = v.as_f64().unwrap_or(*d as f64) as f32;
            }
        }
    }
    Ok(c)
}

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let cfg = config(case)?;
    let mut out = Vec::new();
    // Both paths take the same uint8 RGB pixels; the tile path's (3,h,w) layout is only a
    // different view of them (bit-identical results, fixture README §3.4).
    for prefix in ["pil", "tile"] {
        let img = RgbImage::from_hwc_tensor(&case.io(&format!("{prefix}_image_uint8"))?)?;
        let resized = cfg.resize(&img)?;
        out.push(produced(&format!("{prefix}_resized_uint8"), resized.to_hwc_tensor(&Device::Cpu)?, Tol::Exact));
        let px = cfg.pixel_values(&[&img], &Device::Cpu)?;
        out.push(produced(&format!("{prefix}_pixel_values"), px, Tol::Abs(1e-6)));
    }
    Ok(out)
}
