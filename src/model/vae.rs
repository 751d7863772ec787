//! SD3's `AutoencoderKL` (diffusers 0.29.2 layout and weight names), plus tiled encode/decode
//! for frames too large to run whole.
//!
//! SD3 differences from the SD1 VAE in candle-transformers: 16 latent channels, no
//! `quant_conv`/`post_quant_conv` (but both are honoured when the config asks), mid-block
//! attention named `to_q/to_k/to_v/to_out.0` with one head, latent shift as well as scale.

use candle_core::{DType, Module, Result, Tensor};

use candle_nn::VarBuilder;

use super::autoencoder::{Autoencoder, LatentDraw};
use super::layers::{self, Conv, Gn, Lin};
use super::tiling::{TileConfig, tiled_decode, tiled_encode};

fn default_in_out() -> usize {
    3
}
fn default_block_out() -> Vec<usize> {
    vec![128, 256, 512, 512]
}
fn default_layers() -> usize {
    2
}
fn default_latent() -> usize {
    16
}
fn default_groups() -> usize {
    32
}
fn default_scale() -> f64 {
    1.5305
}
fn default_shift() -> Option<f64> {
    Some(0.0609)
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "silu".into()
}

/// diffusers `AutoencoderKL` config (`vae/config.json`). Unknown keys are ignored; defaults
/// are SD3-medium's. `shift_factor` may be `null` in SD1/SDXL configs (→ 0).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AutoencoderKlConfig {
    #[serde(default = "default_in_out")]
    pub in_channels: usize,
    #[serde(default = "default_in_out")]
    pub out_channels: usize,
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scale")]
    pub scaling_factor: f64,
    #[serde(default = "default_shift")]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_act")]
    pub act_fn: String,
}

impl Default for AutoencoderKlConfig {
    /// SD3-medium's `vae/config.json`.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: default_block_out(),
            layers_per_block: 2,
            latent_channels: 16,
            norm_num_groups: 32,
            scaling_factor: 1.5305,
            shift_factor: Some(0.0609),
            use_quant_conv: false,
            use_post_quant_conv: false,
            act_fn: default_act(),
        }
    }
}

impl AutoencoderKlConfig {
    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }
    /// Image/latent side ratio: `2^(levels-1)`.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
}

const GN_EPS: f64 = 1e-6;

fn conv(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv> {
    layers::conv(cin, cout, k, stride, padding, vb)
}

fn gn(groups: usize, ch: usize, vb: VarBuilder) -> Result<Gn> {
    layers::group_norm(groups, ch, GN_EPS, vb)
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: Gn,
    conv1: Conv,
    norm2: Gn,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let shortcut = if cin != cout { Some(conv(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: gn(groups, cin, vb.pp("norm1"))?,
            conv1: conv(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: gn(groups, cout, vb.pp("norm2"))?,
            conv2: conv(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?.apply(&self.conv1)?;
        let h = self.norm2.forward_silu(&h)?.apply(&self.conv2)?;
        let skip = match &self.shortcut {
            Some(c) => x.apply(c)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Mid-block self-attention, one head over all channels (diffusers `Attention`, residual).
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: Gn,
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    to_out: Lin,
    channels: usize,
}

impl AttnBlock {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: gn(groups, ch, vb.pp("group_norm"))?,
            to_q: layers::linear(ch, ch, vb.pp("to_q"))?,
            to_k: layers::linear(ch, ch, vb.pp("to_k"))?,
            to_v: layers::linear(ch, ch, vb.pp("to_v"))?,
            to_out: layers::linear(ch, ch, vb.pp("to_out.0"))?,
            channels: ch,
        })
    }
}

impl Module for AttnBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let l = h * w;
        let hs = x.apply(&self.norm)?.reshape((b, c, l))?.transpose(1, 2)?.contiguous()?;
        let q = hs.apply(&self.to_q)?;
        let k = hs.apply(&self.to_k)?;
        let v = hs.apply(&self.to_v)?;
        let o = layers::attention(&q, &k, &v, 1, 1.0 / (self.channels as f64).sqrt())?;
        let o = o.apply(&self.to_out)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    res0: ResnetBlock,
    attn: AttnBlock,
    res1: ResnetBlock,
}

impl MidBlock {
    fn new(ch: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            res0: ResnetBlock::new(ch, ch, groups, vb.pp("resnets.0"))?,
            attn: AttnBlock::new(ch, groups, vb.pp("attentions.0"))?,
            res1: ResnetBlock::new(ch, ch, groups, vb.pp("resnets.1"))?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply(&self.res0)?.apply(&self.attn)?.apply(&self.res1)
    }
}

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// `Downsample2D(padding=0)`: pad right/bottom by one, then a stride-2 3×3 conv.
    down: Option<Conv>,
}

impl Module for DownBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = x.apply(r)?;
        }
        if let Some(d) = &self.down {
            x = d.forward_pad_right_bottom(&x)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    /// `Upsample2D`: nearest ×2 then 3×3 conv.
    up: Option<Conv>,
}

impl Module for UpBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = x.apply(r)?;
        }
        if let Some(u) = &self.up {
            x = u.forward_upsampled(&x)?;
        }
        Ok(x)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: Gn,
    conv_out: Conv,
}

