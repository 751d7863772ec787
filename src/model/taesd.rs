//! TAESD3 (madebyollin's tiny autoencoder for SD3's latent space): 3×3 convs, ReLU, residual
//! blocks, nearest ×2 upsampling. Weight keys are the reference `nn.Sequential` indices
//! (`taesd.py` `Encoder(16)` / `Decoder(16)`, e.g. `1.conv.0.weight`), not diffusers'
//! `AutoencoderTiny` names.
//!
//! Latent space: TAESD3 latents *are* the SD3 transformer's latents (already scaled, shift 0:
//! diffusers sets `shift_factor = 0`, `scaling_factor = 1` for it), so no shift/scale is
//! applied. Images: the reference works in [0, 1]; the [`Autoencoder`] impl maps [-1, 1].

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::autoencoder::{Autoencoder, LatentDraw};
use super::layers::{self, Conv};
use super::tiling::{TileConfig, tiled_decode, tiled_encode};

/// Shape of a TAESD-family model (the defaults are TAESD3's; diffusers `AutoencoderTiny`
/// config names, unknown keys ignored).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct TaesdConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
}

impl Default for TaesdConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 16,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
        }
    }
}

impl TaesdConfig {
    pub fn downscale(&self) -> usize {
        1 << self.num_encoder_blocks.len().saturating_sub(1)
    }
}

fn conv3(cin: usize, cout: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Conv> {
    if bias { layers::conv(cin, cout, 3, stride, 1, vb) } else { layers::conv_no_bias(cin, cout, 3, stride, 1, vb) }
}

/// `Block`: conv-relu-conv-relu-conv + skip (1×1, no bias, when channels differ), then ReLU.
#[derive(Debug, Clone)]
struct Block {
    c0: Conv,
    c2: Conv,
    c4: Conv,
    skip: Option<Conv>,
}

impl Block {
    fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let skip = if cin != cout { Some(layers::conv_no_bias(cin, cout, 1, 1, 0, vb.pp("skip"))?) } else { None };
        Ok(Self {
            c0: conv3(cin, cout, 1, true, vb.pp("conv.0"))?,
            c2: conv3(cout, cout, 1, true, vb.pp("conv.2"))?,
            c4: conv3(cout, cout, 1, true, vb.pp("conv.4"))?,
            skip,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = x.apply(&self.c0)?.relu()?.apply(&self.c2)?.relu()?.apply(&self.c4)?;
        let s = match &self.skip {
            Some(c) => x.apply(c)?,
            None => x.clone(),
        };
        (h + s)?.relu()
    }
}

#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv),
    Block(Block),
    Relu,
    Up2,
    /// `tanh(x / 3) · 3`
    Clamp,
}

impl Module for Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => x.apply(c),
            Layer::Block(b) => x.apply(b),
            Layer::Relu => x.relu(),
            Layer::Up2 => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)
            }
            Layer::Clamp => (x / 3.0)?.tanh()? * 3.0,
        }
    }
}

#[derive(Debug, Clone)]
struct Seq(Vec<Layer>);

impl Module for Seq {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.0 {
            x = x.apply(l)?;
        }
        Ok(x)
    }
}

/// Reference `Encoder`: `conv(3,c)`, then per stage (stride-2 bias-free conv except the
/// first) + blocks, then `conv(c, latent)`. Layer index = weight-key prefix.
fn build_encoder(cfg: &TaesdConfig, vb: VarBuilder) -> Result<Seq> {
    let mut layers = Vec::new();
    let mut prev = cfg.in_channels;
    for (i, (&c, &n)) in cfg.encoder_block_out_channels.iter().zip(&cfg.num_encoder_blocks).enumerate() {
        let idx = layers.len();
        let first = i == 0;
        layers.push(Layer::Conv(conv3(prev, c, if first { 1 } else { 2 }, first, vb.pp(idx))?));
        for _ in 0..n {
            let idx = layers.len();
            layers.push(Layer::Block(Block::new(c, c, vb.pp(idx))?));
        }
        prev = c;
    }
    let idx = layers.len();
    layers.push(Layer::Conv(conv3(prev, cfg.latent_channels, 1, true, vb.pp(idx))?));
    Ok(Seq(layers))
}

/// Reference `Decoder`: `Clamp, conv(latent,c), ReLU`, then per stage blocks + (upsample,
/// bias-free conv) or, last, `conv(c, 3)` with bias.
fn build_decoder(cfg: &TaesdConfig, vb: VarBuilder) -> Result<Seq> {
    let c0 = cfg.decoder_block_out_channels[0];
    let mut layers = vec![Layer::Clamp, Layer::Conv(conv3(cfg.latent_channels, c0, 1, true, vb.pp(1))?), Layer::Relu];
    let n_stages = cfg.num_decoder_blocks.len();
    let mut prev = c0;
    for (i, (&c, &n)) in cfg.decoder_block_out_channels.iter().zip(&cfg.num_decoder_blocks).enumerate() {
        for _ in 0..n {
            let idx = layers.len();
            layers.push(Layer::Block(Block::new(prev, c, vb.pp(idx))?));
            prev = c;
        }
        let last = i + 1 == n_stages;
        if !last {
            layers.push(Layer::Up2);
        }
        let cout = if last { cfg.out_channels } else { c };
        let idx = layers.len();
        layers.push(Layer::Conv(conv3(c, cout, 1, last, vb.pp(idx))?));
        prev = cout;
    }
    Ok(Seq(layers))
}

