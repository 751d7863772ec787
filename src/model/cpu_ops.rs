//! CPU fast paths for the autoencoder's full-resolution layers (f32 only; every other device or
//! dtype goes through candle). On 2 cores candle's im2col convolution runs a 16→16 3×3 layer
//! on a 432×320 frame at ~2 GFLOP/s and its group norm makes ~10 passes over memory: for the
//! few-channel, large-image layers of a small autoencoder (dpir-nano's) these two dominated the
//! frame time. Here a convolution (stride 1 or 2) is row-blocked multiply-adds that stay in
//! cache, and group norm + SiLU is two passes, both split over the available cores.

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

/// `out[c][i] += w[c] · src[i]` for `cb` (1 or 4) output planes of `block`, rows from `start`.
#[inline]
fn axpy(block: &mut [f32], plane: usize, cb: usize, start: usize, src: &[f32], w: [f32; 4]) {
    let r = start..start + src.len();
    if cb == 4 {
        let (a, rest) = block.split_at_mut(plane);
        let (b, rest) = rest.split_at_mut(plane);
        let (c, d) = rest.split_at_mut(plane);
        let it = a[r.clone()].iter_mut().zip(&mut b[r.clone()]).zip(&mut c[r.clone()]).zip(&mut d[r]);
        for ((((o0, o1), o2), o3), &v) in it.zip(src) {
            *o0 += w[0] * v;
            *o1 += w[1] * v;
            *o2 += w[2] * v;
            *o3 += w[3] * v;
        }
    } else {
        for (o, &v) in block[r].iter_mut().zip(src) {
            *o += w[0] * v;
        }
    }
}

/// A `k × k` convolution with `pad` zero padding and stride 1 or 2, groups 1, dilation 1, on
/// NCHW f32. `weight` is `[cout, cin, k, k]` row-major, `bias` `[cout]`. Returns `None` where the
/// fast path does not apply (not CPU f32 NCHW, or another stride).
pub fn conv2d(
    x: &Tensor,
    weight: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    pad: usize,
    stride: usize,
) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !(stride == 1 || stride == 2) {
        return None;
    }
    Some((|| {
        let (b, cin, h, w) = x.dims4()?;
        let cout = weight.len() / (cin * k * k);
        if cout * cin * k * k != weight.len() || h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!("conv2d: weight of {} values for {cin} input channels, k {k}", weight.len());
        }
        let s = stride;
        let (ho, wo) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; b * cout * ho * wo];
        // Four output channels per pass where they divide: each input value loaded feeds four
        // multiply-adds (the loop is memory-bound with one).
        let cb = if cout.is_multiple_of(4) { 4 } else { 1 };
        let plane = ho * wo;
        // Stride 2: each zero-padded input row is split by phase (even / odd columns), so every
        // tap reads a contiguous run: tap kx is phase kx % 2 from kx / 2 on.
        let plen = (w + 2 * pad).div_ceil(s);
        par_chunks(&mut out, b * cout / cb, |first, chunk| {
            let mut phases = vec![0f32; if s == 1 { 0 } else { s * plen }];
            for (j, block) in chunk.chunks_mut(cb * plane).enumerate() {
                let item = first + j;
                let (bi, co0) = (item * cb / cout, item * cb % cout);
                for (c, p) in block.chunks_mut(plane).enumerate() {
                    p.fill(bias.map_or(0.0, |bv| bv[co0 + c]));
                }
                let img = &xs[bi * cin * h * w..(bi + 1) * cin * h * w];
                let wt = |ci: usize, ky: usize, kx: usize| {
                    let at = |c: usize| weight[(((co0 + c) * cin + ci) * k + ky) * k + kx];
                    if cb == 4 { [at(0), at(1), at(2), at(3)] } else { [at(0), 0.0, 0.0, 0.0] }
                };
                for y in 0..ho {
                    for ci in 0..cin {
                        let chan = &img[ci * h * w..(ci + 1) * h * w];
                        for ky in 0..k {
                            let iy = y * s + ky;
                            if iy < pad || iy - pad >= h {
                                continue;
                            }
                            let irow = &chan[(iy - pad) * w..(iy - pad + 1) * w];
                            if s == 1 {
                                for kx in 0..k {
                                    // output x reads input x + kx - pad, inside [0, w)
                                    let x0 = pad.saturating_sub(kx);
                                    let x1 = wo.min(w + pad - kx);
                                    if x0 < x1 {
                                        let src = &irow[x0 + kx - pad..x1 + kx - pad];
                                        axpy(block, plane, cb, y * wo + x0, src, wt(ci, ky, kx));
                                    }
                                }
                            } else {
                                phases.fill(0.0);
                                for (i, &v) in irow.iter().enumerate() {
                                    let pi = i + pad;
                                    phases[(pi % s) * plen + pi / s] = v;
                                }
                                for kx in 0..k {
                                    let off = (kx % s) * plen + kx / s;
                                    axpy(block, plane, cb, y * wo, &phases[off..off + wo], wt(ci, ky, kx));
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
        let cases = [
            (5, 7, 3, 1, 1, 13, 17),
            (4, 6, 1, 0, 1, 9, 11),
            (3, 2, 3, 0, 1, 8, 5),
            (6, 8, 3, 1, 1, 11, 19),
            (8, 4, 1, 0, 1, 5, 7),
            // stride 2, as Downsample2D (input padded right/bottom beforehand, conv padding 0)
            (8, 8, 3, 0, 2, 13, 18),
            (3, 5, 3, 1, 2, 12, 9),
        ];
        for &(cin, cout, k, pad, stride, h, w) in &cases {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., cout, &dev)?;
            let cfg = candle_nn::Conv2dConfig { padding: pad, stride, ..Default::default() };
            let reference = candle_nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg).forward(&x)?;
            let ws = wt.flatten_all()?.to_vec1::<f32>()?;
            let bs = bias.to_vec1::<f32>()?;
            let fast = conv2d(&x, &ws, Some(&bs), k, pad, stride).unwrap()?;
            assert_eq!(fast.dims(), reference.dims(), "cin {cin} cout {cout} k {k} stride {stride}");
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "cin {cin} cout {cout} k {k} stride {stride}: max |diff| {err}");
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
