//! Latent tiling for the sampler, as the official `_sw` pipeline
//! (`pipeline_stable_diffusion_3_cnext_sw.py`): the velocity is predicted per latent tile
//! (128 with overlap 8 by default, i.e. 1024 px / 64 px), every tile with the same prompt, and
//! the tile predictions are blended with Gaussian weights before one Euler step on the full
//! latent. Memory is bounded by the tile size, whatever the frame size.
//!
//! Differences from the official code, all for sides it does not handle: a side no larger than
//! the tile gets one window covering it (the official code slices with a negative start and then
//! fails on the 128×128 weight mask), and the weights are built for the actual tile size.

use candle_core::{DType, Result, Tensor};

/// Tile geometry in latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentTiling {
    /// Tile side (even; DPIR: 128 = 1024 px).
    pub tile: usize,
    /// Overlap between neighbouring tiles (DPIR: 8 = 64 px).
    pub overlap: usize,
    /// Tiles per transformer call (the official code groups 6; 1 minimises memory).
    pub batch: usize,
}

impl Default for LatentTiling {
    fn default() -> Self {
        Self { tile: 128, overlap: 8, batch: 1 }
    }
}

impl LatentTiling {
    pub fn validate(&self) -> Result<()> {
        if self.tile < 2 || !self.tile.is_multiple_of(2) {
            candle_core::bail!("latent tile size {} must be even and at least 2", self.tile);
        }
        if self.overlap >= self.tile {
            candle_core::bail!("tile overlap {} must be smaller than the tile {}", self.overlap, self.tile);
        }
        Ok(())
    }

    /// Whether a latent of `h × w` needs more than one tile.
    pub fn needs_tiling(&self, h: usize, w: usize) -> bool {
        h > self.tile || w > self.tile
    }
}

/// A latent window, half-open `[y0, y1) × [x0, x1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentTile {
    pub y0: usize,
    pub y1: usize,
    pub x0: usize,
    pub x1: usize,
}

impl LatentTile {
    pub fn height(&self) -> usize {
        self.y1 - self.y0
    }
    pub fn width(&self) -> usize {
        self.x1 - self.x0
    }
    /// `t[.., .., y0..y1, x0..x1]` of an NCHW tensor.
    pub fn crop(&self, t: &Tensor) -> Result<Tensor> {
        t.narrow(2, self.y0, self.height())?.narrow(3, self.x0, self.width())?.contiguous()
    }
}

/// Official `_sliding_windows` starts along one axis (stride `tile − overlap`, plus a last
/// window flush with the end); one window when the side fits in a tile.
fn axis_starts(side: usize, tile: usize, stride: usize) -> Vec<usize> {
    if side <= tile {
        return vec![0];
    }
    let last = side - tile;
    let mut v: Vec<usize> = (0..=last).step_by(stride).collect();
    if !last.is_multiple_of(stride) {
        v.push(last);
    }
    v
}

/// Tile windows for an `h × w` latent, rows outer, columns inner (official order).
pub fn tile_windows(h: usize, w: usize, cfg: &LatentTiling) -> Result<Vec<LatentTile>> {
    cfg.validate()?;
    let stride = cfg.tile - cfg.overlap;
    let (th, tw) = (cfg.tile.min(h), cfg.tile.min(w));
    let mut v = Vec::new();
    for y0 in axis_starts(h, cfg.tile, stride) {
        for x0 in axis_starts(w, cfg.tile, stride) {
            v.push(LatentTile { y0, y1: y0 + th, x0, x1: x0 + tw });
        }
    }
    Ok(v)
}

