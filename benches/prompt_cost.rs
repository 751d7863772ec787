//! Cost split of DPIR's dual prompt for one frame, with the tiny fixture towers
//! (`$DPIR_FIXTURES/prompt_assembly_multitile`: 1100×1040 global image → 4 tiles, 128×128 patch).
//! Shows what the clip cache saves: T5 (per prompt) and global tiles (per key frame) versus the
//! local patch (per frame). Run: `cargo bench --bench prompt_cost`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use gstdpir::model::clip::{ClipVisionConfig, ClipVisionModel};
use gstdpir::model::preprocess::RgbImage;
use gstdpir::model::prompt::{ImagePromptEncoder, PromptConfig, assemble};
use gstdpir::model::t5::{T5Config, T5Encoder, T5Tokenizer, TextEncoder};
use serde_json::Value;

fn median<T>(n: usize, mut f: impl FnMut() -> candle_core::Result<T>) -> Result<Duration> {
    f()?; // warm-up
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed())
        })
        .collect::<candle_core::Result<_>>()?;
    v.sort();
    Ok(v[n / 2])
}

fn main() -> Result<()> {
    let root = std::env::var_os("DPIR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    let dir = root.join("prompt_assembly_multitile");
    let cfg: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).context("fixture config")?)?;
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
    let dev = Device::Cpu;
    let vb = |c: &str| -> Result<VarBuilder<'static>> {
        let p = dir.join(cfg["weight_files"][c].as_str().context("weight file")?);
        Ok(unsafe { VarBuilder::from_mmaped_safetensors(&[p], DType::F32, &dev)? })
    };
    let lc = |c: &str| &cfg["library_configs"][c];
    let tower = |c: &str| -> Result<ClipVisionModel> {
        Ok(ClipVisionModel::new(&ClipVisionConfig::from_json(lc(c))?, vb(c)?)?)
    };
    let image =
        ImagePromptEncoder::new(tower("image_encoder_one")?, tower("image_encoder_two")?, PromptConfig::default())?;
    let t5: T5Config = serde_json::from_value(lc("text_encoder_three").clone())?;
    let text = TextEncoder::new(
        T5Encoder::new(&t5, vb("text_encoder_three")?)?,
        T5Tokenizer::from_file(dir.join(cfg["tokenizer_files"]["tokenizer_json"].as_str().unwrap_or_default()), 256)?,
        Device::Cpu,
    );
    let prompt = cfg["prompt"].as_str().unwrap_or_default();
    let global = RgbImage::from_hwc_tensor(&io["global_image_uint8"])?;
    let patch = RgbImage::from_hwc_tensor(&io["patch_image_uint8"])?;
    let n = 21;

    let t_text = median(n, || text.embed(prompt))?;
    let t_global = median(n, || image.global_prompt(&global))?;
    let t_local = median(n, || image.local_prompt(&patch))?;
    // Of which CPU pre-processing (crop, PIL-exact bicubic resize, normalise).
    let pre = &image.preprocess;
    let t_pre_global = median(n, || image.global_pixel_values(&global))?;
    let t_pre_local = median(n, || pre.pixel_values(&[&patch], &dev))?;
    let (t5, g, l) = (text.embed(prompt)?, image.global_prompt(&global)?, image.local_prompt(&patch)?);
    let t_asm = median(n, || assemble(&l, &g, &t5, 77))?;
    let total = t_text + t_global + t_local + t_asm;
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64();
    println!("dual prompt, one frame, tiny towers, CPU, median of {n}:");
    println!(
        "  T5 text (256 tokens)          {:>9.3} ms  {:>5.1} %  per prompt string",
        t_text.as_secs_f64() * 1e3,
        pct(t_text)
    );
    println!(
        "  global tiles ({} x 1024 px)    {:>9.3} ms  {:>5.1} %  per key frame",
        g.tiles.len(),
        t_global.as_secs_f64() * 1e3,
        pct(t_global)
    );
    println!("    of which pre-processing       {:>9.3} ms", t_pre_global.as_secs_f64() * 1e3);
    println!(
        "  local patch ({}x{})          {:>9.3} ms  {:>5.1} %  per frame",
        patch.width,
        patch.height,
        t_local.as_secs_f64() * 1e3,
        pct(t_local)
    );
    println!("    of which pre-processing       {:>9.3} ms", t_pre_local.as_secs_f64() * 1e3);
    println!("  assembly                      {:>9.3} ms  {:>5.1} %  per frame", t_asm.as_secs_f64() * 1e3, pct(t_asm));
    println!(
        "  cached frame (local + assembly) {:.3} ms of {:.3} ms uncached",
        (t_local + t_asm).as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
    Ok(())
}
