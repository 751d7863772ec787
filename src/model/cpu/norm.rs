//! Group norm on NCHW f32, SiLU fused on demand.

use candle_core::{Result, Tensor};

use super::math::{affine_silu, sums};
use super::par_chunks;

/// Group norm (per sample, `groups` groups, affine `gamma`/`beta`), optionally followed by SiLU,
/// on NCHW f32. Statistics in f64 (biased variance, as torch). `None` where it does not apply.
pub fn group_norm(x: &Tensor, groups: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if groups == 0 || c % groups != 0 || gamma.len() != c || beta.len() != c {
        candle_core::bail!("group_norm: {c} channels, {groups} groups, {} affine values", gamma.len());
    }
    let mut data = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let cpg = c / groups;
    let hw = h * w;
    par_chunks(&mut data, b * groups, |first, chunk| {
        for (j, grp) in chunk.chunks_mut(cpg * hw).enumerate() {
            let g = (first + j) % groups;
            let (mut sum, mut sq) = (0f64, 0f64);
            for plane in grp.chunks(hw) {
                // f32 partial sums per plane (16 lanes of ≤ a few 10k values each), f64 across planes
                let (s, q) = sums(plane);
                sum += s as f64;
                sq += q as f64;
            }
            let n = (cpg * hw) as f64;
            let mean = sum / n;
            let var = (sq / n - mean * mean).max(0.0);
            let inv = 1.0 / (var + eps).sqrt();
            for (ci, plane) in grp.chunks_mut(hw).enumerate() {
                let ch = g * cpg + ci;
                let scale = (gamma[ch] as f64 * inv) as f32;
                let shift = (beta[ch] as f64 - mean * gamma[ch] as f64 * inv) as f32;
                if silu {
                    affine_silu(plane, scale, shift);
                } else {
                    for v in plane.iter_mut() {
                        *v = *v * scale + shift;
                    }
                }
            }
        }
    });
    Tensor::from_vec(data, (b, c, h, w), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn fused_group_norm_silu_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 8, 9, 13), &dev)?.affine(3.0, 0.5)?;
        let gamma = Tensor::randn(0f32, 1., 8, &dev)?;
        let beta = Tensor::randn(0f32, 1., 8, &dev)?;
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), 8, 4, 1e-6)?;
        let reference = candle_nn::ops::silu(&gn.forward(&x)?)?;
        let (g, b) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
        let fast = group_norm(&x, 4, &g, &b, 1e-6, true)?;
        let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "max |diff| {err}");
        Ok(())
    }
}