/// The official `_gaussian_weights` mask `[h, w]` (variance 0.01 of the normalised position;
/// note the official midpoints: `(w − 1)/2` across, `h/2` down), computed in f64 as numpy does.
pub fn gaussian_weights(h: usize, w: usize) -> Vec<f64> {
    let var = 0.01f64;
    let norm = (2.0 * std::f64::consts::PI * var).sqrt();
    let probs = |n: usize, mid: f64| -> Vec<f64> {
        (0..n)
            .map(|i| {
                let d = i as f64 - mid;
                (-d * d / (n as f64 * n as f64) / (2.0 * var)).exp() / norm
            })
            .collect()
    };
    let xs = probs(w, (w as f64 - 1.0) / 2.0);
    let ys = probs(h, h as f64 / 2.0);
    ys.iter().flat_map(|y| xs.iter().map(move |x| y * x)).collect()
}

/// Predict per tile and blend: `f(indices, tiles)` receives a batch of tiles of `x`
/// (`[n·B, C, th, tw]`, tiles of one call stacked along the batch dim in `indices` order) and
/// returns the prediction for them, shaped alike. The blended prediction is returned in f32.
/// With a single window the prediction is returned as is (identical to untiled sampling).
pub fn blend_tiles<F>(x: &Tensor, windows: &[LatentTile], batch: usize, mut f: F) -> Result<Tensor>
where
    F: FnMut(&[usize], &Tensor) -> Result<Tensor>,
{
    let (b, c, h, w) = x.dims4()?;
    if windows.is_empty() {
        candle_core::bail!("no latent tiles");
    }
    if windows.len() == 1 && windows[0] == (LatentTile { y0: 0, y1: h, x0: 0, x1: w }) {
        return f(&[0], x)?.to_dtype(DType::F32);
    }
    let (th, tw) = (windows[0].height(), windows[0].width());
    let weights: Vec<f32> = gaussian_weights(th, tw).into_iter().map(|v| v as f32).collect();
    let mut acc = Accum::new((b, c, h, w), x.device())?;
    let idx: Vec<usize> = (0..windows.len()).collect();
    for group in idx.chunks(batch.max(1)) {
        let tiles = group.iter().map(|&i| windows[i].crop(x)).collect::<Result<Vec<_>>>()?;
        let pred = f(group, &Tensor::cat(&tiles, 0)?)?.to_dtype(DType::F32)?;
        for (k, &i) in group.iter().enumerate() {
            acc.add(&pred.narrow(0, k * b, b)?, &weights, windows[i].y0, windows[i].x0)?;
        }
    }
    acc.finish()
}

/// A weighted sum of overlapping tile results and of their weights, normalised at the end. On
/// the CPU in plain vectors: candle's `slice_assign` copies the whole accumulator for every
/// tile, which makes a 4K frame's thousand latent tiles cost O(tiles × frame). Elsewhere
/// (CUDA) with tensors.
enum Accum {
    Host { acc: Vec<f32>, wsum: Vec<f32>, shape: (usize, usize, usize, usize) },
    Device { acc: Tensor, wsum: Tensor },
}

impl Accum {
    fn new(shape: (usize, usize, usize, usize), dev: &candle_core::Device) -> Result<Self> {
        let (b, c, h, w) = shape;
        Ok(if dev.is_cpu() {
            Accum::Host { acc: vec![0f32; b * c * h * w], wsum: vec![0f32; h * w], shape }
        } else {
            Accum::Device {
                acc: Tensor::zeros(shape, DType::F32, dev)?,
                wsum: Tensor::zeros((1, 1, h, w), DType::F32, dev)?,
            }
        })
    }

