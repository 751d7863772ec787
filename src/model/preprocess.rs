//! CLIP image pre-processing, bit-exact with the default `CLIPImageProcessor` (transformers
//! 4.44) that DPIR builds: shortest edge → 224 with PIL's antialiased bicubic (8-bit fixed point),
//! long edge `int(224 · long / short)` (truncated), centre crop, `x · (1/255)` in f64 then f32,
//! `(x − mean) / std` in f32 with the OpenAI statistics.
//!
//! The resampler is a re-implementation of Pillow's `libImaging/Resample.c` convolution
//! (separable, horizontal pass first, coefficients quantised to 22 fractional bits, each pass
//! rounded and clamped to u8) so that the resized uint8 image matches Pillow exactly.

use candle_core::{DType, Device, Tensor};
use candle_core::{Result, bail};

/// An owned 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// `height · width · 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        ensure!(
            data.len() == width * height * 3,
            "RgbImage {width}x{height}: {} bytes, expected {}",
            data.len(),
            width * height * 3
        );
        Ok(Self { width, height, data })
    }

    /// From a `[H, W, 3]` u8 tensor (the fixtures' `*_uint8` layout).
    pub fn from_hwc_tensor(t: &Tensor) -> Result<Self> {
        let (h, w, c) = t.dims3()?;
        ensure!(c == 3, "expected [H, W, 3], got {:?}", t.dims());
        let data = t.to_device(&Device::Cpu)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        Self::new(w, h, data)
    }

    /// As a `[H, W, 3]` u8 tensor.
    pub fn to_hwc_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.data.clone(), (self.height, self.width, 3), device)
    }

    /// The sub-image of rows `y0..y1`, columns `x0..x1` (must lie inside the image).
    pub fn crop(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> Result<Self> {
        ensure!(
            x0 < x1 && x1 <= self.width && y0 < y1 && y1 <= self.height,
            "crop [{x0},{x1})x[{y0},{y1}) outside {}x{}",
            self.width,
            self.height
        );
        let w = x1 - x0;
        let mut data = Vec::with_capacity(w * (y1 - y0) * 3);
        for y in y0..y1 {
            let row = (y * self.width + x0) * 3;
            data.extend_from_slice(&self.data[row..row + w * 3]);
        }
        Self::new(w, y1 - y0, data)
    }
}

/// PIL's bicubic kernel (a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output sample: first input index and its filter weights (Pillow's `precompute_coeffs`,
/// box = whole image), normalised to sum 1.
fn float_coeffs(in_size: usize, out_size: usize) -> (Vec<usize>, Vec<Vec<f64>>) {
    // Pillow computes `(double)(in1 - in0) / outSize` with float box edges: exact for sizes here.
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ss = 1.0 / filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero, then clamps.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n).map(|x| bicubic(((x + xmin) as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            for v in &mut k {
                *v /= ww;
            }
        }
        start.push(xmin);
        weights.push(k);
    }
    (start, weights)
}

