//! Convolutions on NCHW f32: `k × k` (stride 1 or 2) as blocked im2col + GEMM, and nearest ×2
//! upsampling followed by a 3×3 convolution as four sub-pixel 2×2 convolutions.

use candle_core::{Result, Tensor};

use super::{OutPtr, gemm_rm, par_ranges, with_f32};

fn block_rows(k_len: usize, wo: usize, ho: usize) -> usize {
    // Never fewer blocks than threads: a small image (the control branch's latent) would
    // otherwise run on one core.
    let balanced = ho.div_ceil(rayon::current_num_threads()).max(1);
    // At least MIN_COLS columns a block: each GEMM call packs the whole weight matrix again, so
    // narrow blocks of a wide layer (512 channels at 32 px: 32 columns against 512 × 4608
    // weights) spend more time packing than multiplying.
    const MIN_COLS: usize = 256;
    ((128 * 1024) / (k_len * wo).max(1)).max(MIN_COLS.div_ceil(wo.max(1))).clamp(1, balanced)
}

/// Zero padding of a convolution's input: rows above and below, columns left and right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    pub fn same(p: usize) -> Self {
        Self { top: p, bottom: p, left: p, right: p }
    }
}

/// One row of the patch matrix: `out[x] = src[x·s + off − pad]` (zero outside `src`), for
/// stride `s` 1 or 2: zeros, one contiguous (s = 1) or strided run, zeros.
#[inline]
fn gather_row(out: &mut [f32], src: &[f32], s: usize, off: usize, pad: usize) {
    let (wo, w) = (out.len(), src.len());
    // valid x: 0 <= x·s + off − pad < w
    let x0 = pad.saturating_sub(off).div_ceil(s).min(wo);
    let x1 = if w + pad > off { ((w + pad - off - 1) / s + 1).min(wo).max(x0) } else { x0 };
    out[..x0].fill(0.0);
    if x1 > x0 {
        let start = x0 * s + off - pad;
        if s == 1 {
            out[x0..x1].copy_from_slice(&src[start..start + (x1 - x0)]);
        } else {
            for (o, &v) in out[x0..x1].iter_mut().zip(src[start..].iter().step_by(s)) {
                *o = v;
            }
        }
    }
    out[x1..].fill(0.0);
}

/// A `k × k` convolution with zero padding `pad` and stride 1 or 2, groups 1, dilation 1, on
/// NCHW f32. `weight` is `[cout, cin, k, k]` row-major (= `[cout, cin·k·k]`), `bias` `[cout]`.
/// Returns `None` where the fast path does not apply (not CPU f32 NCHW, or another stride).
pub fn conv2d(
    x: &Tensor,
    weight: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    pad: Padding,
    stride: usize,
) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let k_len = cin * k * k;
    let cout = weight.len() / k_len.max(1);
    let (hp, wp) = (h + pad.top + pad.bottom, w + pad.left + pad.right);
    if cout * k_len != weight.len() || hp < k || wp < k {
        candle_core::bail!("conv2d: weight of {} values for {cin} input channels, k {k}", weight.len());
    }
    let s = stride;
    let (ho, wo) = ((hp - k) / s + 1, (wp - k) / s + 1);
    let plane = ho * wo;
    let mut out = vec![0f32; b * cout * plane];
    for (co, p) in out.chunks_mut(plane).enumerate() {
        p.fill(bias.map_or(0.0, |bv| bv[co % cout]));
    }
    with_f32(x, |xs| {
        let dst = OutPtr(out.as_mut_ptr());
        if k == 1 && pad == Padding::same(0) && s == 1 {
            // 1×1: the input planes are the patch matrix already.
            par_ranges(b * plane.div_ceil(4096), |lo, hi| {
                let blocks = plane.div_ceil(4096);
                for item in lo..hi {
                    let (bi, p0) = (item / blocks, (item % blocks) * 4096);
                    let n = 4096.min(plane - p0);
                    unsafe {
                        gemm_rm(
                            cout,
                            n,
                            cin,
                            dst.at(bi * cout * plane + p0),
                            plane,
                            weight.as_ptr(),
                            xs.as_ptr().add(bi * cin * h * w + p0),
                            h * w,
                            true,
                        )
                    };
                }
            });
            return Ok(());
        }
        let rows = block_rows(k_len, wo, ho);
        let blocks = ho.div_ceil(rows);
        par_ranges(b * blocks, |lo, hi| {
            let mut col = vec![0f32; k_len * rows * wo];
            for item in lo..hi {
                let (bi, y0) = (item / blocks, (item % blocks) * rows);
                let nr = rows.min(ho - y0);
                let npos = nr * wo;
                let img = &xs[bi * cin * h * w..(bi + 1) * cin * h * w];
                // Patch matrix: row (ci, ky, kx), column (y, x) of this block.
                for ci in 0..cin {
                    let chan = &img[ci * h * w..(ci + 1) * h * w];
                    for ky in 0..k {
                        for kx in 0..k {
                            let r = &mut col[((ci * k + ky) * k + kx) * npos..][..npos];
                            for (yy, orow) in r.chunks_mut(wo).enumerate() {
                                let iy = (y0 + yy) * s + ky;
                                if iy < pad.top || iy - pad.top >= h {
                                    orow.fill(0.0);
                                } else {
                                    let irow = &chan[(iy - pad.top) * w..(iy - pad.top + 1) * w];
                                    gather_row(orow, irow, s, kx, pad.left);
                                }
                            }
                        }
                    }
                }
                unsafe {
                    gemm_rm(
                        cout,
                        npos,
                        k_len,
                        dst.at(bi * cout * plane + y0 * wo),
                        plane,
                        weight.as_ptr(),
                        col.as_ptr(),
                        npos,
                        true,
                    )
                };
            }
        });
        Ok(())
    })?;
    Tensor::from_vec(out, (b, cout, ho, wo), x.device())
}

