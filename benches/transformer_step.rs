//! Cost of one DPIR transformer call (one sampling step) and of the once-per-image control
//! branch, with random weights of an SD3-shaped configuration (no checkpoint needed).
//!
//! `cargo bench --bench transformer_step` runs a reduced width/depth that fits a CPU run;
//! environment overrides: `DPIR_BENCH_LAYERS` (24 for SD3-medium), `DPIR_BENCH_HEADS` (24),
//! `DPIR_BENCH_LATENT` (latent side, 128 = 1024 px), `DPIR_BENCH_ITERS`, `DPIR_BENCH_DTYPE`
//! (f32/f16/bf16), `DPIR_BENCH_CTX` (context tokens, 333), `DPIR_BENCH_CUDA=1` (with
//! `--features cuda`). SD3-medium at 1024×1024, as `tests/gpu/run.sh` runs it:
//! `DPIR_BENCH_LAYERS=24 DPIR_BENCH_HEADS=24 DPIR_BENCH_LATENT=128 DPIR_BENCH_DTYPE=bf16 DPIR_BENCH_CUDA=1`.
//! The last line, `RESULT impl=candle ...`, is what that script reads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use gstdpir::model::transformer::{DpirTransformer, DpirTransformerConfig};

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Random weights under the diffusers key names (std 1/sqrt(fan_in), as the fixtures).
fn random_weights(cfg: &DpirTransformerConfig, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let inner = cfg.inner_dim();
    let p = cfg.patch_size;
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize]| -> Result<()> {
        let fan_in: usize = if shape.len() > 1 { shape[1..].iter().product() } else { 1 };
        let std = if shape.len() > 1 { 1.0 / (fan_in as f64).sqrt() } else { 0.1 };
        let t = Tensor::randn(0f32, std as f32, shape, dev)?;
        w.insert(name, t);
        Ok(())
    };
    let lin = |put: &mut dyn FnMut(String, &[usize]) -> Result<()>, n: &str, o: usize, i: usize| -> Result<()> {
        put(format!("{n}.weight"), &[o, i])?;
        put(format!("{n}.bias"), &[o])
    };
    put("pos_embed.proj.weight".into(), &[inner, cfg.in_channels, p, p])?;
    put("pos_embed.proj.bias".into(), &[inner])?;
    let m = cfg.pos_embed_max_size;
    put("pos_embed.pos_embed".into(), &[1, m * m, inner])?;
    lin(&mut put, "time_text_embed.timestep_embedder.linear_1", inner, 256)?;
    lin(&mut put, "time_text_embed.timestep_embedder.linear_2", inner, inner)?;
    lin(&mut put, "time_text_embed.text_embedder.linear_1", inner, cfg.pooled_projection_dim)?;
    lin(&mut put, "time_text_embed.text_embedder.linear_2", inner, inner)?;
    lin(&mut put, "context_embedder", inner, cfg.joint_attention_dim)?;
    for i in 0..cfg.num_layers {
        let last = i + 1 == cfg.num_layers;
        let b = format!("transformer_blocks.{i}");
        lin(&mut put, &format!("{b}.norm1.linear"), 6 * inner, inner)?;
        lin(&mut put, &format!("{b}.norm1_context.linear"), if last { 2 } else { 6 } * inner, inner)?;
        for n in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"] {
            lin(&mut put, &format!("{b}.attn.{n}"), inner, inner)?;
        }
        let mut ffs = vec!["ff"];
        if !last {
            lin(&mut put, &format!("{b}.attn.to_add_out"), inner, inner)?;
            ffs.push("ff_context");
        }
        for f in ffs {
            lin(&mut put, &format!("{b}.{f}.net.0.proj"), 4 * inner, inner)?;
            lin(&mut put, &format!("{b}.{f}.net.2"), inner, 4 * inner)?;
        }
    }
    lin(&mut put, "norm_out.linear", 2 * inner, inner)?;
    lin(&mut put, "proj_out", p * p * cfg.out_channels, inner)?;
    for (i, (o, c)) in [(256, cfg.in_channels), (512, 256), (inner, 512)].into_iter().enumerate() {
        put(format!("control_conv.{}.weight", 2 * i), &[o, c, 3, 3])?;
        put(format!("control_conv.{}.bias", 2 * i), &[o])?;
        put(format!("control_conv.{}.weight", 2 * i + 1), &[o])?;
        put(format!("control_conv.{}.bias", 2 * i + 1), &[o])?;
    }
    Ok(w)
}

