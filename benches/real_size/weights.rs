//! A DPIR model directory at the real widths with seeded random weights, in the layout
//! `weights/README.md` tells users to assemble (its `model.json` template, verbatim): what the
//! real-size benchmark (`benches/real_size.rs`) and the real-width test (`tests/real_size.rs`,
//! one or two layers per component) run on. Nothing of it is committed.
//!
//! Shapes are the published configs' (quoted in [`transformer_config`], [`vae_config`],
//! [`t5_config`], [`clip_b32_config`], [`clip_bigg_config`]); key names are diffusers' and HF
//! transformers' own (not this project's loader's: the files must load as real checkpoints do,
//! with their extra tensors, e.g. the CLIP B/32 text tower). Stored as the published files are:
//! the DPIR transformer in bf16, the SD3 VAE and T5-XXL (two shards) in f16, CLIP B/32 in f32,
//! bigG in f16. Each file is written tensor by tensor (a tensor's values are made when the file
//! writer asks for them), so the whole model is never in memory.
//!
//! Random values follow the parity fixtures' recipe (`../shared/fixtures/README.md` §2): weights
//! uniform with std 1/√fan_in, biases std 0.1, norm scales 1 ± std 0.1, seeded per tensor by its
//! name, so a file's bytes depend only on the seed and the shape.

#![allow(dead_code)]

use std::borrow::Cow;
use std::path::Path;

use anyhow::{Context, Result};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use safetensors::{Dtype, View};
use serde_json::{Value, json};

/// Layers per component (`full()`: the published model; the test uses one or two).
#[derive(Debug, Clone, Copy)]
pub struct Layers {
    pub transformer: usize,
    pub vae_per_block: usize,
    pub t5: usize,
    pub clip_b32: usize,
    pub clip_bigg: usize,
}

impl Layers {
    pub fn full() -> Self {
        Self { transformer: 24, vae_per_block: 2, t5: 24, clip_b32: 12, clip_bigg: 48 }
    }
    pub fn slim() -> Self {
        Self { transformer: 2, vae_per_block: 1, t5: 2, clip_b32: 1, clip_bigg: 1 }
    }
}

/// diffusers `stabilityai/stable-diffusion-3-medium-diffusers/transformer/config.json`.
pub fn transformer_config(layers: usize) -> Value {
    json!({"_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0.dev0",
        "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": layers, "out_channels": 16,
        "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128})
}

/// `…/vae/config.json`.
pub fn vae_config(layers_per_block: usize) -> Value {
    json!({"_class_name": "AutoencoderKL", "_diffusers_version": "0.29.0.dev0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null, "latents_std": null,
        "layers_per_block": layers_per_block, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 1.5305, "shift_factor": 0.0609,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "use_post_quant_conv": false, "use_quant_conv": false})
}

/// `…/text_encoder_3/config.json` (T5 v1.1 XXL encoder).
pub fn t5_config(layers: usize) -> Value {
    json!({"_name_or_path": "google/t5-v1_1-xxl", "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0, "d_ff": 10240, "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0, "is_encoder_decoder": true, "is_gated_act": true, "layer_norm_epsilon": 1e-06,
        "model_type": "t5", "num_decoder_layers": layers, "num_heads": 64, "num_layers": layers,
        "output_past": true, "pad_token_id": 0, "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": false, "torch_dtype": "float16",
        "use_cache": true, "vocab_size": 32128})
}

/// `openai/clip-vit-base-patch32/config.json` (a full `CLIPConfig`: text and vision).
pub fn clip_b32_config(layers: usize) -> Value {
    json!({"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
            "num_hidden_layers": layers, "max_position_embeddings": 77, "vocab_size": 49408,
            "hidden_act": "quick_gelu", "projection_dim": 512},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
            "num_hidden_layers": layers, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05, "projection_dim": 512}})
}

