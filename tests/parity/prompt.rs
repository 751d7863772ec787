//! `prompt_assembly_*`: local + global CLIP tokens, tiling (reference mode), T5, assembly.
//! Also usable for `pipeline_e2e`'s prompt outputs: with no `global_image_uint8` in the case,
//! the LQ (`lq_image_uint8`) is both the global image and the local patch, as DPIR's test script.
use anyhow::{Result, ensure};
use candle_core::{Device, Tensor};
use gstdpir::model::clip::{ClipVisionConfig, ClipVisionModel};
use gstdpir::model::preprocess::RgbImage;
use gstdpir::model::prompt::{ImagePromptEncoder, PromptConfig, TilingMode, assemble};
use gstdpir::model::t5::{T5Config, T5Encoder, T5Tokenizer, TextEncoder};

use crate::common::{Case, FLOAT, Produced, T5_FLOAT, Tol, produced};

/// An integer from config.json, or `default` when the case does not state it.
fn usize_or(case: &Case, ptr: &str, default: usize) -> usize {
    case.config.pointer(ptr).and_then(|v| v.as_u64()).map_or(default, |v| v as usize)
}

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let tower = |name: &str| -> Result<ClipVisionModel> {
        Ok(ClipVisionModel::new(&ClipVisionConfig::from_json(case.library_config(name)?)?, case.var_builder(name)?)?)
    };
    let d = PromptConfig::default();
    let cfg = PromptConfig {
        tile_size: usize_or(case, "/call/tile_size", d.tile_size),
        tile_stride: usize_or(case, "/call/tile_stride", d.tile_stride),
        clip_tokens: usize_or(case, "/call/clip_max_length", d.clip_tokens),
        tiling: TilingMode::Reference,
    };
    let image = ImagePromptEncoder::new(tower("image_encoder_one")?, tower("image_encoder_two")?, cfg)?;

    let t5_len = case.io("t5_input_ids")?.dim(1)?;
    let prompt = case.cfg("/prompt")?.as_str().unwrap_or_default().to_string();
    crate::t5::check_tokenizer(case, std::slice::from_ref(&prompt), "t5_input_ids")?;
    let rel = case.cfg("/tokenizer_files/tokenizer_json")?.as_str().unwrap_or_default();
    let t5cfg: T5Config = serde_json::from_value(case.library_config("text_encoder_three")?.clone())?;
    let text = TextEncoder::new(
        T5Encoder::new(&t5cfg, case.var_builder("text_encoder_three")?)?,
        T5Tokenizer::from_file(case.dir.join(rel), t5_len)?,
        Device::Cpu,
    );

    let lq_case = !case.io.contains_key("global_image_uint8");
    let (global, patch) = if lq_case {
        let lq = RgbImage::from_hwc_tensor(&case.io("lq_image_uint8")?)?;
        (lq.clone(), lq)
    } else {
        (
            RgbImage::from_hwc_tensor(&case.io("global_image_uint8")?)?,
            RgbImage::from_hwc_tensor(&case.io("patch_image_uint8")?)?,
        )
    };
    // Three separate calls, as the clip cache makes them.
    let t5 = text.embed(&prompt)?;
    let g = image.global_prompt(&global)?;
    let l = image.local_prompt(&patch)?;
    let pe = assemble(&l, &g, &t5, image.config.clip_tokens)?;
    let n_tiles = case.io("tile_boxes_raw")?.dim(0)?;
    ensure!(g.tiles.len() == n_tiles, "{} tiles, expected {n_tiles}", g.tiles.len());

    let boxes = |eff: bool| -> Result<Tensor> {
        let v: Vec<i64> = g
            .tiles
            .iter()
            .flat_map(|t| {
                let b = if eff { t.effective } else { t.raw };
                [b.h0, b.h1, b.w0, b.w1]
            })
            .collect();
        Ok(Tensor::from_vec(v, (g.tiles.len(), 4), &Device::Cpu)?)
    };
    Ok(vec![
        produced("prompt_embeds", pe.prompt_embeds, T5_FLOAT),
        produced("pooled_prompt_embeds", pe.pooled, FLOAT),
        produced("tile_boxes_raw", boxes(false)?, Tol::Exact),
        produced("tile_boxes_effective", boxes(true)?, Tol::Exact),
        produced("debug_local_last_hidden_state", l.tokens, FLOAT),
        produced("debug_local_image_embeds_two", l.image_embeds_two, FLOAT),
        produced("debug_tile_cls_one", g.cls_one, FLOAT),
        produced("debug_tile_image_embeds_two", g.image_embeds_two, FLOAT),
        produced("debug_t5_last_hidden_state", t5, T5_FLOAT),
    ])
}
