//! One-image DPIR restoration, orchestrated as the official
//! `StableDiffusion3ControlNetPipeline.__call__` (`pipelines/pipeline_stable_diffusion_3_cnext.py`),
//! and its latent-tiled variant (`_sw` pipeline, see [`super::tiling`]):
//!
//! ```text
//! lq [-1,1] (already at output size) → z_lq = autoencoder.encode_latent(lq)
//! x = initial noise; for each σ: v = transformer(x, z_lq, prompt, pooled, σ·1000); x = euler(v, x)
//! image = autoencoder.decode_latent(x) → finish (colour fix, fusion, fidelity, crop)
//! ```
//!
//! Prompt embeddings come from [`super::prompt`]; the colour fix is applied by the caller
//! ([`super::color_fix`]). Latents are kept in f32 between steps whatever the model dtype (the
//! official pipeline keeps them in the model dtype; f32 is the safer choice for half models).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::{DType, Result, Tensor};

use super::autoencoder::{Autoencoder, LatentDraw};
use super::color_fix::ColorFix;
use super::fusion::Fusion;
use super::scheduler::{FlowMatchEulerConfig, FlowMatchEulerScheduler, guidance};
use super::tiling::{LatentTiling, TileConfig, blend_tiles, tile_windows};
use super::transformer::DpirTransformer;