/// `laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`, vision tower as HF `CLIPVisionModelWithProjection`.
pub fn clip_bigg_config(layers: usize) -> Value {
    json!({"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "hidden_size": 1664, "intermediate_size": 8192, "num_attention_heads": 16, "num_hidden_layers": layers,
        "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
        "projection_dim": 1280, "num_channels": 3})
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Std 1/√fan_in.
    Weight(usize),
    Bias,
    /// 1 ± std 0.1 (norm scales).
    Scale,
    /// Std 0.1 (norm shifts).
    Shift,
    /// A given std (embeddings).
    Std(f32),
}

/// One tensor of a file, made when the writer asks for its bytes.
struct Lazy {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    init: Init,
    seed: u64,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(splitmix(seed), |h, b| splitmix(h ^ b as u64))
}

impl Lazy {
    fn values(&self) -> Vec<f32> {
        let n: usize = self.shape.iter().product();
        let (mean, std) = match self.init {
            Init::Weight(fan_in) => (0.0, 1.0 / (fan_in.max(1) as f32).sqrt()),
            Init::Bias | Init::Shift => (0.0, 0.1),
            Init::Scale => (1.0, 0.1),
            Init::Std(s) => (0.0, s),
        };
        // Uniform on ±√3·std: the std asked for, from one 64-bit draw per two values.
        let a = std * 3f32.sqrt();
        let mut v = vec![0f32; n];
        const CHUNK: usize = 1 << 16;
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let mut s = splitmix(self.seed ^ (c as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            for pair in out.chunks_mut(2) {
                s = splitmix(s);
                for (k, o) in pair.iter_mut().enumerate() {
                    let u = ((s >> (32 * k)) as u32) as f32 / u32::MAX as f32;
                    *o = mean + a * (2.0 * u - 1.0);
                }
            }
        });
        v
    }
}

