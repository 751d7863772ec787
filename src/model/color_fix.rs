//! Colour correction after decoding: StableSR's `wavelet_color_fix` (what DPIR's test script
//! applies) and `adain_color_fix`, on NCHW float tensors in [0, 1] (torchvision `ToTensor`),
//! plus the exact float ⇄ uint8 conversions of `ToTensor` / `ToPILImage`.

use std::str::FromStr;

use candle_core::{D, DType, Result, Tensor};

/// Which colour fix to apply to the restored image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorFix {
    /// Output high frequencies + LQ low frequencies (DPIR's choice).
    #[default]
    Wavelet,
    /// Per-channel mean/std of the output matched to the LQ.
    Adain,
    None,
}

impl FromStr for ColorFix {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "wavelet" => Ok(Self::Wavelet),
            "adain" => Ok(Self::Adain),
            "none" => Ok(Self::None),
            other => Err(format!("unknown colour fix `{other}` (expected wavelet, adain or none)")),
        }
    }
}

impl std::fmt::Display for ColorFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Wavelet => "wavelet",
            Self::Adain => "adain",
            Self::None => "none",
        })
    }
}

impl ColorFix {
    /// `target`: the restored image, `source`: the (upsampled) LQ image, both NCHW in [0, 1].
    /// Returns the unclamped float result.
    pub fn apply(self, target: &Tensor, source: &Tensor) -> Result<Tensor> {
        apply(self, target, source)
    }
}

/// See [`ColorFix::apply`].
pub fn apply(fix: ColorFix, target_output: &Tensor, source_lq: &Tensor) -> Result<Tensor> {
    match fix {
        ColorFix::Wavelet => wavelet_reconstruction(target_output, source_lq),
        ColorFix::Adain => adaptive_instance_normalization(target_output, source_lq),
        ColorFix::None => Ok(target_output.clone()),
    }
}

/// StableSR levels.
pub const WAVELET_LEVELS: usize = 5;

/// `wavelet_blur`: replicate-pad by `radius` (any size: the edge value repeats even when the
/// pad exceeds the image, as PyTorch's replicate mode does), then the depthwise
/// `[1 2 1]ᵀ[1 2 1]/16` kernel with dilation `radius`.
pub fn wavelet_blur(x: &Tensor, radius: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let k: [f32; 9] = [1. / 16., 1. / 8., 1. / 16., 1. / 8., 1. / 4., 1. / 8., 1. / 16., 1. / 8., 1. / 16.];
    let kernel = Tensor::new(&k, x.device())?.to_dtype(x.dtype())?.reshape((1, 1, 3, 3))?.repeat((c, 1, 1, 1))?;
    let padded = x.pad_with_same(D::Minus1, radius, radius)?.pad_with_same(D::Minus2, radius, radius)?;
    padded.contiguous()?.conv2d(&kernel, 0, 1, radius, c)
}

/// `wavelet_decomposition`: (high = Σ (xᵢ − blur(xᵢ)), low = last blur).
pub fn wavelet_decomposition(x: &Tensor, levels: usize) -> Result<(Tensor, Tensor)> {
    let mut high = x.zeros_like()?;
    let mut img = x.clone();
    for i in 0..levels {
        let low = wavelet_blur(&img, 1 << i)?;
        high = (high + (&img - &low)?)?;
        img = low;
    }
    Ok((high, img))
}

/// `wavelet_reconstruction(content, style)` = content high frequencies + style low ones.
///
/// Every blur level is linear (replicate padding included), so `high(c) + low(s)` equals
/// `c − low(c − s)`: one decomposition instead of two. On the CPU the low band is computed by
/// [`wavelet_low_cpu`] (separable, plain loops): candle's grouped dilated convolutions cost
/// ~0.25 s a 428×320 frame there, this ~10 ms.
pub fn wavelet_reconstruction(content: &Tensor, style: &Tensor) -> Result<Tensor> {
    if content.dims() != style.dims() {
        candle_core::bail!(
            "wavelet colour fix: output {:?} and LQ {:?} must have the same shape",
            content.dims(),
            style.dims()
        );
    }
    let diff = (content - style)?;
    let low = if content.device().is_cpu() && content.rank() == 4 {
        let (b, c, h, w) = diff.dims4()?;
        let mut data = diff.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // One plane per task: RGB keeps two cores busy (a 4K frame's planes are 10 M values).
        use rayon::prelude::*;
        data.par_chunks_exact_mut(h * w).for_each(|plane| wavelet_low_cpu(plane, h, w, WAVELET_LEVELS));
        Tensor::from_vec(data, (b, c, h, w), content.device())?.to_dtype(content.dtype())?
    } else {
        wavelet_decomposition(&diff, WAVELET_LEVELS)?.1
    };
    content - low
}