impl Encoder {
    fn new(cfg: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = conv(cfg.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mut down = Vec::new();
        let mut cin = boc[0];
        for (i, &cout) in boc.iter().enumerate() {
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(c, cout, g, vbb.pp(format!("resnets.{j}")))?);
            }
            let down_conv =
                if i + 1 < boc.len() { Some(conv(cout, cout, 3, 2, 0, vbb.pp("downsamplers.0.conv"))?) } else { None };
            down.push(DownBlock { resnets, down: down_conv });
            cin = cout;
        }
        let last = *boc.last().unwrap();
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(last, g, vb.pp("mid_block"))?,
            norm_out: gn(g, last, vb.pp("conv_norm_out"))?,
            conv_out: conv(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Encoder {
    /// Full-resolution part: `conv_in` + down blocks (what tiling splits up).
    fn body(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.apply(&self.conv_in)?;
        for d in &self.down {
            x = x.apply(d)?;
        }
        Ok(x)
    }

    /// Latent-resolution part: mid block (global attention) + output head.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.norm_out.forward_silu(&x.apply(&self.mid)?)?.apply(&self.conv_out)
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.head(&self.body(x)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: Gn,
    conv_out: Conv,
}

impl Decoder {
    fn new(cfg: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = conv(cfg.latent_channels, rev[0], 3, 1, 1, vb.pp("conv_in"))?;
        let mid = MidBlock::new(rev[0], g, vb.pp("mid_block"))?;
        let mut up = Vec::new();
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(c, cout, g, vbb.pp(format!("resnets.{j}")))?);
            }
            let up_conv =
                if i + 1 < rev.len() { Some(conv(cout, cout, 3, 1, 1, vbb.pp("upsamplers.0.conv"))?) } else { None };
            up.push(UpBlock { resnets, up: up_conv });
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: gn(g, first, vb.pp("conv_norm_out"))?,
            conv_out: conv(first, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Decoder {
    /// Latent-resolution part: `conv_in` + mid block (global attention).
    fn head(&self, z: &Tensor) -> Result<Tensor> {
        z.apply(&self.conv_in)?.apply(&self.mid)
    }

    /// Full-resolution part: up blocks + output head (what tiling splits up).
    fn body(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for u in &self.up {
            x = x.apply(u)?;
        }
        self.norm_out.forward_silu(&x)?.apply(&self.conv_out)
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.body(&self.head(z)?)
    }
}

/// diffusers `DiagonalGaussianDistribution` (raw latent space, before shift/scale).
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    /// Clamped to [-30, 20] before `std` is derived, as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl Posterior {
    /// From encoder moments `[B, 2C, h, w]`: mean = first C channels, logvar = last C.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        let std = (logvar.clone() * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }
    /// `mean + std * noise` (noise standard normal, shaped like the mean).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?.to_device(self.mean.device())?;
        self.mean.add(&self.std.mul(&noise)?)
    }
    pub fn mode(&self) -> Result<Tensor> {
        Ok(self.mean.clone())
    }
}

/// SD3's `AutoencoderKL`. Runs in [`layers::compute_dtype`] (inputs are cast): f32 on the CPU;
/// on a GPU the weights' dtype, where f32 or bf16 are safe and f16 can overflow (the reason for
/// diffusers' `force_upcast`).
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    cfg: AutoencoderKlConfig,
    dtype: DType,
}

impl AutoencoderKl {
    /// Builds from diffusers weight names (`encoder.*`, `decoder.*`, optional
    /// `quant_conv`/`post_quant_conv`).
    pub fn new(cfg: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let lc = cfg.latent_channels;
        let quant_conv =
            if cfg.use_quant_conv { Some(conv(2 * lc, 2 * lc, 1, 1, 0, vb.pp("quant_conv"))?) } else { None };
        let post_quant_conv =
            if cfg.use_post_quant_conv { Some(conv(lc, lc, 1, 1, 0, vb.pp("post_quant_conv"))?) } else { None };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
            cfg: cfg.clone(),
            dtype: layers::compute_dtype(vb.dtype(), vb.device()),
        })
    }

    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.cfg
    }

    /// Encoder moments `[B, 2·latent, H/8, W/8]` for an image in [-1, 1], untiled.
    pub fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let m = x.to_dtype(self.dtype)?.apply(&self.encoder)?;
        match &self.quant_conv {
            Some(q) => m.apply(q),
            None => Ok(m),
        }
    }

    /// Untiled encode (exactly diffusers' `vae.encode(x).latent_dist`).
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        Posterior::from_moments(&self.encode_moments(x)?)
    }

    /// Tiled encode, as diffusers' `enable_tiling()` (which the official pipeline turns on):
    /// the whole encoder runs per tile with context around it, blended at latent resolution.
    /// The mid-block attention is per tile too: over a whole 4K latent it would cost O(N²)
    /// (~10¹³ FLOPs for SD3), far more than the transformer.
    pub fn encode_tiled(&self, x: &Tensor, t: TileConfig) -> Result<Posterior> {
        let ds = self.cfg.downscale();
        let x = x.to_dtype(self.dtype)?;
        let m = tiled_encode(&x, t, ds, |xt| self.encode_moments(xt))?;
        Posterior::from_moments(&m)
    }

    /// Untiled decode of a **raw** latent (`z / scale + shift`), image in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(p) => z.apply(p)?,
            None => z,
        };
        z.apply(&self.decoder)
    }

    /// Tiled decode of a raw latent: the whole decoder per tile (with context), blended;
    /// see [`Self::encode_tiled`] for why attention is per tile.
    pub fn decode_tiled(&self, z: &Tensor, t: TileConfig) -> Result<Tensor> {
        tiled_decode(z, t, self.cfg.downscale(), |zt| self.decode(zt))
    }

    /// Raw latent → model space: `(raw − shift) · scale`.
    pub fn to_model_latent(&self, raw: &Tensor) -> Result<Tensor> {
        (raw - self.cfg.shift())? * self.cfg.scaling_factor
    }

    /// Model space → raw latent: `z / scale + shift`.
    pub fn to_raw_latent(&self, z: &Tensor) -> Result<Tensor> {
        (z / self.cfg.scaling_factor)? + self.cfg.shift()
    }
}