impl View for &Lazy {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let v = self.values();
        Cow::Owned(match self.dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F16 => {
                let mut h = vec![half::f16::ZERO; v.len()];
                h.convert_from_f32_slice(&v);
                h.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            Dtype::BF16 => {
                let mut h = vec![half::bf16::ZERO; v.len()];
                h.convert_from_f32_slice(&v);
                h.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            other => panic!("no random {other:?} tensors"),
        })
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The tensors of one file, in the names and shapes of its checkpoint.
struct File {
    dtype: Dtype,
    seed: u64,
    tensors: Vec<Lazy>,
}

impl File {
    fn new(dtype: Dtype, seed: u64) -> Self {
        Self { dtype, seed, tensors: Vec::new() }
    }
    fn add(&mut self, name: &str, shape: &[usize], init: Init) {
        let seed = name_seed(self.seed, name);
        self.tensors.push(Lazy { name: name.into(), shape: shape.to_vec(), dtype: self.dtype, init, seed });
    }
    fn linear(&mut self, prefix: &str, out_f: usize, in_f: usize, bias: bool) {
        self.add(&format!("{prefix}.weight"), &[out_f, in_f], Init::Weight(in_f));
        if bias {
            self.add(&format!("{prefix}.bias"), &[out_f], Init::Bias);
        }
    }
    fn conv(&mut self, prefix: &str, out_c: usize, in_c: usize, k: usize, bias: bool) {
        self.add(&format!("{prefix}.weight"), &[out_c, in_c, k, k], Init::Weight(in_c * k * k));
        if bias {
            self.add(&format!("{prefix}.bias"), &[out_c], Init::Bias);
        }
    }
    fn norm(&mut self, prefix: &str, c: usize, bias: bool) {
        self.add(&format!("{prefix}.weight"), &[c], Init::Scale);
        if bias {
            self.add(&format!("{prefix}.bias"), &[c], Init::Shift);
        }
    }
    fn params(&self) -> u64 {
        self.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum()
    }
    fn write(&self, path: &Path) -> Result<u64> {
        std::fs::create_dir_all(path.parent().unwrap())?;
        safetensors::serialize_to_file(self.tensors.iter().map(|t| (t.name.clone(), t)), None, path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(std::fs::metadata(path)?.len())
    }
}

/// SD3-medium MMDiT + DPIR's `control_conv` (diffusers names).
fn transformer(layers: usize, seed: u64) -> File {
    let (d, ff) = (1536, 6144);
    let mut f = File::new(Dtype::BF16, seed);
    f.conv("pos_embed.proj", d, 16, 2, true);
    f.add("pos_embed.pos_embed", &[1, 192 * 192, d], Init::Std(0.02));
    f.linear("time_text_embed.timestep_embedder.linear_1", d, 256, true);
    f.linear("time_text_embed.timestep_embedder.linear_2", d, d, true);
    f.linear("time_text_embed.text_embedder.linear_1", d, 2048, true);
    f.linear("time_text_embed.text_embedder.linear_2", d, d, true);
    f.linear("context_embedder", d, 4096, true);
    for i in 0..layers {
        let b = format!("transformer_blocks.{i}");
        let last = i + 1 == layers;
        f.linear(&format!("{b}.norm1.linear"), 6 * d, d, true);
        f.linear(&format!("{b}.norm1_context.linear"), if last { 2 * d } else { 6 * d }, d, true);
        for n in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"] {
            f.linear(&format!("{b}.attn.{n}"), d, d, true);
        }
        let mut ffs = vec!["ff"];
        if !last {
            f.linear(&format!("{b}.attn.to_add_out"), d, d, true);
            ffs.push("ff_context");
        }
        for n in ffs {
            f.linear(&format!("{b}.{n}.net.0.proj"), ff, d, true);
            f.linear(&format!("{b}.{n}.net.2"), d, ff, true);
        }
    }
    f.linear("norm_out.linear", 2 * d, d, true);
    f.linear("proj_out", 2 * 2 * 16, d, true);
    f.conv("control_conv.0", 256, 16, 3, true);
    f.norm("control_conv.1", 256, true);
    f.conv("control_conv.2", 512, 256, 3, true);
    f.norm("control_conv.3", 512, true);
    f.conv("control_conv.4", d, 512, 3, true);
    f.norm("control_conv.5", d, true);
    f
}

fn resnet(f: &mut File, p: &str, cin: usize, cout: usize) {
    f.norm(&format!("{p}.norm1"), cin, true);
    f.conv(&format!("{p}.conv1"), cout, cin, 3, true);
    f.norm(&format!("{p}.norm2"), cout, true);
    f.conv(&format!("{p}.conv2"), cout, cout, 3, true);
    if cin != cout {
        f.conv(&format!("{p}.conv_shortcut"), cout, cin, 1, true);
    }
}

fn mid_block(f: &mut File, p: &str, c: usize) {
    resnet(f, &format!("{p}.resnets.0"), c, c);
    f.norm(&format!("{p}.attentions.0.group_norm"), c, true);
    for n in ["to_q", "to_k", "to_v", "to_out.0"] {
        f.linear(&format!("{p}.attentions.0.{n}"), c, c, true);
    }
    resnet(f, &format!("{p}.resnets.1"), c, c);
}

/// SD3's `AutoencoderKL` (diffusers names).
fn vae(layers: usize, seed: u64) -> File {
    let ch = [128, 256, 512, 512];
    let mut f = File::new(Dtype::F16, seed);
    f.conv("encoder.conv_in", ch[0], 3, 3, true);
    let mut cin = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..layers {
            resnet(&mut f, &format!("encoder.down_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { c }, c);
        }
        if i + 1 < ch.len() {
            f.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), c, c, 3, true);
        }
        cin = c;
    }
    mid_block(&mut f, "encoder.mid_block", 512);
    f.norm("encoder.conv_norm_out", 512, true);
    f.conv("encoder.conv_out", 32, 512, 3, true);
    f.conv("decoder.conv_in", 512, 16, 3, true);
    mid_block(&mut f, "decoder.mid_block", 512);
    let rev = [512, 512, 256, 128];
    let mut cin = 512;
    for (i, &c) in rev.iter().enumerate() {
        for j in 0..layers + 1 {
            resnet(&mut f, &format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { cin } else { c }, c);
        }
        if i + 1 < rev.len() {
            f.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), c, c, 3, true);
        }
        cin = c;
    }
    f.norm("decoder.conv_norm_out", 128, true);
    f.conv("decoder.conv_out", 3, 128, 3, true);
    f
}

