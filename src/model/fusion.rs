//! The fusion stage (`fusion` in model.json): a small full-resolution network after the colour
//! fix that decides, per pixel, how much of the diffusion output to keep over the LQ frame:
//!
//! `out = lq + high(pixel_shuffle(convs(pixel_unshuffle([lq ‖ restored − lq]))))`
//!
//! `num_layers` 3×3 convolutions (`channels` wide, ReLU between, none after the last) at
//! 1/`downscale` resolution; `high` removes the wavelet colour fix's low band (5 levels), so the
//! stage restores detail, noise and blocks but leaves the frame's tones to the input, as DPIR's
//! colour fix does. Trained with its last layer starting at zero, i.e. from the LQ frame
//! itself (`weights/train/fusion.py`), it gives a small latent model what its ×8 autoencoder
//! cannot: the input's own detail back where the model has nothing better (StableSR's CFW and
//! CodeFormer's fidelity module fuse encoder features for the same reason; here in pixel
//! space, so it works behind any autoencoder). DPIR's real checkpoints have no such stage: it is
//! optional, and a model without it runs exactly as before.
//!
//! Weights: `convs.{i}.{weight,bias}` (PyTorch `nn.Conv2d`, `weights/train/model.py` `Fusion`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::color_fix::wavelet_reconstruction;
use super::layers::{Conv, conv};

/// `fusion/config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionConfig {
    /// Width of the hidden layers.
    pub channels: usize,
    /// 3×3 convolutions in all (at least 2: the first takes the 6·r² unshuffled channels, the
    /// last gives 3·r²).
    pub num_layers: usize,
    /// Pixel-unshuffle factor r: the network runs at 1/r resolution.
    pub downscale: usize,
}

/// Largest tile side at 1/r resolution: larger frames run in tiles (with a halo that makes each
/// tile's result exact), so that a layer's activations (48 × 256² floats, 12.6 MB) stay near the
/// cache instead of streaming a 4K frame's 470 MB through memory at every layer. Measured on a
/// 3840×2560 frame (2 cores): full-width stripes of 128 rows 0.63 µs a pixel, 128×256 tiles 0.46–0.50,
/// 256×256 tiles 0.44–0.45, 384×384 0.45–0.47 (the film at 428×320, one tile: 0.33–0.37).
const TILE: usize = 256;

#[derive(Debug, Clone)]
pub struct Fusion {
    convs: Vec<Conv>,
    cfg: FusionConfig,
}