/// The same weights quantised to Pillow's 8-bit fixed point (`normalize_coeffs_8bpc`).
struct Coeffs {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let (start, fw) = float_coeffs(in_size, out_size);
    let weights = fw
        .iter()
        .map(|k| {
            k.iter()
                .map(|&v| {
                    let s = v * (1u32 << PRECISION_BITS) as f64;
                    (if v < 0.0 { -0.5 + s } else { 0.5 + s }) as i32
                })
                .collect()
        })
        .collect();
    Coeffs { start, weights }
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize like Pillow's `Image.resize(size, BICUBIC)` on an RGB image (antialiased when
/// downscaling, 8-bit rounding after each pass).
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> Result<RgbImage> {
    ensure!(img.width > 0 && img.height > 0 && out_w > 0 && out_h > 0, "resize: empty image");
    let (w, h) = (img.width, img.height);
    let half = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass (only if the width changes), over all rows: the rows the vertical pass
    // does not read cost time but do not change any value.
    let tmp = if out_w != w {
        let c = coeffs(w, out_w);
        let mut out = vec![0u8; h * out_w * 3];
        for y in 0..h {
            let row = &img.data[y * w * 3..(y + 1) * w * 3];
            for xx in 0..out_w {
                let s = c.start[xx];
                let mut acc = [half; 3];
                for (i, &k) in c.weights[xx].iter().enumerate() {
                    let p = &row[(s + i) * 3..(s + i) * 3 + 3];
                    for ch in 0..3 {
                        acc[ch] += p[ch] as i64 * k as i64;
                    }
                }
                let o = (y * out_w + xx) * 3;
                for ch in 0..3 {
                    out[o + ch] = clip8(acc[ch]);
                }
            }
        }
        out
    } else {
        img.data.clone()
    };
    if out_h == h {
        return RgbImage::new(out_w, h, tmp);
    }
    let c = coeffs(h, out_h);
    let stride = out_w * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i64; stride];
    for yy in 0..out_h {
        acc.iter_mut().for_each(|a| *a = half);
        let s = c.start[yy];
        for (i, &k) in c.weights[yy].iter().enumerate() {
            let row = &tmp[(s + i) * stride..(s + i + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i64 * k as i64;
            }
        }
        for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::new(out_w, out_h, out)
}

/// Interleaved RGB pixels of an LQ frame: 8-bit, or floats in [0, 1].
#[derive(Debug, Clone, Copy)]
pub enum RgbPixels<'a> {
    U8(&'a [u8]),
    F32(&'a [f32]),
}

/// The LQ frame as the model takes it, in one pass: `[1, 3, ph, pw]` f32 in [0, 1] (8-bit values
/// `/ 255`, exactly torchvision's `ToTensor`), the last row and column repeated out to the padded
/// size `pw × ph` (the model needs multiples of 16).
pub fn lq_tensor(pixels: RgbPixels, w: usize, h: usize, pw: usize, ph: usize, device: &Device) -> Result<Tensor> {
    ensure!(w > 0 && h > 0 && pw >= w && ph >= h, "lq_tensor: {w}x{h} padded to {pw}x{ph}");
    let n = match pixels {
        RgbPixels::U8(v) => v.len(),
        RgbPixels::F32(v) => v.len(),
    };
    ensure!(n == w * h * 3, "lq_tensor: {n} values for {w}x{h} RGB");
    let plane = pw * ph;
    let mut out = vec![0f32; 3 * plane];
    for y in 0..ph {
        let sy = y.min(h - 1);
        for x in 0..pw {
            let i = (sy * w + x.min(w - 1)) * 3;
            let o = y * pw + x;
            match pixels {
                RgbPixels::U8(v) => {
                    for c in 0..3 {
                        out[c * plane + o] = v[i + c] as f32 / 255.0;
                    }
                }
                RgbPixels::F32(v) => {
                    for c in 0..3 {
                        out[c * plane + o] = v[i + c];
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (1, 3, ph, pw), device)
}

/// Pillow's bicubic filter on float RGB (`[h·w·3]`, values in [0, 1]) with no 8-bit rounding:
/// the same separable filter and weights as [`resize_bicubic`], accumulated in f32 and clamped
/// to [0, 1] after each pass as Pillow clamps to [0, 255]. For 10- and 16-bit frames, whose
/// precision an 8-bit resize would throw away; on 8-bit input it agrees with
/// [`resize_bicubic`] to within one level.
pub fn resize_bicubic_f32(data: &[f32], w: usize, h: usize, out_w: usize, out_h: usize) -> Result<Vec<f32>> {
    ensure!(w > 0 && h > 0 && out_w > 0 && out_h > 0, "resize: empty image");
    ensure!(data.len() == w * h * 3, "resize: {} values for {w}x{h} RGB", data.len());
    let tmp = if out_w != w {
        let (start, k) = float_coeffs(w, out_w);
        let k: Vec<Vec<f32>> = k.iter().map(|k| k.iter().map(|&v| v as f32).collect()).collect();
        let mut out = vec![0f32; h * out_w * 3];
        for y in 0..h {
            let row = &data[y * w * 3..(y + 1) * w * 3];
            for xx in 0..out_w {
                let s = start[xx];
                let mut acc = [0f32; 3];
                for (i, &kv) in k[xx].iter().enumerate() {
                    let p = &row[(s + i) * 3..(s + i) * 3 + 3];
                    for ch in 0..3 {
                        acc[ch] += p[ch] * kv;
                    }
                }
                let o = (y * out_w + xx) * 3;
                for ch in 0..3 {
                    out[o + ch] = acc[ch].clamp(0.0, 1.0);
                }
            }
        }
        out
    } else {
        data.to_vec()
    };
    if out_h == h {
        return Ok(tmp);
    }
    let (start, k) = float_coeffs(h, out_h);
    let stride = out_w * 3;
    let mut out = vec![0f32; out_h * stride];
    for yy in 0..out_h {
        let o = &mut out[yy * stride..(yy + 1) * stride];
        for (i, &kv) in k[yy].iter().enumerate() {
            let kv = kv as f32;
            let row = &tmp[(start[yy] + i) * stride..(start[yy] + i + 1) * stride];
            for (a, &p) in o.iter_mut().zip(row) {
                *a += p * kv;
            }
        }
        o.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    }
    Ok(out)
}

/// The settings of the default `CLIPImageProcessor` (every DPIR processor uses the defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessConfig {
    pub shortest_edge: usize,
    pub crop_height: usize,
    pub crop_width: usize,
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for ClipPreprocessConfig {
    fn default() -> Self {
        Self {
            shortest_edge: 224,
            crop_height: 224,
            crop_width: 224,
            rescale_factor: 1.0 / 255.0,
            // Python floats cast to f32, as numpy does (`np.array(mean, dtype=float32)`).
            mean: [0.48145466f64 as f32, 0.4578275f64 as f32, 0.40821073f64 as f32],
            std: [0.26862954f64 as f32, 0.26130258f64 as f32, 0.27577711f64 as f32],
        }
    }
}

impl ClipPreprocessConfig {
    /// Output size `(width, height)` of the shortest-edge resize (transformers'
    /// `get_resize_output_image_size(default_to_square=False)`: the long side is truncated).
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let (short, long) = if width <= height { (width, height) } else { (height, width) };
        let s = self.shortest_edge;
        // Python `int(s * long / short)`: a correctly rounded true division, then truncation.
        let new_long = ((s * long) as f64 / short as f64) as usize;
        if width <= height { (s, new_long) } else { (new_long, s) }
    }

    /// The uint8 image after the shortest-edge resize (before the crop).
    pub fn resize(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = self.resized_size(img.width, img.height);
        if (w, h) == (img.width, img.height) {
            return Ok(img.clone()); // PIL returns a copy when the size is unchanged
        }
        resize_bicubic(img, w, h)
    }

    /// Centre crop, rescale and normalise a resized image into `[3, crop_h, crop_w]` f32 values.
    fn crop_normalize(&self, r: &RgbImage, out: &mut Vec<f32>) -> Result<()> {
        let (ch, cw) = (self.crop_height, self.crop_width);
        if r.height < ch || r.width < cw {
            bail!("resized image {}x{} smaller than the {cw}x{ch} crop", r.width, r.height);
        }
        let top = (r.height - ch) / 2;
        let left = (r.width - cw) / 2;
        for c in 0..3 {
            let (m, s) = (self.mean[c], self.std[c]);
            for y in top..top + ch {
                let row = &r.data[(y * r.width + left) * 3..(y * r.width + left + cw) * 3];
                // `astype(float64) * scale` → float32, then float32 `(x - mean) / std`.
                out.extend(row.chunks_exact(3).map(|p| (((p[c] as f64 * self.rescale_factor) as f32) - m) / s));
            }
        }
        Ok(())
    }

    /// `pixel_values [N, 3, crop_h, crop_w]` (f32, on `device`) for a batch of images.
    pub fn pixel_values(&self, imgs: &[&RgbImage], device: &Device) -> Result<Tensor> {
        ensure!(!imgs.is_empty(), "pixel_values: no images");
        let mut v = Vec::with_capacity(imgs.len() * 3 * self.crop_height * self.crop_width);
        for img in imgs {
            self.crop_normalize(&self.resize(img)?, &mut v)?;
        }
        Tensor::from_vec(v, (imgs.len(), 3, self.crop_height, self.crop_width), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_truncates() {
        let c = ClipPreprocessConfig::default();
        assert_eq!(c.resized_size(333, 250), (298, 224));
        assert_eq!(c.resized_size(200, 120), (373, 224));
        assert_eq!(c.resized_size(100, 100), (224, 224));
    }

    /// Pseudo-random image (LCG) shared with the Python script that produced the hashes.
    fn lcg_image(w: usize, h: usize, seed: u64) -> RgbImage {
        let mut x = seed;
        let data = (0..w * h * 3)
            .map(|_| {
                x = (x * 1_103_515_245 + 12_345) % (1 << 31);
                ((x >> 16) & 255) as u8
            })
            .collect();
        RgbImage::new(w, h, data).unwrap()
    }

    fn fnv1a(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| (h ^ c as u64).wrapping_mul(0x100_0000_01b3))
    }

    /// FNV-1a of Pillow 10.4.0 `Image.fromarray(img).resize((W, H), Image.BICUBIC)` on noise:
    /// down/up-scaling, one axis only, extreme ratios, 1-px input.
    #[test]
    fn matches_pillow_bicubic_on_noise() {
        let cases: [(usize, usize, usize, usize, u64, u64); 11] = [
            (333, 250, 298, 224, 1, 0x4e8d8b258ec77c4e),
            (200, 120, 373, 224, 2, 0x4f0aa6b961bf8d65),
            (1024, 336, 682, 224, 3, 0xc0409f73f10c5734),
            (2000, 1500, 298, 224, 4, 0x43ece21d2e77f435),
            (64, 96, 224, 336, 5, 0x50dccf153b6df501),
            (7, 3, 3, 2, 6, 0xc355ca01b07fded4),
            (1, 1, 5, 4, 7, 0xfdafe4eb7ad0ecf5),
            (300, 300, 224, 224, 8, 0xa3c66a8495e1fcb2),
            (225, 224, 224, 224, 9, 0xf77a9fa7e973cc7d),
            (224, 300, 224, 180, 10, 0x638310d2d9fcff22),
            (50, 1000, 224, 4480, 11, 0xecf95951024f37f8),
        ];
        for (w, h, ow, oh, seed, want) in cases {
            let r = resize_bicubic(&lcg_image(w, h, seed), ow, oh).unwrap();
            assert_eq!(fnv1a(&r.data), want, "{w}x{h} -> {ow}x{oh}");
        }
    }

    /// On 8-bit values the float resize is the 8-bit one without its two roundings (half a level
    /// each; the second pass's weights sum to about 1.1 in absolute value): within 1.5 levels
    /// everywhere, and it keeps sub-level detail the 8-bit one cannot.
    #[test]
    fn float_resize_agrees_with_pillow_on_8_bit_input_and_keeps_finer_steps() {
        for (w, h, ow, oh, seed) in [(61, 47, 122, 94, 3u64), (100, 80, 400, 320, 4), (333, 250, 298, 224, 5)] {
            let img = lcg_image(w, h, seed);
            let f: Vec<f32> = img.data.iter().map(|&v| v as f32 / 255.0).collect();
            let r8 = resize_bicubic(&img, ow, oh).unwrap();
            let rf = resize_bicubic_f32(&f, w, h, ow, oh).unwrap();
            let worst = r8.data.iter().zip(&rf).map(|(&a, &b)| (a as f32 - b * 255.0).abs()).fold(0f32, f32::max);
            assert!(worst <= 1.5, "{w}x{h} -> {ow}x{oh}: {worst} levels apart");
        }
        // A ramp a tenth of a level high survives the float resize and vanishes in the 8-bit one.
        let (w, h) = (64, 8);
        let ramp: Vec<f32> = (0..w * h * 3).map(|i| 0.5 + ((i / 3) % w) as f32 / w as f32 * 0.1 / 255.0).collect();
        let up = resize_bicubic_f32(&ramp, w, h, 2 * w, 2 * h).unwrap();
        let row: Vec<f32> = up[..2 * w * 3].chunks(3).map(|p| p[0]).collect();
        assert!(row[2 * w - 1] - row[0] > 0.08 / 255.0, "the ramp is kept: {:?}", (row[0], row[2 * w - 1]));
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(37, 53, vec![77; 37 * 53 * 3]).unwrap();
        for (w, h) in [(224, 320), (10, 7), (37, 100)] {
            let r = resize_bicubic(&img, w, h).unwrap();
            assert!(r.data.iter().all(|&v| v == 77));
        }
    }
}