/// T5 v1.1 XXL encoder (HF names) in two shards: the embedding and the first half of the
/// blocks, then the rest.
fn t5(layers: usize, seed: u64) -> [File; 2] {
    let (d, ff, inner) = (4096, 10240, 64 * 64);
    let mut shards = [File::new(Dtype::F16, seed), File::new(Dtype::F16, seed)];
    shards[0].add("shared.weight", &[32128, d], Init::Std(1.0));
    for i in 0..layers {
        let f = &mut shards[usize::from(i >= layers.div_ceil(2))];
        let b = format!("encoder.block.{i}.layer");
        for n in ["q", "k", "v"] {
            f.linear(&format!("{b}.0.SelfAttention.{n}"), inner, d, false);
        }
        f.linear(&format!("{b}.0.SelfAttention.o"), d, inner, false);
        if i == 0 {
            f.add(&format!("{b}.0.SelfAttention.relative_attention_bias.weight"), &[32, 64], Init::Std(0.1));
        }
        f.norm(&format!("{b}.0.layer_norm"), d, false);
        f.linear(&format!("{b}.1.DenseReluDense.wi_0"), ff, d, false);
        f.linear(&format!("{b}.1.DenseReluDense.wi_1"), ff, d, false);
        f.linear(&format!("{b}.1.DenseReluDense.wo"), d, ff, false);
        f.norm(&format!("{b}.1.layer_norm"), d, false);
    }
    shards[1].norm("encoder.final_layer_norm", d, false);
    shards
}

fn clip_encoder(f: &mut File, p: &str, layers: usize, h: usize, inter: usize) {
    for i in 0..layers {
        let l = format!("{p}.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            f.linear(&format!("{l}.self_attn.{n}"), h, h, true);
        }
        f.norm(&format!("{l}.layer_norm1"), h, true);
        f.linear(&format!("{l}.mlp.fc1"), inter, h, true);
        f.linear(&format!("{l}.mlp.fc2"), h, inter, true);
        f.norm(&format!("{l}.layer_norm2"), h, true);
    }
}

fn clip_vision(f: &mut File, layers: usize, h: usize, inter: usize, patch: usize, proj: usize) {
    let positions = (224 / patch).pow(2) + 1;
    f.add("vision_model.embeddings.class_embedding", &[h], Init::Std(1.0));
    f.conv("vision_model.embeddings.patch_embedding", h, 3, patch, false);
    f.add("vision_model.embeddings.position_embedding.weight", &[positions, h], Init::Std(0.02));
    f.norm("vision_model.pre_layrnorm", h, true);
    clip_encoder(f, "vision_model", layers, h, inter);
    f.norm("vision_model.post_layernorm", h, true);
    f.linear("visual_projection", proj, h, false);
}

/// OpenAI CLIP ViT-B/32 (`CLIPModel`: the text tower is in the file too, as in the real one).
fn clip_b32(layers: usize, seed: u64) -> File {
    let mut f = File::new(Dtype::F32, seed);
    clip_vision(&mut f, layers, 768, 3072, 32, 512);
    f.add("text_model.embeddings.token_embedding.weight", &[49408, 512], Init::Std(0.02));
    f.add("text_model.embeddings.position_embedding.weight", &[77, 512], Init::Std(0.01));
    clip_encoder(&mut f, "text_model", layers, 512, 2048);
    f.norm("text_model.final_layer_norm", 512, true);
    f.linear("text_projection", 512, 512, false);
    f.add("logit_scale", &[], Init::Std(0.0));
    f
}

/// OpenCLIP ViT-bigG/14's vision tower in HF `CLIPVisionModelWithProjection` names.
fn clip_bigg(layers: usize, seed: u64) -> File {
    let mut f = File::new(Dtype::F16, seed);
    clip_vision(&mut f, layers, 1664, 8192, 14, 1280);
    f
}

