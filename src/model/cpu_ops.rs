//! CPU fast paths for the autoencoder's full-resolution layers (f32 only; every other device or
//! dtype goes through candle). On 2 cores candle's im2col convolution runs a 16→16 3×3 layer
//! on a 432×320 frame at ~2 GFLOP/s and its group norm makes ~10 passes over memory: for the
//! few-channel, large-image layers of a small autoencoder (dpir-nano's) these two dominated the
//! frame time. Here a convolution is row-blocked multiply-adds that stay in cache, and group
//! norm + SiLU is two passes, both split over the available cores.

use candle_core::{DType, Device, Result, Tensor};

/// Threads for one op: the machine's cores, but never more than there are work items.
fn threads(items: usize) -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(items).max(1)
}

/// Run `f(first_item, chunk)` over `out` cut into `items` equal parts, spread over threads.
fn par_chunks<F>(out: &mut [f32], items: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let per_item = out.len() / items.max(1);
    let n = threads(items);
    let items_per_thread = items.div_ceil(n);
    if n == 1 {
        f(0, out);
        return;
    }
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(items_per_thread * per_item).enumerate() {
            let f = &f;
            s.spawn(move || f(t * items_per_thread, chunk));
        }
    });
}

/// `DPIR_CPU_OPS=0` turns these paths off (candle's kernels instead), for side-by-side benchmarks.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("DPIR_CPU_OPS").is_none_or(|v| v != "0"))
}

fn cpu_f32(x: &Tensor) -> bool {
    enabled() && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 4
}

/// A stride-1 `k × k` convolution with `pad` zero padding, groups 1, dilation 1, on NCHW f32.
/// `weight` is `[cout, cin, k, k]` row-major, `bias` `[cout]`. Returns `None` where the fast
/// path does not apply (not CPU f32 NCHW).
pub fn conv2d_stride1(
    x: &Tensor,
    weight: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    pad: usize,
) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
        let (b, cin, h, w) = x.dims4()?;
        let cout = weight.len() / (cin * k * k);
        if cout * cin * k * k != weight.len() || h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!("conv2d_stride1: weight of {} values for {cin} input channels, k {k}", weight.len());
        }
        let (ho, wo) = (h + 2 * pad - k + 1, w + 2 * pad - k + 1);
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; b * cout * ho * wo];
        // Four output channels per pass where they divide: each input value loaded feeds four
        // multiply-adds (the loop is memory-bound with one).
        let cb = if cout.is_multiple_of(4) { 4 } else { 1 };
        let plane = ho * wo;
        par_chunks(&mut out, b * cout / cb, |first, chunk| {
            for (j, block) in chunk.chunks_mut(cb * plane).enumerate() {
                let item = first + j;
                let (bi, co0) = (item * cb / cout, item * cb % cout);
                for (c, p) in block.chunks_mut(plane).enumerate() {
                    p.fill(bias.map_or(0.0, |bv| bv[co0 + c]));
                }
                let img = &xs[bi * cin * h * w..(bi + 1) * cin * h * w];
                let wt = |c: usize, ci: usize, ky: usize, kx: usize| weight[(((co0 + c) * cin + ci) * k + ky) * k + kx];
                for y in 0..ho {
                    for ci in 0..cin {
                        let chan = &img[ci * h * w..(ci + 1) * h * w];
                        for ky in 0..k {
                            let iy = y + ky;
                            if iy < pad || iy - pad >= h {
                                continue;
                            }
                            let irow = &chan[(iy - pad) * w..(iy - pad + 1) * w];
                            for kx in 0..k {
                                // output x reads input x + kx - pad, inside [0, w)
                                let x0 = pad.saturating_sub(kx);
                                let x1 = wo.min(w + pad - kx);
                                if x0 >= x1 {
                                    continue;
                                }
                                let src = &irow[x0 + kx - pad..x1 + kx - pad];
                                let row = |c: usize| (c * plane + y * wo + x0)..(c * plane + y * wo + x1);
                                if cb == 4 {
                                    let (w0, w1, w2, w3) =
                                        (wt(0, ci, ky, kx), wt(1, ci, ky, kx), wt(2, ci, ky, kx), wt(3, ci, ky, kx));
                                    let (a, rest) = block.split_at_mut(plane);
                                    let (bb, rest) = rest.split_at_mut(plane);
                                    let (c, d) = rest.split_at_mut(plane);
                                    let r = row(0);
                                    let it = a[r.clone()]
                                        .iter_mut()
                                        .zip(&mut bb[r.clone()])
                                        .zip(&mut c[r.clone()])
                                        .zip(&mut d[r]);
                                    for ((((o0, o1), o2), o3), &v) in it.zip(src) {
                                        *o0 += w0 * v;
                                        *o1 += w1 * v;
                                        *o2 += w2 * v;
                                        *o3 += w3 * v;
                                    }
                                } else {
                                    let wv = wt(0, ci, ky, kx);
                                    for (o, &v) in block[row(0)].iter_mut().zip(src) {
                                        *o += wv * v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
        Tensor::from_vec(out, (b, cout, ho, wo), x.device())
    })())
}

/// Group norm (per sample, `groups` groups, affine `gamma`/`beta`), optionally followed by SiLU,
/// on NCHW f32. Statistics in f64 (biased variance, as torch). `None` where it does not apply.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    silu: bool,
) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
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
                    let (s, q) = plane.iter().fold((0f32, 0f32), |(s, q), &v| (s + v, q + v * v));
                    // f32 partial sums per plane (≤ a few 100k values), f64 across planes
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
                        for v in plane.iter_mut() {
                            let y = *v * scale + shift;
                            *v = y / (1.0 + (-y).exp());
                        }
                    } else {
                        for v in plane.iter_mut() {
                            *v = *v * scale + shift;
                        }
                    }
                }
            }
        });
        Tensor::from_vec(data, (b, c, h, w), x.device())
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    #[test]
    fn direct_convolution_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for &(cin, cout, k, pad, h, w) in
            &[(5, 7, 3, 1, 13, 17), (4, 6, 1, 0, 9, 11), (3, 2, 3, 0, 8, 5), (6, 8, 3, 1, 11, 19), (8, 4, 1, 0, 5, 7)]
        {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., cout, &dev)?;
            let cfg = candle_nn::Conv2dConfig { padding: pad, ..Default::default() };
            let reference = candle_nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg).forward(&x)?;
            let ws = wt.flatten_all()?.to_vec1::<f32>()?;
            let bs = bias.to_vec1::<f32>()?;
            let fast = conv2d_stride1(&x, &ws, Some(&bs), k, pad).unwrap()?;
            assert_eq!(fast.dims(), reference.dims());
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "cin {cin} cout {cout} k {k}: max |diff| {err}");
        }
        Ok(())
    }

    #[test]
    fn fused_group_norm_silu_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 8, 9, 13), &dev)?.affine(3.0, 0.5)?;
        let gamma = Tensor::randn(0f32, 1., 8, &dev)?;
        let beta = Tensor::randn(0f32, 1., 8, &dev)?;
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), 8, 4, 1e-6)?;
        let reference = candle_nn::ops::silu(&gn.forward(&x)?)?;
        let (g, b) = (gamma.to_vec1::<f32>()?, beta.to_vec1::<f32>()?);
        let fast = group_norm(&x, 4, &g, &b, 1e-6, true).unwrap()?;
        let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-4, "max |diff| {err}");
        assert!(group_norm(&x.to_dtype(DType::F16)?, 4, &g, &b, 1e-6, true).is_none(), "f16 goes through candle");
        Ok(())
    }
}
