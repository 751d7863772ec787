//! `clip_vision_b32`, `clip_vision_bigg`: one CLIP vision tower with projection.
use anyhow::{Context, Result};
use gstdpir::model::clip::{ClipVisionConfig, ClipVisionModel};

use crate::common::{Case, FLOAT, Produced, produced};

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    // The component name is the one key of `weight_files` (image_encoder_one / _two).
    let component = case
        .cfg("/weight_files")?
        .as_object()
        .and_then(|m| m.keys().next().cloned())
        .context("weight_files is empty")?;
    let cfg = ClipVisionConfig::from_json(case.library_config(&component)?)?;
    let model = ClipVisionModel::new(&cfg, case.var_builder(&component)?)?;
    let out = model.forward(&case.io_f32("pixel_values")?)?;
    Ok(vec![
        produced("last_hidden_state", out.last_hidden_state, FLOAT),
        produced("image_embeds", out.image_embeds, FLOAT),
        produced("debug_pooled_post_layernorm", out.pooled, FLOAT),
    ])
}