/// The JSON block of `weights/README.md` that starts with `{` and names `"format"`.
pub fn readme_template(readme: &str) -> Result<String> {
    let mut in_block = false;
    let mut block = String::new();
    for line in readme.lines() {
        if line.trim_start().starts_with("```json") {
            in_block = true;
            block.clear();
            continue;
        }
        if in_block && line.trim_start().starts_with("```") {
            if block.contains("\"format\"") {
                return Ok(block);
            }
            in_block = false;
            continue;
        }
        if in_block {
            block.push_str(line);
            block.push('\n');
        }
    }
    anyhow::bail!("weights/README.md has no model.json template (a ```json block with \"format\")")
}

/// What was written.
#[derive(Debug, Default)]
pub struct Written {
    /// (component, parameters, bytes on disk)
    pub components: Vec<(&'static str, u64, u64)>,
}

impl Written {
    pub fn bytes(&self) -> u64 {
        self.components.iter().map(|c| c.2).sum()
    }
    pub fn params(&self) -> u64 {
        self.components.iter().map(|c| c.1).sum()
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, serde_json::to_string_pretty(v)?)?;
    Ok(())
}

/// Writes the model directory: every component in the template's paths, then `model.json` =
/// `template`. `tokenizer_json`: the T5 tokenizer file to install (SD3's `tokenizer_3` is not
/// available offline; the parity fixtures' T5 tokenizer has the same format and id layout).
pub fn write_model_dir(
    dir: &Path,
    layers: Layers,
    seed: u64,
    template: &str,
    tokenizer_json: &Path,
) -> Result<Written> {
    let manifest: Value = serde_json::from_str(template).context("the model.json template is not JSON")?;
    let path = |ptr: &str| -> Result<std::path::PathBuf> {
        let rel = manifest.pointer(ptr).and_then(Value::as_str).with_context(|| format!("template has no {ptr}"))?;
        Ok(dir.join(rel))
    };
    let mut w = Written::default();
    let mut put = |name: &'static str, f: &File, p: std::path::PathBuf| -> Result<()> {
        let bytes = f.write(&p)?;
        w.components.push((name, f.params(), bytes));
        Ok(())
    };
    write_json(&path("/transformer/config")?, &transformer_config(layers.transformer))?;
    put("transformer (bf16)", &transformer(layers.transformer, seed), path("/transformer/weights/0")?)?;
    write_json(&path("/vae/config")?, &vae_config(layers.vae_per_block))?;
    put("SD3 VAE (f16)", &vae(layers.vae_per_block, seed + 1), path("/vae/weights/0")?)?;
    write_json(&path("/image_encoder_one/config")?, &clip_b32_config(layers.clip_b32))?;
    put(
        "CLIP ViT-B/32, text tower included (f32)",
        &clip_b32(layers.clip_b32, seed + 2),
        path("/image_encoder_one/weights/0")?,
    )?;
    write_json(&path("/image_encoder_two/config")?, &clip_bigg_config(layers.clip_bigg))?;
    put(
        "OpenCLIP ViT-bigG/14 vision (f16)",
        &clip_bigg(layers.clip_bigg, seed + 3),
        path("/image_encoder_two/weights/0")?,
    )?;
    write_json(&path("/text_encoder/config")?, &t5_config(layers.t5))?;
    let shards = t5(layers.t5, seed + 4);
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let p = path(&format!("/text_encoder/weights/{k}"))?;
        for t in &shard.tensors {
            weight_map.insert(t.name.clone(), json!(p.file_name().unwrap().to_string_lossy()));
        }
        put(if k == 0 { "T5-XXL encoder shard 1 (f16)" } else { "T5-XXL encoder shard 2 (f16)" }, shard, p)?;
    }
    // HF's shard index, as the real folder has it (the loader reads the shards the manifest lists).
    let index = path("/text_encoder/weights/0")?.with_file_name("model.safetensors.index.json");
    write_json(&index, &json!({"metadata": {}, "weight_map": weight_map}))?;
    let tok = path("/text_encoder/tokenizer")?;
    std::fs::create_dir_all(tok.parent().unwrap())?;
    std::fs::copy(tokenizer_json, &tok).with_context(|| format!("copying {}", tokenizer_json.display()))?;
    std::fs::write(dir.join("model.json"), template)?;
    Ok(w)
}