impl Autoencoder for AutoencoderKl {
    fn encode_latent(&self, image: &Tensor, draw: &LatentDraw, tiles: Option<TileConfig>) -> Result<Tensor> {
        let p = match tiles {
            Some(t) => self.encode_tiled(image, t)?,
            None => self.encode(image)?,
        };
        let raw = match draw {
            LatentDraw::Mode => p.mode()?,
            LatentDraw::Sample(noise) => p.sample(noise)?,
        };
        self.to_model_latent(&raw)
    }

    fn decode_latent(&self, latent: &Tensor, tiles: Option<TileConfig>) -> Result<Tensor> {
        let raw = self.to_raw_latent(latent)?;
        match tiles {
            Some(t) => self.decode_tiled(&raw, t),
            None => self.decode(&raw),
        }
    }

    fn downscale(&self) -> usize {
        self.cfg.downscale()
    }

    fn latent_channels(&self) -> usize {
        self.cfg.latent_channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn config_parses_sd3_json() {
        let j = r#"{"_class_name":"AutoencoderKL","_diffusers_version":"0.29.0.dev0","act_fn":"silu",
            "block_out_channels":[128,256,512,512],"down_block_types":["DownEncoderBlock2D"],
            "force_upcast":true,"in_channels":3,"latent_channels":16,"latents_mean":null,
            "latents_std":null,"layers_per_block":2,"norm_num_groups":32,"out_channels":3,
            "sample_size":1024,"scaling_factor":1.5305,"shift_factor":0.0609,
            "up_block_types":["UpDecoderBlock2D"],"use_post_quant_conv":false,"use_quant_conv":false}"#;
        let c: AutoencoderKlConfig = serde_json::from_str(j).unwrap();
        assert_eq!(c.latent_channels, 16);
        assert_eq!(c.downscale(), 8);
        assert!(!c.use_quant_conv);
        assert_eq!(c.shift(), 0.0609);
    }