/// Sampling options.
#[derive(Debug, Clone)]
pub struct SamplerOptions {
    /// Euler steps (DPIR: 28).
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` disables it (DPIR's default). When enabled, the
    /// unconditional branch uses all-zero prompt and pooled embeddings.
    pub guidance_scale: f64,
    /// Latent tiling for large frames; `None` always samples the whole latent at once.
    pub tiling: Option<LatentTiling>,
    /// The autoencoder's tiles for large frames; `None` encodes and decodes whole frames.
    pub autoencoder_tiles: Option<TileConfig>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            steps: 28,
            guidance_scale: 1.0,
            tiling: Some(LatentTiling::default()),
            autoencoder_tiles: Some(TileConfig::default()),
        }
    }
}

/// What a step callback sees (after the Euler step).
pub struct StepInfo<'a> {
    pub index: usize,
    pub total: usize,
    /// σ·1000 given to the transformer.
    pub timestep: f32,
    /// Latents entering the step.
    pub model_input: &'a Tensor,
    /// Velocity used for the step (after guidance and tile blending).
    pub velocity: &'a Tensor,
    /// Latents after the step.
    pub latents: &'a Tensor,
}

/// The DPIR sampler around a transformer and an autoencoder.
pub struct DpirPipeline<'a> {
    pub transformer: &'a DpirTransformer,
    pub autoencoder: &'a dyn Autoencoder,
    pub scheduler: FlowMatchEulerConfig,
}

impl<'a> DpirPipeline<'a> {
    pub fn new(
        transformer: &'a DpirTransformer,
        autoencoder: &'a dyn Autoencoder,
        scheduler: FlowMatchEulerConfig,
    ) -> Self {
        Self { transformer, autoencoder, scheduler }
    }

    /// Latent shape `[1, C, H/8, W/8]` for an output image of `width × height`; both sides must
    /// be multiples of `2 × downscale` (16 for SD3).
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<(usize, usize, usize, usize)> {
        let m = 2 * self.autoencoder.downscale();
        if !width.is_multiple_of(m) || !height.is_multiple_of(m) {
            candle_core::bail!("image size {width}x{height} must be a multiple of {m} on both sides");
        }
        let ds = self.autoencoder.downscale();
        Ok((1, self.autoencoder.latent_channels(), height / ds, width / ds))
    }

    /// `z_lq` of an LQ image (NCHW, [-1, 1], already at the output size).
    pub fn encode_lq(&self, lq: &Tensor, draw: &LatentDraw, tiles: Option<TileConfig>) -> Result<Tensor> {
        self.autoencoder.encode_latent(lq, draw, tiles)?.to_dtype(DType::F32)
    }

    /// Euler sampling from `initial_latents`, from step `start_step` on: at step 0 they are noise
    /// at σ = 1, shaped like `z_lq`; later, a previous result re-noised to the σ of that step by
    /// the scheduler ([`Start::Warm`]). `on_step` runs after every step; [`ControlFlow::Break`]
    /// stops sampling and gives `None` (cancellation).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        z_lq: &Tensor,
        initial_latents: &Tensor,
        prompt_embeds: &Tensor,
        pooled: &Tensor,
        opts: &SamplerOptions,
        start_step: usize,
        on_step: &mut dyn FnMut(&StepInfo) -> ControlFlow<()>,
    ) -> Result<Option<Tensor>> {
        if start_step >= opts.steps.max(1) {
            candle_core::bail!("start step {start_step} is not below the {} sampling steps", opts.steps);
        }
        if z_lq.dims() != initial_latents.dims() {
            candle_core::bail!("initial latents {:?} do not match z_lq {:?}", initial_latents.dims(), z_lq.dims());
        }
        let (b, _, h, w) = z_lq.dims4()?;
        let tr = self.transformer;
        let dev = tr.device();
        let dt = tr.dtype();
        let mut sched = FlowMatchEulerScheduler::new(self.scheduler.clone());
        sched.set_timesteps(opts.steps);
        let cfg = opts.guidance_scale > 1.0;

        let z_lq = z_lq.to_device(dev)?.to_dtype(dt)?;
        let pe = prompt_embeds.to_device(dev)?.to_dtype(dt)?;
        let pp = pooled.to_device(dev)?.to_dtype(dt)?;
        if pe.dim(0)? != b || pp.dim(0)? != b {
            candle_core::bail!("prompt batch {} / pooled batch {} != latent batch {b}", pe.dim(0)?, pp.dim(0)?);
        }
        // Conditioning for one transformer call on `n` latents of batch `b` each:
        // [uncond (zeros); cond] when guided.
        let embeds = |n: usize| -> Result<(Tensor, Tensor)> {
            let rep = |t: &Tensor| -> Result<Tensor> {
                if n == 1 { Ok(t.clone()) } else { Tensor::cat(&vec![t.clone(); n], 0) }
            };
            let (e, p) = (rep(&pe)?, rep(&pp)?);
            if cfg {
                Ok((Tensor::cat(&[&e.zeros_like()?, &e], 0)?, Tensor::cat(&[&p.zeros_like()?, &p], 0)?))
            } else {
                Ok((e, p))
            }
        };
        let dup = |t: &Tensor| -> Result<Tensor> { if cfg { Tensor::cat(&[t, t], 0) } else { Ok(t.clone()) } };
        let combine = |v: Tensor| -> Result<Tensor> {
            if cfg {
                let n = v.dim(0)? / 2;
                guidance(&v.narrow(0, 0, n)?, &v.narrow(0, n, n)?, opts.guidance_scale)
            } else {
                Ok(v)
            }
        };

        // Windows and control features are constant across steps: compute them once.
        let windows = match opts.tiling {
            Some(t) if t.needs_tiling(h, w) => Some((tile_windows(h, w, &t)?, t.batch.max(1))),
            _ => None,
        };
        let control: Vec<Tensor> = match &windows {
            None => vec![tr.control_features(&z_lq)?],
            Some((wins, _)) => wins.iter().map(|t| tr.control_features(&t.crop(&z_lq)?)).collect::<Result<_>>()?,
        };
        let full_embeds = embeds(1)?;

        let mut x = initial_latents.to_device(dev)?.to_dtype(DType::F32)?;
        let total = sched.num_steps();
        for i in start_step..total {
            let t = sched.timesteps()[i];
            let v = match &windows {
                None => {
                    let inp = dup(&x)?;
                    let ts = Tensor::full(t, inp.dim(0)?, dev)?;
                    let (e, p) = &full_embeds;
                    combine(tr.forward_with_control(&inp, &dup(&control[0])?, e, p, &ts)?)?
                }
                Some((wins, batch)) => blend_tiles(&x, wins, *batch, |idx, tiles| {
                    let n = idx.len();
                    let ctl = Tensor::cat(&idx.iter().map(|&k| control[k].clone()).collect::<Vec<_>>(), 0)?;
                    let inp = dup(tiles)?;
                    let ts = Tensor::full(t, inp.dim(0)?, dev)?;
                    let (e, p) = embeds(n)?;
                    combine(tr.forward_with_control(&inp, &dup(&ctl)?, &e, &p, &ts)?)
                })?,
            };
            let v = v.to_dtype(DType::F32)?;
            let next = sched.step(&v, i, &x)?;
            let info = StepInfo { index: i, total, timestep: t, model_input: &x, velocity: &v, latents: &next };
            if on_step(&info).is_break() {
                return Ok(None);
            }
            x = next;
        }
        Ok(Some(x))
    }

    /// Decode model-space latents to an image (NCHW, about [-1, 1], f32).
    pub fn decode(&self, latents: &Tensor, tiles: Option<TileConfig>) -> Result<Tensor> {
        self.autoencoder.decode_latent(latents, tiles)?.to_dtype(DType::F32)
    }

    /// The initial latents for `start` and the step sampling begins at: noise at step 0, or a
    /// previous result re-noised by the scheduler to the σ of a later step (warm start).
    pub fn start(&self, start: Start, steps: usize) -> Result<(Tensor, usize)> {
        match start {
            Start::Noise(n) | Start::Warm { step: 0, noise: n, .. } => Ok((n.clone(), 0)),
            Start::Warm { previous, noise, step } => {
                let mut sched = FlowMatchEulerScheduler::new(self.scheduler.clone());
                sched.set_timesteps(steps);
                Ok((sched.scale_noise(previous, step, noise)?, step))
            }
        }
    }
}

/// Where sampling starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// Noise at σ = 1: all steps run.
    Noise(&'a Tensor),
    /// Warm start (SDEdit-style): `previous` (final latents of an earlier frame) re-noised with
    /// `noise` to the σ of `step` by the scheduler, then only steps `step..` run; `step` 0 is
    /// plain sampling from `noise`.
    Warm { previous: &'a Tensor, noise: &'a Tensor, step: usize },
}

/// What happens to the decoded image: the colour fix, the model's fusion stage, the fidelity
/// blend towards the LQ frame.
#[derive(Clone, Copy)]
pub struct Finish<'a> {
    pub color_fix: ColorFix,
    pub fusion: Option<&'a Fusion>,
    /// 0: the restoration; up to 1: `(1 − f)·restored + f·LQ`.
    pub fidelity: f64,
}

/// The decoded image (NCHW, about [-1, 1]) finished against the LQ frame (NCHW, [0, 1], the same
/// padded size; the caller crops): clamped to [0, 1] as the official script does
/// (diffusers' postprocess) and colour-fixed on the float values (the official code quantises to
/// 8 bits in between; 16-bit output keeps them), then the fusion stage (trained on the
/// colour-fixed output, so after the fix) and the fidelity blend (both in [0, 1]: no clamp).
/// Returns the image in [0, 1] and the fusion stage's time.
pub fn finish(decoded: &Tensor, lq: &Tensor, f: &Finish) -> Result<(Tensor, Duration)> {
    let out01 = ((decoded + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
    let fixed = f.color_fix.apply(&out01, lq)?.clamp(0f32, 1f32)?;
    let t = Instant::now();
    let fixed = match f.fusion {
        Some(fusion) => fusion.forward(lq, &fixed)?.clamp(0f32, 1f32)?,
        None => fixed,
    };
    let fusion_time = t.elapsed();
    let fixed = if f.fidelity > 0.0 { ((fixed * (1.0 - f.fidelity))? + (lq * f.fidelity)?)? } else { fixed };
    Ok((fixed, fusion_time))
}

#[cfg(feature = "parity")]
/// diffusers `VaeImageProcessor.postprocess(output_type="pil")` for one image: NCHW [-1, 1] →
/// `(x/2 + 0.5).clamp(0, 1)·255`, rounded half to even (numpy `round`) → uint8 `[H, W, 3]`.
pub fn postprocess_uint8(decoded: &Tensor) -> Result<Tensor> {
    let img = if decoded.rank() == 4 { decoded.squeeze(0)? } else { decoded.clone() };
    let x = ((img.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?.permute((1, 2, 0))?.contiguous()?;
    let dims = x.dims().to_vec();
    let v: Vec<u8> =
        x.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|p| (p * 255.0).round_ties_even() as u8).collect();
    Tensor::from_vec(v, dims, &candle_core::Device::Cpu)
}