/// FLOPs of one transformer call (2 × multiply-adds of the matmuls and attention; the same count
/// as `tests/gpu/sd3_step.py`). The last block is `context_pre_only`: Q/K/V only on the context.
fn step_flops(layers: usize, d: usize, n_img: usize, n_ctx: usize, joint: usize, in_ch: usize, out_ch: usize) -> f64 {
    let (d, n_img, n_ctx) = (d as f64, n_img as f64, n_ctx as f64);
    let n = n_img + n_ctx;
    let proj = |t: f64| 2.0 * t * d * d;
    let ff = |t: f64| 2.0 * (2.0 * t * d * 4.0 * d);
    let attn = 2.0 * (2.0 * n * n * d);
    let full = 4.0 * proj(n) + ff(n) + attn;
    let last = 4.0 * proj(n_img) + ff(n_img) + 3.0 * proj(n_ctx) + attn;
    let mut total = (layers as f64 - 1.0) * full + last;
    total += 2.0 * n_img * (in_ch * 4) as f64 * d; // patch embedding (2×2)
    total += 2.0 * n_ctx * joint as f64 * d; // context embedder
    total += 2.0 * n_img * d * (4 * out_ch) as f64; // proj_out
    total
}

fn median(n: usize, dev: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<Duration> {
    f()?;
    dev.synchronize()?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let _ = f()?;
        dev.synchronize()?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v[n / 2])
}

fn main() -> Result<()> {
    let dev = if std::env::var("DPIR_BENCH_CUDA").is_ok_and(|v| v == "1") { Device::new_cuda(0)? } else { Device::Cpu };
    let dtype = match std::env::var("DPIR_BENCH_DTYPE").as_deref() {
        Ok("f16") => DType::F16,
        Ok("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let mut cfg = DpirTransformerConfig::sd3_medium();
    cfg.num_layers = env_usize("DPIR_BENCH_LAYERS", 2);
    cfg.num_attention_heads = env_usize("DPIR_BENCH_HEADS", 8);
    cfg.caption_projection_dim = cfg.inner_dim();
    let side = env_usize("DPIR_BENCH_LATENT", 64);
    let iters = env_usize("DPIR_BENCH_ITERS", 3);
    let ctx_len = env_usize("DPIR_BENCH_CTX", 333);

    let weights = random_weights(&cfg, &dev)?;
    let vb = VarBuilder::from_tensors(weights, dtype, &dev);
    let model = DpirTransformer::new(&cfg, vb)?;
    let x = Tensor::randn(0f32, 1., (1, cfg.in_channels, side, side), &dev)?.to_dtype(dtype)?;
    let z = Tensor::randn(0f32, 1., (1, cfg.in_channels, side, side), &dev)?.to_dtype(dtype)?;
    let ctx = Tensor::randn(0f32, 1., (1, ctx_len, cfg.joint_attention_dim), &dev)?.to_dtype(dtype)?;
    let pooled = Tensor::randn(0f32, 1., (1, cfg.pooled_projection_dim), &dev)?.to_dtype(dtype)?;
    let t = Tensor::new(&[857.6923f32], &dev)?;

    let control = model.control_features(&z)?;
    // tests/gpu/peakmem.py: the measured phase starts (the f32 weights made above are freed).
    println!("PEAKMEM RESET");
    let c_time = median(iters, &dev, || Ok(model.control_features(&z)?))?;
    let s_time = median(iters, &dev, || Ok(model.forward_with_control(&x, &control, &ctx, &pooled, &t)?))?;
    println!(
        "DPIR transformer: {} layers × {} wide, latent {side}×{side} ({} image + {ctx_len} context tokens), {dtype:?} on {:?}",
        cfg.num_layers,
        cfg.inner_dim(),
        (side / 2) * (side / 2),
        dev.location()
    );
    println!("  control branch (once per image): {:>9.1} ms", c_time.as_secs_f64() * 1e3);
    println!("  transformer step (per step)    : {:>9.1} ms", s_time.as_secs_f64() * 1e3);
    let per_layer = s_time.as_secs_f64() / cfg.num_layers as f64;
    println!("  per layer                      : {:>9.1} ms", per_layer * 1e3);
    let n_img = (side / cfg.patch_size) * (side / cfg.patch_size);
    let flops = step_flops(
        cfg.num_layers,
        cfg.inner_dim(),
        n_img,
        ctx_len,
        cfg.joint_attention_dim,
        cfg.in_channels,
        cfg.out_channels,
    );
    let tflops = flops / s_time.as_secs_f64() / 1e12;
    println!("  {:.2} TFLOP/step → {tflops:.1} TFLOP/s (attention: plain softmax(QKᵀ)V, head-chunked)", flops / 1e12);
    println!(
        "RESULT impl=candle ms_per_step={:.3} tflop_per_step={:.4} tflops={tflops:.2} control_ms={:.3}",
        s_time.as_secs_f64() * 1e3,
        flops / 1e12,
        c_time.as_secs_f64() * 1e3
    );
    Ok(())
}