/// The low band of one `h × w` plane after `levels` blurs, in place: level `i` is the 3×3
/// `[1 2 1]ᵀ[1 2 1]/16` kernel dilated by `2^i` with replicate padding, which is separable
/// (rows, then columns; clamped indices are the replicate padding).
pub fn wavelet_low_cpu(plane: &mut [f32], h: usize, w: usize, levels: usize) {
    let mut tmp = vec![0f32; plane.len()];
    for i in 0..levels {
        let r = 1usize << i;
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            let out = &mut tmp[y * w..(y + 1) * w];
            for x in 0..w {
                let l = row[x.saturating_sub(r)];
                let rr = row[(x + r).min(w - 1)];
                out[x] = 0.25 * l + 0.5 * row[x] + 0.25 * rr;
            }
        }
        for y in 0..h {
            let (up, down) = (y.saturating_sub(r), (y + r).min(h - 1));
            for x in 0..w {
                plane[y * w + x] = 0.25 * tmp[up * w + x] + 0.5 * tmp[y * w + x] + 0.25 * tmp[down * w + x];
            }
        }
    }
}

fn calc_mean_std(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let f = x.to_dtype(DType::F64)?.reshape((b, c, h * w))?;
    let mean = f.mean_keepdim(2)?;
    let var = (f.broadcast_sub(&mean)?.sqr()?.sum_keepdim(2)? / ((h * w) as f64 - 1.0))?;
    let std = (var + eps)?.sqrt()?;
    Ok((mean.reshape((b, c, 1, 1))?, std.reshape((b, c, 1, 1))?))
}

/// StableSR `adaptive_instance_normalization(content, style)` (eps 1e-5, unbiased variance).
pub fn adaptive_instance_normalization(content: &Tensor, style: &Tensor) -> Result<Tensor> {
    let (sm, ss) = calc_mean_std(style, 1e-5)?;
    let (cm, cs) = calc_mean_std(content, 1e-5)?;
    let dt = content.dtype();
    let (sm, ss, cm, cs) = (sm.to_dtype(dt)?, ss.to_dtype(dt)?, cm.to_dtype(dt)?, cs.to_dtype(dt)?);
    content.broadcast_sub(&cm)?.broadcast_div(&cs)?.broadcast_mul(&ss)?.broadcast_add(&sm)
}

/// torchvision `ToTensor` on an RGB image: uint8 `[H, W, C]` → f32 `[1, C, H, W]` / 255
/// (the official script's quantisation steps, for the parity tests).
#[cfg(feature = "parity")]
pub fn from_uint8_hwc(img: &Tensor) -> Result<Tensor> {
    (img.to_dtype(DType::F32)?.permute((2, 0, 1))?.unsqueeze(0)? / 255.0)?.contiguous()
}

/// torchvision `ToPILImage` on a float image (`[1, C, H, W]` or `[C, H, W]`):
/// `clamp(0, 1)`, `mul(255)` in f32, then **truncate** to uint8 → `[H, W, C]`.
#[cfg(feature = "parity")]
pub fn to_uint8_hwc(img: &Tensor) -> Result<Tensor> {
    let img = if img.rank() == 4 { img.squeeze(0)? } else { img.clone() };
    let x = (img.to_dtype(DType::F32)?.clamp(0f32, 1f32)? * 255.0)?.floor()?;
    x.to_dtype(DType::U8)?.permute((1, 2, 0))?.contiguous()
}

/// StableSR `wavelet_color_fix(target, source)` / `adain_color_fix` on uint8 HWC images,
/// returning uint8 HWC as the PIL result.
#[cfg(feature = "parity")]
pub fn color_fix_uint8(fix: ColorFix, target: &Tensor, source: &Tensor) -> Result<Tensor> {
    to_uint8_hwc(&apply(fix, &from_uint8_hwc(target)?, &from_uint8_hwc(source)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn parse() {
        assert_eq!("wavelet".parse::<ColorFix>().unwrap(), ColorFix::Wavelet);
        assert_eq!("AdaIN".parse::<ColorFix>().unwrap(), ColorFix::Adain);
        assert_eq!("none".parse::<ColorFix>().unwrap(), ColorFix::None);
        assert!("x".parse::<ColorFix>().is_err());
    }

    #[cfg(feature = "parity")]
    #[test]
    fn truncation() -> Result<()> {
        let t = Tensor::new(&[0.999f32, 1.5, -0.2], &Device::Cpu)?.reshape((3, 1, 1))?;
        let u = to_uint8_hwc(&t)?.flatten_all()?.to_vec1::<u8>()?;
        assert_eq!(u, vec![254, 255, 0]);
        Ok(())
    }

    /// A constant image has no high frequencies and keeps its value through the blur.
    #[test]
    fn wavelet_fast_path_equals_the_two_decompositions() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::rand(0f32, 1f32, (1, 3, 37, 53), &dev)?;
        let s = Tensor::rand(0f32, 1f32, (1, 3, 37, 53), &dev)?;
        let reference = (wavelet_decomposition(&c, WAVELET_LEVELS)?.0 + wavelet_decomposition(&s, WAVELET_LEVELS)?.1)?;
        let fast = wavelet_reconstruction(&c, &s)?;
        let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max |diff| {err}");
        Ok(())
    }

    #[test]
    fn blur_constant_tiny() -> Result<()> {
        let x = Tensor::full(0.3f32, (1, 3, 5, 7), &Device::Cpu)?;
        let (h, l) = wavelet_decomposition(&x, WAVELET_LEVELS)?;
        assert!(h.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        assert!((l - 0.3)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        Ok(())
    }
}