/// The four 2×2 kernels that nearest ×2 upsampling followed by a 3×3 convolution (padding 1)
/// amounts to, one per output phase `(a, b)` (output pixel `(2i + a, 2j + b)`): tap `ty` reads
/// input row `i + ty − 1 + a` (columns alike) with the 3×3 weights of the rows landing on it
/// summed — phase 0 takes row `i − 1` with `w[0]` and row `i` with `w[1] + w[2]`, phase 1 row `i`
/// with `w[0] + w[1]` and row `i + 1` with `w[2]`.
#[derive(Debug, Clone)]
pub struct SubPixelWeights {
    /// `[phase = 2a + b][cout][cin · 4]`.
    phases: [Vec<f32>; 4],
    cout: usize,
    cin: usize,
}

impl SubPixelWeights {
    /// From `[cout, cin, 3, 3]` row-major weights.
    pub fn new(weight: &[f32], cout: usize, cin: usize) -> Self {
        // taps[phase][t] = the 3×3 rows (or columns) summed into 2×2 tap t.
        let taps: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];
        let phases = std::array::from_fn(|ph| {
            let (a, b) = (ph / 2, ph % 2);
            let mut v = vec![0f32; cout * cin * 4];
            for co in 0..cout {
                for ci in 0..cin {
                    let w = &weight[(co * cin + ci) * 9..][..9];
                    for ty in 0..2 {
                        for tx in 0..2 {
                            let mut acc = 0f32;
                            for &ky in taps[a][ty] {
                                for &kx in taps[b][tx] {
                                    acc += w[ky * 3 + kx];
                                }
                            }
                            v[(co * cin + ci) * 4 + ty * 2 + tx] = acc;
                        }
                    }
                }
            }
            v
        });
        Self { phases, cout, cin }
    }
}