    /// A real photo (384×512 crop of the `prompt_assembly_quirk` fixture's motorcycle) in [-1, 1].
    fn test_image(dev: &Device) -> Result<Tensor> {
        let p = crate::model::test_data("DPIR_FIXTURES").join("prompt_assembly_quirk/io.safetensors");
        let io = candle_core::safetensors::load(&p, dev)?;
        let x = io.get("global_image_uint8").expect("global_image_uint8 in prompt_assembly_quirk");
        let x = x.narrow(0, 0, 384)?.narrow(1, 256, 512)?;
        let x = x.to_dtype(DType::F32)?.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?;
        (x / 127.5)? - 1.0
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    fn mean_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.mean_all()?.to_scalar::<f32>()
    }

    /// The `sd3_vae` fixture's tiny SD3-shaped VAE (real fixture weights, non-trivial norms).
    fn fixture_vae(dev: &Device) -> Result<AutoencoderKl> {
        let dir = crate::model::test_data("DPIR_FIXTURES").join("sd3_vae");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("sd3_vae/config.json")).unwrap();
        let cfg: AutoencoderKlConfig = serde_json::from_value(cfg["library_config"].clone()).unwrap();
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("weights.safetensors")], DType::F32, dev)? };
        AutoencoderKl::new(&cfg, vb)
    }

    /// With a halo as large as the frame every tile sees the whole frame (GroupNorm statistics
    /// and mid-block attention included), so the tiled path must equal the untiled one up to
    /// float rounding: any error in where tiles are cut, cropped or blended shows here.
    #[test]
    fn tiled_vae_with_a_whole_frame_halo_equals_untiled() -> Result<()> {
        let dev = Device::Cpu;
        let vae = fixture_vae(&dev)?;
        let img = test_image(&dev)?;
        let t = TileConfig { tile: 24, overlap: 8, halo: 64 };
        let full = vae.encode(&img)?;
        let tiled = vae.encode_tiled(&img, t)?;
        let em = max_diff(&full.mean, &tiled.mean)?;
        let dm = max_diff(&vae.decode(&full.mean)?, &vae.decode_tiled(&full.mean, t)?)?;
        assert!(em < 1e-4 && dm < 1e-4, "encode max |diff| {em}, decode {dm}");
        Ok(())
    }

    /// Tiled vs untiled with the default-style small halo (24-latent cores, overlap 8, halo 8:
    /// 12 tiles on a 48×64 latent). The down/up blocks' GroupNorm statistics and the attention
    /// see one tile in the tiled path (as in diffusers' `enable_tiling()`, which the official
    /// pipeline uses), so outputs differ by design; this random 4-group model is far more
    /// sensitive to that than SD3's trained one. Measured (CPU, f32, 2026-12-02): encode max 2.03 /
    /// mean-abs 9.8e-2 (|z| ≈ 0.5), decode max 2.69 / mean-abs 0.107 (|x| ≈ 0.4); the bounds sit
    /// 25 % above, so a change that makes tiles drift further (less context, no blending) fails.
    #[test]
    fn tiled_vae_drift_with_a_small_halo_stays_at_its_measured_level() -> Result<()> {
        let dev = Device::Cpu;
        let vae = fixture_vae(&dev)?;
        let img = test_image(&dev)?;
        let t = TileConfig { tile: 24, overlap: 8, halo: 8 };
        let full = vae.encode(&img)?;
        let tiled = vae.encode_tiled(&img, t)?;
        let (em, ea) = (max_diff(&full.mean, &tiled.mean)?, mean_diff(&full.mean, &tiled.mean)?);
        let (dfull, dtiled) = (vae.decode(&full.mean)?, vae.decode_tiled(&full.mean, t)?);
        let (dm, da) = (max_diff(&dfull, &dtiled)?, mean_diff(&dfull, &dtiled)?);
        eprintln!(
            "AutoencoderKl tiled vs untiled: encode max {em:.3e} mean {ea:.3e}; decode max {dm:.3e} mean {da:.3e}"
        );
        assert!(em < 2.55 && ea < 0.123, "encode: max {em}, mean {ea}");
        assert!(dm < 3.37 && da < 0.134, "decode: max {dm}, mean {da}");
        Ok(())
    }
}