    /// Add `tile` (`[B, C, th, tw]`, f32) with per-pixel weights `weight` (`th × tw`) at `(y0, x0)`.
    fn add(&mut self, tile: &Tensor, weight: &[f32], y0: usize, x0: usize) -> Result<()> {
        let (tb, tc, th, tw) = tile.dims4()?;
        match self {
            Accum::Host { acc, wsum, shape: (b, c, h, w) } => {
                if (tb, tc) != (*b, *c) || y0 + th > *h || x0 + tw > *w || weight.len() != th * tw {
                    candle_core::bail!("tile {:?} at ({y0}, {x0}) does not fit {:?}", tile.dims(), (b, c, h, w));
                }
                let v = tile.flatten_all()?.to_vec1::<f32>()?;
                for plane in 0..tb * tc {
                    for y in 0..th {
                        let src = &v[(plane * th + y) * tw..][..tw];
                        let wrow = &weight[y * tw..][..tw];
                        let dst = &mut acc[(plane * *h + y0 + y) * *w + x0..][..tw];
                        for ((d, &s), &k) in dst.iter_mut().zip(src).zip(wrow) {
                            *d += s * k;
                        }
                    }
                }
                for y in 0..th {
                    let dst = &mut wsum[(y0 + y) * *w + x0..][..tw];
                    for (d, &k) in dst.iter_mut().zip(&weight[y * tw..][..tw]) {
                        *d += k;
                    }
                }
            }
            Accum::Device { acc, wsum } => {
                let wt = Tensor::from_slice(weight, (1, 1, th, tw), tile.device())?;
                let (ry, rx) = (y0..y0 + th, x0..x0 + tw);
                let region = acc.narrow(2, y0, th)?.narrow(3, x0, tw)?;
                *acc =
                    acc.slice_assign(&[0..tb, 0..tc, ry.clone(), rx.clone()], &(region + tile.broadcast_mul(&wt)?)?)?;
                let wregion = wsum.narrow(2, y0, th)?.narrow(3, x0, tw)?;
                *wsum = wsum.slice_assign(&[0..1, 0..1, ry, rx], &(wregion + wt)?)?;
            }
        }
        Ok(())
    }

    /// The weighted mean.
    fn finish(self) -> Result<Tensor> {
        match self {
            Accum::Host { mut acc, wsum, shape } => {
                let hw = shape.2 * shape.3;
                for plane in acc.chunks_mut(hw) {
                    for (a, &s) in plane.iter_mut().zip(&wsum) {
                        *a /= s;
                    }
                }
                Tensor::from_vec(acc, shape, &candle_core::Device::Cpu)
            }
            Accum::Device { acc, wsum } => acc.broadcast_div(&wsum),
        }
    }
}

// ---- autoencoder tiling (image ⇄ latent) ------------------------------------------------

/// Tiling for [`AutoencoderKl`] and [`super::taesd::Taesd`], in **latent** units.
/// A frame whose latent fits in one tile runs whole (as diffusers' `enable_tiling()`).
///
/// Each tile's core is run with `halo` extra context on every side that has image there;
/// the context is cropped off and neighbouring cores, overlapping by `overlap`, are blended
/// with linear ramps. Context removes the convolutions' zero-padding edge effects (TAESD's
/// receptive field is bounded, so a halo of ≥ 20 latents makes tiling exact for it); the
/// ramps hide what stays different per tile (the KL VAE's full-resolution GroupNorm
/// statistics; its mid-block attention runs on the whole latent), so there are no seams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TileConfig {
    /// Core tile side in latent pixels (image tile = `tile × downscale`).
    pub tile: usize,
    /// Overlap between neighbouring cores in latent pixels, blended linearly.
    pub overlap: usize,
    /// Extra context around each core in latent pixels, computed then discarded.
    pub halo: usize,
}

impl Default for TileConfig {
    /// 1024-px cores (diffusers' SD3 tile), 128-px blend, 128-px context: about 2× the
    /// untiled compute, with peak memory of one 1280-px tile.
    fn default() -> Self {
        Self { tile: 128, overlap: 16, halo: 16 }
    }
}

/// Encode-direction tiling: `x` is an image, tiles are `t × ds` pixels, output is `1/ds`.
pub fn tiled_encode<F>(x: &Tensor, t: TileConfig, ds: usize, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    tiled_map(x, t.tile * ds, t.overlap * ds, t.halo * ds, 1, ds, f)
}

/// Decode-direction tiling: `z` is a latent, output is `ds×` larger.
pub fn tiled_decode<F>(z: &Tensor, t: TileConfig, ds: usize, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    tiled_map(z, t.tile, t.overlap, t.halo, ds, 1, f)
}