/// TAESD3 encoder and/or decoder (either may be absent, e.g. a decode-only preview model).
#[derive(Debug, Clone)]
pub struct Taesd {
    encoder: Option<Seq>,
    decoder: Option<Seq>,
    cfg: TaesdConfig,
    dtype: DType,
}

impl Taesd {
    /// `encoder` / `decoder`: VarBuilders over `taesd3_encoder.safetensors` /
    /// `taesd3_decoder.safetensors` (bf16 on disk; load them as f32 for reference numerics).
    pub fn new(cfg: &TaesdConfig, encoder: Option<VarBuilder>, decoder: Option<VarBuilder>) -> Result<Self> {
        let dtype = encoder
            .as_ref()
            .or(decoder.as_ref())
            .map(|v| layers::compute_dtype(v.dtype(), v.device()))
            .unwrap_or(DType::F32);
        Ok(Self {
            encoder: encoder.map(|vb| build_encoder(cfg, vb)).transpose()?,
            decoder: decoder.map(|vb| build_decoder(cfg, vb)).transpose()?,
            cfg: cfg.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &TaesdConfig {
        &self.cfg
    }

    /// Reference `Encoder`: image in [0, 1] → latent (model space). Untiled.
    pub fn encode(&self, x01: &Tensor) -> Result<Tensor> {
        let enc =
            self.encoder.as_ref().ok_or_else(|| candle_core::Error::Msg("TAESD: no encoder weights loaded".into()))?;
        x01.to_dtype(self.dtype)?.apply(enc)
    }

    /// Reference `Decoder`: latent → image in about [0, 1], **unclamped**. Untiled.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let dec =
            self.decoder.as_ref().ok_or_else(|| candle_core::Error::Msg("TAESD: no decoder weights loaded".into()))?;
        z.to_dtype(self.dtype)?.apply(dec)
    }
}

impl Autoencoder for Taesd {
    /// TAESD is deterministic: `LatentDraw` is ignored (there is no posterior).
    fn encode_latent(&self, image: &Tensor, _draw: &LatentDraw, tiles: Option<TileConfig>) -> Result<Tensor> {
        let x01 = ((image * 0.5)? + 0.5)?;
        match tiles {
            Some(t) => tiled_encode(&x01, t, self.cfg.downscale(), |x| self.encode(x)),
            None => self.encode(&x01),
        }
    }

    fn decode_latent(&self, latent: &Tensor, tiles: Option<TileConfig>) -> Result<Tensor> {
        let x01 = match tiles {
            Some(t) => tiled_decode(latent, t, self.cfg.downscale(), |z| self.decode(z))?,
            None => self.decode(latent)?,
        };
        (x01 * 2.0)? - 1.0
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

    /// TAESD's receptive field is bounded (≈ 18 latents; no GroupNorm, no attention), so
    /// with a 20-latent halo tiled equals untiled up to float rounding: real TAESD3 weights,
    /// the `taesd3` fixture (32×24 latent, 16-latent cores, overlap 4), bound
    /// [`TILED_TAESD_TOL`].
    /// The weights and the fixture must be there (`DPIR_WEIGHTS`, `DPIR_FIXTURES`): no skip.
    #[test]
    fn tiled_decode_close_to_untiled() -> Result<()> {
        let weights = crate::model::test_data("DPIR_WEIGHTS");
        let (enc, dec, io) = (
            weights.join("taesd3/taesd3_encoder.safetensors"),
            weights.join("taesd3/taesd3_decoder.safetensors"),
            crate::model::test_data("DPIR_FIXTURES").join("taesd3/io.safetensors"),
        );
        let dev = Device::Cpu;
        let vbe = unsafe { VarBuilder::from_mmaped_safetensors(&[enc], DType::F32, &dev)? };
        let vbd = unsafe { VarBuilder::from_mmaped_safetensors(&[dec], DType::F32, &dev)? };
        let m = Taesd::new(&TaesdConfig::default(), Some(vbe), Some(vbd))?;
        let io = candle_core::safetensors::load(io, &dev)?;
        let z = &io["latent"];
        let x = &io["image_in_0_1"];
        let t = TileConfig { tile: 16, overlap: 4, halo: 20 };
        let ds = m.config().downscale();
        let full = m.decode(z)?;
        let tiled = tiled_decode(z, t, ds, |z| m.decode(z))?;
        let dd = (full - tiled)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let ze = m.encode(x)?;
        let zt = tiled_encode(x, t, ds, |x| m.encode(x))?;
        let de = (ze - zt)?.abs()?.max_all()?.to_scalar::<f32>()?;
        eprintln!("TAESD3 tiled vs untiled: encode max {de:.3e}, decode max {dd:.3e}");
        assert!(dd < TILED_TAESD_TOL && de < TILED_TAESD_TOL, "decode {dd}, encode {de}");
        Ok(())
    }

    const TILED_TAESD_TOL: f32 = 1e-4;
}