impl Fusion {
    pub fn new(cfg: &FusionConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.num_layers < 2 || cfg.channels == 0 || cfg.downscale == 0 {
            candle_core::bail!("fusion config {cfg:?}: needs num_layers >= 2, channels >= 1 and downscale >= 1");
        }
        let convs = widths(cfg)
            .windows(2)
            .enumerate()
            .map(|(i, w)| conv(w[0], w[1], 3, 1, 1, vb.pp(format!("convs.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { convs, cfg: *cfg })
    }

    /// Pixels (at 1/r resolution) beyond a tile that its output depends on: one per 3×3 layer.
    fn halo(&self) -> usize {
        self.cfg.num_layers
    }

    /// `lq`, `restored`: `[1, 3, H, W]` in [0, 1], H and W multiples of `downscale`. Returns the
    /// fused frame, unclamped.
    pub fn forward(&self, lq: &Tensor, restored: &Tensor) -> Result<Tensor> {
        // `lq + high(res)` = the wavelet reconstruction of `lq + res` against `lq`.
        wavelet_reconstruction(&(lq + self.residual(lq, restored)?)?, lq)
    }

    /// The network's output at full resolution (before the high-pass), in tiles when large.
    fn residual(&self, lq: &Tensor, restored: &Tensor) -> Result<Tensor> {
        let r = self.cfg.downscale;
        let (_, _, h, w) = lq.dims4()?;
        if h % r != 0 || w % r != 0 {
            candle_core::bail!("fusion: {w}x{h} is not a multiple of its downscale {r}");
        }
        let (rows, cols) = (h / r, w / r);
        if rows <= TILE && cols <= TILE {
            return self.residual_whole(lq, restored);
        }
        let halo = self.halo();
        let (tr, tc) = (balanced(rows), balanced(cols));
        let mut bands = Vec::with_capacity(rows.div_ceil(tr));
        for y0 in (0..rows).step_by(tr) {
            let y1 = (y0 + tr).min(rows);
            let (a, b) = (y0.saturating_sub(halo), (y1 + halo).min(rows));
            let (lq_b, re_b) = (lq.narrow(2, a * r, (b - a) * r)?, restored.narrow(2, a * r, (b - a) * r)?);
            let mut parts = Vec::with_capacity(cols.div_ceil(tc));
            for x0 in (0..cols).step_by(tc) {
                let x1 = (x0 + tc).min(cols);
                let (c, d) = (x0.saturating_sub(halo), (x1 + halo).min(cols));
                let out = self.residual_whole(
                    &lq_b.narrow(3, c * r, (d - c) * r)?.contiguous()?,
                    &re_b.narrow(3, c * r, (d - c) * r)?.contiguous()?,
                )?;
                parts.push(out.narrow(2, (y0 - a) * r, (y1 - y0) * r)?.narrow(3, (x0 - c) * r, (x1 - x0) * r)?);
            }
            bands.push(Tensor::cat(&parts, 3)?);
        }
        Tensor::cat(&bands, 2)
    }

    fn residual_whole(&self, lq: &Tensor, restored: &Tensor) -> Result<Tensor> {
        let r = self.cfg.downscale;
        let mut x = pixel_unshuffle(&Tensor::cat(&[lq, &(restored - lq)?], 1)?, r)?;
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            x = c.forward(&x)?;
            if i < last {
                x = x.relu()?;
            }
        }
        pixel_shuffle(&x, r)
    }
}

/// Tile side for `n` rows (or columns): at most [`TILE`], the tiles as equal as possible (no thin
/// last tile paying a whole halo for a few rows).
fn balanced(n: usize) -> usize {
    n.div_ceil(n.div_ceil(TILE))
}

/// Channels into and out of each convolution: 6·r² (the unshuffled LQ and restoration − LQ),
/// `channels` between, 3·r² out (shuffled back to RGB).
fn widths(cfg: &FusionConfig) -> Vec<usize> {
    let r2 = cfg.downscale * cfg.downscale;
    let mut w = vec![6 * r2];
    w.extend(std::iter::repeat_n(cfg.channels, cfg.num_layers - 1));
    w.push(3 * r2);
    w
}

/// PyTorch's `pixel_unshuffle`: `[n, c, h·r, w·r]` → `[n, c·r², h, w]`, channel `c·r² + i·r + j`
/// holding the pixels at row offset i, column offset j.
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape(vec![n, c, h / r, r, w / r, r])?.permute(vec![0, 1, 3, 5, 2, 4])?.contiguous()?.reshape((
        n,
        c * r * r,
        h / r,
        w / r,
    ))
}

/// PyTorch's `pixel_shuffle`, the inverse of [`pixel_unshuffle`].
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let co = c / (r * r);
    x.reshape(vec![n, co, r, r, h, w])?.permute(vec![0, 1, 4, 2, 5, 3])?.contiguous()?.reshape((n, co, h * r, w * r))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, IndexOp};

    use super::*;

    fn random_fusion(cfg: FusionConfig, zero_last: bool) -> Result<Fusion> {
        let dev = Device::Cpu;
        let mut ts = HashMap::new();
        for (i, w) in widths(&cfg).windows(2).enumerate() {
            let scale = if zero_last && i == cfg.num_layers - 1 { 0.0 } else { (1.0 / (9.0 * w[0] as f64)).sqrt() };
            ts.insert(format!("convs.{i}.weight"), (Tensor::randn(0f32, 1f32, (w[1], w[0], 3, 3), &dev)? * scale)?);
            ts.insert(format!("convs.{i}.bias"), (Tensor::randn(0f32, 1f32, w[1], &dev)? * (0.1 * scale))?);
        }
        Fusion::new(&cfg, VarBuilder::from_tensors(ts, DType::F32, &dev))
    }