/// Tile starts along one axis: stride `tile - overlap`, the last tile flush with the end;
/// every start a multiple of `align`.
fn tile_starts(size: usize, tile: usize, overlap: usize, align: usize) -> Vec<usize> {
    if size <= tile {
        return vec![0];
    }
    let stride = (tile - overlap).max(align) / align * align;
    let last = (size - tile) / align * align;
    let mut v = Vec::new();
    let mut s = 0;
    while s < last {
        v.push(s);
        s += stride;
    }
    v.push(last);
    v
}

/// 1-D blend weights for one tile of `len` output samples: linear ramps of `ramp` samples on
/// the sides that have a neighbour, 1 elsewhere (never 0, so the normalisation is safe).
fn ramp_weights(len: usize, ramp: usize, left: bool, right: bool) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let mut w = 1f32;
            if ramp > 0 {
                if left {
                    w = w.min((i as f32 + 0.5) / ramp as f32);
                }
                if right {
                    w = w.min(((len - i) as f32 - 0.5) / ramp as f32);
                }
            }
            w
        })
        .collect()
}

/// Runs `f` over overlapping spatial tiles of `x` (NCHW) and blends the results.
///
/// Sizes are in input units; `num/den` is the output/input side ratio (decode 8/1,
/// encode 1/8); tile starts stay multiples of `den` so outputs land on whole pixels. Peak
/// memory is one tile's activations (core + halo) plus the output and weight accumulators.
pub fn tiled_map<F>(
    x: &Tensor,
    tile: usize,
    overlap: usize,
    halo: usize,
    num: usize,
    den: usize,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    let (_, _, h, w) = x.dims4()?;
    let align = den;
    let tile = (tile.max(align) / align) * align;
    let overlap = (overlap.min(tile / 2) / align) * align;
    let halo = halo / align * align;
    if h <= tile && w <= tile {
        return f(x);
    }
    let ys = tile_starts(h, tile, overlap, align);
    let xs = tile_starts(w, tile, overlap, align);
    let ramp = overlap * num / den;
    let mut acc: Option<Accum> = None;
    let mut out_dtype = x.dtype();
    for (iy, &y0) in ys.iter().enumerate() {
        let th = tile.min(h - y0);
        for (ix, &x0) in xs.iter().enumerate() {
            let tw = tile.min(w - x0);
            // Core plus the context that exists around it, then crop back to the core.
            let (cy0, cx0) = (y0.saturating_sub(halo), x0.saturating_sub(halo));
            let (cy1, cx1) = ((y0 + th + halo).min(h), (x0 + tw + halo).min(w));
            let out = f(&x.narrow(2, cy0, cy1 - cy0)?.narrow(3, cx0, cx1 - cx0)?)?;
            let (oh, ow) = (th * num / den, tw * num / den);
            let out = out.narrow(2, (y0 - cy0) * num / den, oh)?.narrow(3, (x0 - cx0) * num / den, ow)?;
            let (ob, oc, _, _) = out.dims4()?;
            out_dtype = out.dtype();
            let wy = ramp_weights(oh, ramp, iy > 0, iy + 1 < ys.len());
            let wx = ramp_weights(ow, ramp, ix > 0, ix + 1 < xs.len());
            let wt: Vec<f32> = wy.iter().flat_map(|&a| wx.iter().map(move |&b| a * b)).collect();
            if acc.is_none() {
                acc = Some(Accum::new((ob, oc, h * num / den, w * num / den), out.device())?);
            }
            acc.as_mut().unwrap().add(&out.to_dtype(DType::F32)?.contiguous()?, &wt, y0 * num / den, x0 * num / den)?;
        }
    }
    acc.unwrap().finish()?.to_dtype(out_dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn windows_match_official_sliding_windows() {
        let cfg = LatentTiling::default();
        // 2048×1536 px → 256×192 latent: starts 0,120,128 down; 0,64 across.
        let v = tile_windows(192, 256, &cfg).unwrap();
        let ys: Vec<_> = v.iter().map(|t| t.y0).collect();
        let xs: Vec<_> = v.iter().map(|t| t.x0).collect();
        assert_eq!(ys, vec![0, 0, 0, 64, 64, 64]);
        assert_eq!(xs, vec![0, 120, 128, 0, 120, 128]);
        assert!(v.iter().all(|t| t.height() == 128 && t.width() == 128));
        // Exactly one stride beyond: no duplicate last window.
        assert_eq!(tile_windows(128, 248, &cfg).unwrap().len(), 2);
        // Small sides: one window covering the side.
        assert_eq!(tile_windows(86, 128, &cfg).unwrap(), vec![LatentTile { y0: 0, y1: 86, x0: 0, x1: 128 }]);
    }

    #[test]
    fn weights_match_official_formula() {
        let w = gaussian_weights(4, 3);
        // x midpoint 1.0, y midpoint 2.0
        let p = |d: f64, n: f64| (-d * d / (n * n) / 0.02).exp() / (2.0 * std::f64::consts::PI * 0.01).sqrt();
        assert!((w[0] - p(2.0, 4.0) * p(1.0, 3.0)).abs() < 1e-12);
        assert!((w[2 * 3 + 1] - p(0.0, 4.0) * p(0.0, 3.0)).abs() < 1e-12);
    }

    /// One tile: the tiled prediction is the untiled one, bit for bit.
    #[test]
    fn one_tile_equals_untiled() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 4, 40, 56), &dev)?;
        let model = |t: &Tensor| -> Result<Tensor> { (t.sin()? * 2.0)? + t.mean_all()?.to_scalar::<f32>()? as f64 };
        let cfg = LatentTiling { tile: 64, overlap: 8, batch: 1 };
        let wins = tile_windows(40, 56, &cfg)?;
        assert_eq!(wins.len(), 1);
        let tiled = blend_tiles(&x, &wins, 1, |_, t| model(t))?;
        assert_eq!(max_abs(&tiled, &model(&x)?), 0.0);
        Ok(())
    }

    /// Blending is seam-free: a constant field stays constant, and a position-independent
    /// pointwise map is reproduced everywhere (overlaps included), whatever the batching.
    #[test]
    fn blending_is_seam_free() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = LatentTiling { tile: 16, overlap: 4, batch: 3 };
        let (h, w) = (38, 50);
        let wins = tile_windows(h, w, &cfg)?;
        assert!(wins.len() > 4);
        let c = Tensor::full(0.7f32, (2, 3, h, w), &dev)?;
        let out = blend_tiles(&c, &wins, cfg.batch, |_, t| Ok(t.clone()))?;
        assert!(max_abs(&out, &c) < 1e-6);
        let x = Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?;
        let f = |t: &Tensor| (t.tanh()? * 3.0)? - 0.5;
        let out = blend_tiles(&x, &wins, cfg.batch, |_, t| f(t))?;
        assert!(max_abs(&out, &f(&x)?) < 1e-5);
        // Every pixel covered; batching does not change the result.
        let out1 = blend_tiles(&x, &wins, 1, |_, t| f(t))?;
        assert!(max_abs(&out, &out1) < 1e-6);
        Ok(())
    }

    #[test]
    fn tile_starts_cover() {
        assert_eq!(tile_starts(100, 128, 32, 1), vec![0]);
        assert_eq!(tile_starts(270, 128, 32, 1), vec![0, 96, 142]);
        for s in tile_starts(2160, 1024, 256, 8) {
            assert_eq!(s % 8, 0);
        }
    }

    /// Tiled ≈ untiled for a pointwise-plus-local map: blending must reproduce it exactly.
    #[test]
    fn tiled_map_identity_is_exact() -> Result<()> {
        let x = Tensor::randn(0f32, 1., (1, 3, 70, 90), &Device::Cpu)?;
        let y = tiled_map(&x, 32, 8, 4, 2, 1, |t| {
            let (_, _, h, w) = t.dims4()?;
            t.upsample_nearest2d(2 * h, 2 * w)
        })?;
        let r = x.upsample_nearest2d(140, 180)?;
        let d = (y - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }
}