/// `conv3x3(pad 1)(upsample_nearest(x, 2×))` on NCHW f32, computed as four sub-pixel 2×2
/// convolutions of `x` (see [`SubPixelWeights`]). `None` where the fast path does not apply.
pub fn upsample2x_conv3x3(x: &Tensor, weights: &SubPixelWeights, bias: Option<&[f32]>) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let cout = weights.cout;
    if cin != weights.cin {
        candle_core::bail!("upsample conv: {cin} input channels, weights for {}", weights.cin);
    }
    let (ho, wo) = (2 * h, 2 * w);
    let plane = ho * wo;
    let mut out = vec![0f32; b * cout * plane];
    let k_len = cin * 4;
    with_f32(x, |xs| {
        let dst = OutPtr(out.as_mut_ptr());
        let rows = block_rows(k_len, w, h);
        let blocks = h.div_ceil(rows);
        par_ranges(b * blocks, |lo, hi| {
            let mut col = vec![0f32; k_len * rows * w];
            let mut tmp = vec![0f32; cout * rows * w];
            for item in lo..hi {
                let (bi, i0) = (item / blocks, (item % blocks) * rows);
                let nr = rows.min(h - i0);
                let npos = nr * w;
                let img = &xs[bi * cin * h * w..(bi + 1) * cin * h * w];
                for ph in 0..4 {
                    let (a, bb) = (ph / 2, ph % 2);
                    for ci in 0..cin {
                        let chan = &img[ci * h * w..(ci + 1) * h * w];
                        for ty in 0..2 {
                            for tx in 0..2 {
                                let r = &mut col[(ci * 4 + ty * 2 + tx) * npos..][..npos];
                                for (ii, orow) in r.chunks_mut(w).enumerate() {
                                    // input row i + ty − 1 + a, column j + tx − 1 + b
                                    let iy = (i0 + ii + ty + a) as isize - 1;
                                    if iy < 0 || iy >= h as isize {
                                        orow.fill(0.0);
                                        continue;
                                    }
                                    let irow = &chan[iy as usize * w..(iy as usize + 1) * w];
                                    match tx + bb {
                                        0 => {
                                            orow[0] = 0.0;
                                            orow[1..].copy_from_slice(&irow[..w - 1]);
                                        }
                                        1 => orow.copy_from_slice(irow),
                                        _ => {
                                            orow[..w - 1].copy_from_slice(&irow[1..]);
                                            orow[w - 1] = 0.0;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    let t = &mut tmp[..cout * npos];
                    for (co, p) in t.chunks_mut(npos).enumerate() {
                        p.fill(bias.map_or(0.0, |bv| bv[co]));
                    }
                    unsafe {
                        gemm_rm(
                            cout,
                            npos,
                            k_len,
                            t.as_mut_ptr(),
                            npos,
                            weights.phases[ph].as_ptr(),
                            col.as_ptr(),
                            npos,
                            true,
                        )
                    };
                    // Interleave the phase into the output: rows 2i + a, columns 2j + b.
                    for co in 0..cout {
                        let src = &t[co * npos..(co + 1) * npos];
                        for ii in 0..nr {
                            let y = 2 * (i0 + ii) + a;
                            let o = unsafe {
                                std::slice::from_raw_parts_mut(dst.at(bi * cout * plane + co * plane + y * wo), wo)
                            };
                            for (j, &v) in src[ii * w..(ii + 1) * w].iter().enumerate() {
                                o[2 * j + bb] = v;
                            }
                        }
                    }
                }
            }
        });
        Ok(())
    })?;
    Tensor::from_vec(out, (b, cout, ho, wo), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn blocked_gemm_convolution_matches_candle() -> Result<()> {
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
            // large enough for several row blocks per thread, and a one-pixel-wide image
            (32, 16, 3, 1, 1, 70, 90),
            (4, 4, 3, 1, 1, 9, 1),
        ];
        for &(cin, cout, k, pad, stride, h, w) in &cases {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., cout, &dev)?;
            let cfg = candle_nn::Conv2dConfig { padding: pad, stride, ..Default::default() };
            let reference = candle_nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg).forward(&x)?;
            let ws = wt.flatten_all()?.to_vec1::<f32>()?;
            let bs = bias.to_vec1::<f32>()?;
            let fast = conv2d(&x, &ws, Some(&bs), k, Padding::same(pad), stride)?;
            assert_eq!(fast.dims(), reference.dims(), "cin {cin} cout {cout} k {k} stride {stride}");
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "cin {cin} cout {cout} k {k} stride {stride}: max |diff| {err}");
        }
        // Downsample2D: pad right and bottom by one, stride 2, no conv padding.
        for (h, w) in [(13, 18), (8, 9), (2, 3)] {
            let x = Tensor::randn(0f32, 1., (1, 6, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (4, 6, 3, 3), &dev)?;
            let cfg = candle_nn::Conv2dConfig { stride: 2, ..Default::default() };
            let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            let reference = candle_nn::Conv2d::new(wt.clone(), None, cfg).forward(&padded)?;
            let pad = Padding { top: 0, bottom: 1, left: 0, right: 1 };
            let fast = conv2d(&x, &wt.flatten_all()?.to_vec1::<f32>()?, None, 3, pad, 2)?;
            assert_eq!(fast.dims(), reference.dims());
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "{h}x{w}: max |diff| {err}");
        }
        Ok(())
    }

    #[test]
    fn sub_pixel_upsample_convolution_matches_upsample_then_candle_conv() -> Result<()> {
        let dev = Device::Cpu;
        for &(cin, cout, h, w) in &[(3usize, 5usize, 7usize, 9usize), (8, 8, 1, 1), (16, 12, 11, 6)] {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 1., cout, &dev)?;
            let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
            let reference = candle_nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg)
                .forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            let sp = SubPixelWeights::new(&wt.flatten_all()?.to_vec1::<f32>()?, cout, cin);
            let fast = upsample2x_conv3x3(&x, &sp, Some(&bias.to_vec1::<f32>()?))?;
            assert_eq!(fast.dims(), reference.dims());
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "cin {cin} cout {cout} {h}x{w}: max |diff| {err}");
        }
        Ok(())
    }
}