    #[test]
    fn pixel_unshuffle_orders_channels_as_pytorch() -> Result<()> {
        // One channel, 4×4, value = 10·row + column: channel i·2 + j of the unshuffled map holds
        // rows i, i+2 and columns j, j+2.
        let v: Vec<f32> = (0..16).map(|k| (10 * (k / 4) + k % 4) as f32).collect();
        let x = Tensor::from_vec(v, (1, 1, 4, 4), &Device::Cpu)?;
        let u = pixel_unshuffle(&x, 2)?;
        assert_eq!(u.dims(), &[1, 4, 2, 2]);
        assert_eq!(u.i((0, 1))?.to_vec2::<f32>()?, vec![vec![1.0, 3.0], vec![21.0, 23.0]]);
        assert_eq!(u.i((0, 2))?.to_vec2::<f32>()?, vec![vec![10.0, 12.0], vec![30.0, 32.0]]);
        let back = pixel_shuffle(&u, 2)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn an_untrained_fusion_returns_the_lq_frame() -> Result<()> {
        let f = random_fusion(FusionConfig { channels: 16, num_layers: 3, downscale: 2 }, true)?;
        let lq = Tensor::rand(0f32, 1f32, (1, 3, 24, 40), &Device::Cpu)?;
        let restored = Tensor::rand(0f32, 1f32, (1, 3, 24, 40), &Device::Cpu)?;
        let out = f.forward(&lq, &restored)?;
        let d = (out - &lq)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn tiled_fusion_equals_the_whole_frame() -> Result<()> {
        // Larger than a tile both ways (2 × 2 tiles), with a trained-like (non-zero) last layer.
        let f = random_fusion(FusionConfig { channels: 16, num_layers: 4, downscale: 2 }, false)?;
        let (h, w) = (2 * (TILE + 40), 2 * (TILE + 12));
        let lq = Tensor::rand(0f32, 1f32, (1, 3, h, w), &Device::Cpu)?;
        let restored = Tensor::rand(0f32, 1f32, (1, 3, h, w), &Device::Cpu)?;
        let tiled = f.residual(&lq, &restored)?;
        let whole = f.residual_whole(&lq, &restored)?;
        assert_eq!(tiled.dims(), whole.dims());
        let d = (&tiled - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let moved = whole.abs()?.mean_all()?.to_scalar::<f32>()?;
        assert!(moved > 1e-3, "the test network must change the frame (mean |residual| {moved})");
        assert!(d < 1e-5, "max |tiled - whole| {d}");
        Ok(())
    }

    /// The stage changes detail, not tone: a network whose output is a flat offset (a colour
    /// shift, no detail) leaves the frame as it was.
    #[test]
    fn a_flat_residual_leaves_the_frame_unchanged() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = FusionConfig { channels: 16, num_layers: 2, downscale: 2 };
        let mut ts = HashMap::new();
        ts.insert("convs.0.weight".to_string(), Tensor::zeros((16, 24, 3, 3), DType::F32, &dev)?);
        ts.insert("convs.0.bias".to_string(), Tensor::zeros(16, DType::F32, &dev)?);
        ts.insert("convs.1.weight".to_string(), Tensor::zeros((12, 16, 3, 3), DType::F32, &dev)?);
        // Output channel c·4 + k (k: the 2×2 sub-position) gets colour c's offset.
        let bias: Vec<f32> = (0..12).map(|i| [0.2f32, -0.1, 0.05][i / 4]).collect();
        ts.insert("convs.1.bias".to_string(), Tensor::new(bias, &dev)?);
        let f = Fusion::new(&cfg, VarBuilder::from_tensors(ts, DType::F32, &dev))?;
        let lq = Tensor::rand(0f32, 1f32, (1, 3, 48, 64), &dev)?;
        let restored = Tensor::rand(0f32, 1f32, (1, 3, 48, 64), &dev)?;
        let res = f.residual(&lq, &restored)?;
        assert!(
            (res.i((0, 0))?.mean_all()?.to_scalar::<f32>()? - 0.2).abs() < 1e-6,
            "the offset must reach the residual"
        );
        let d = (f.forward(&lq, &restored)? - &lq)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "a flat offset changed the frame by {d}");
        Ok(())
    }

    #[test]
    fn sides_that_are_not_a_multiple_of_the_downscale_are_refused() -> Result<()> {
        let f = random_fusion(FusionConfig { channels: 8, num_layers: 2, downscale: 2 }, true)?;
        let x = Tensor::zeros((1, 3, 10, 9), DType::F32, &Device::Cpu)?;
        let e = f.forward(&x, &x).unwrap_err().to_string();
        assert!(e.contains("multiple of its downscale"), "{e}");
        Ok(())
    }
}
