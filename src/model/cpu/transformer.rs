//! Transformer kernels on `[…, C]` f32 rows: linear layers (one GEMM from the bias), layer norm
//! + modulation, gated residuals and multi-head attention read in place through strides.

use candle_core::{DType, Result, Tensor};

use super::math::{bias_gelu_rows, layer_norm_modulate_row, softmax_row};
use super::{OutPtr, par_chunks, par_ranges, threads, with_f32};

/// `x · wᵀ + b` for `x` `[…, in]` (CPU f32), `w` `[out, in]` row-major: one GEMM per call that
/// starts from the bias (candle's `Linear` multiplies, then adds the bias in a second pass).
pub fn linear(x: &Tensor, w: &[f32], b: Option<&[f32]>, out_features: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_f = *dims.last().unwrap_or(&0);
    if in_f * out_features != w.len() {
        candle_core::bail!("linear: {} weights for {in_f} → {out_features}", w.len());
    }
    let m = x.elem_count() / in_f.max(1);
    let mut out = vec![0f32; m * out_features];
    if let Some(b) = b {
        for row in out.chunks_exact_mut(out_features) {
            row.copy_from_slice(b);
        }
    }
    with_f32(x, |xs| {
        // dst (m × out) += x (m × in) · wᵀ (in × out): wᵀ read through strides, no copy.
        unsafe {
            gemm::gemm(
                m,
                out_features,
                in_f,
                out.as_mut_ptr(),
                1,
                out_features as isize,
                b.is_some(),
                xs.as_ptr(),
                1,
                in_f as isize,
                w.as_ptr(),
                in_f as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads(m)),
            )
        };
        Ok(())
    })?;
    let mut shape = dims;
    *shape.last_mut().unwrap() = out_features;
    Tensor::from_vec(out, shape, x.device())
}

/// `gelu_tanh(x · wᵀ + b)`: [`linear`] with the bias and the activation in one pass.
pub fn linear_gelu(x: &Tensor, w: &[f32], b: &[f32]) -> Result<Tensor> {
    let y = linear(x, w, None, b.len())?;
    let shape = y.dims().to_vec();
    let mut v = y.flatten_all()?.to_vec1::<f32>()?;
    let rows = v.len() / b.len().max(1);
    par_chunks(&mut v, rows, |_, chunk| bias_gelu_rows(chunk, b));
    Tensor::from_vec(v, shape, y.device())
}

/// LayerNorm without affine over the last dim (eps `eps`), then `· (1 + scale) + shift` per
/// sample: `x` `[B, N, C]`, `shift`/`scale` `[B, C]` (diffusers' `norm(x) * (1 + scale[:, None])
/// + shift[:, None]`), CPU f32.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let sh = shift.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let sc = scale.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if sh.len() != b * c || sc.len() != b * c {
        candle_core::bail!("layer_norm_modulate: shift/scale for {} values, x is {b}×{n}×{c}", sh.len());
    }
    let mut v = x.flatten_all()?.to_vec1::<f32>()?;
    par_chunks(&mut v, b * n, |first, chunk| {
        for (j, row) in chunk.chunks_exact_mut(c).enumerate() {
            let bi = (first + j) / n;
            layer_norm_modulate_row(row, &sh[bi * c..(bi + 1) * c], &sc[bi * c..(bi + 1) * c], eps as f32);
        }
    });
    Tensor::from_vec(v, (b, n, c), x.device())
}

/// `x + y · gate[:, None, :]` for `x`, `y` `[B, N, C]` and `gate` `[B, C]` (a transformer
/// block's gated residual), CPU f32, in one pass.
pub fn add_gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if y.dims() != x.dims() || gate.elem_count() != b * c {
        candle_core::bail!("add_gated: x {:?}, y {:?}, gate {:?}", x.dims(), y.dims(), gate.dims());
    }
    let g = gate.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; b * n * c];
    with_f32(x, |xs| {
        with_f32(y, |ys| {
            par_chunks(&mut out, b * n, |first, chunk| {
                for (j, row) in chunk.chunks_exact_mut(c).enumerate() {
                    let r = first + j;
                    let gb = &g[(r / n) * c..(r / n + 1) * c];
                    let (xr, yr) = (&xs[r * c..(r + 1) * c], &ys[r * c..(r + 1) * c]);
                    for (((o, &a), &bv), &gv) in row.iter_mut().zip(xr).zip(yr).zip(gb) {
                        *o = a + bv * gv;
                    }
                }
            });
            Ok(())
        })
    })?;
    Tensor::from_vec(out, (b, n, c), x.device())
}

/// Multi-head attention `softmax(q kᵀ · scale) v` on `[B, N, heads·d]` tensors (CPU f32), the
/// heads read and written in place through strides: no `[B, H, N, d]` copies. Query rows are
/// taken in blocks so that the score matrix stays bounded (`rows × N`); blocks of all heads
/// and samples are spread over the cores.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    if k.dims() != q.dims() || v.dims() != q.dims() || heads == 0 || c % heads != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?}, {heads} heads", q.dims(), k.dims(), v.dims());
    }
    let d = c / heads;
    // ~2 MiB of scores per block: K_h is packed once per block, so blocks must not be thin.
    let rows = (512 * 1024 / n.max(1)).clamp(1, n);
    let blocks = n.div_ceil(rows);
    let mut out = vec![0f32; b * n * c];
    let dst = OutPtr(out.as_mut_ptr());
    with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                par_ranges(b * heads * blocks, |lo, hi| {
                    let mut s = vec![0f32; rows * n];
                    for item in lo..hi {
                        let (bh, blk) = (item / blocks, item % blocks);
                        let (bi, h) = (bh / heads, bh % heads);
                        let r0 = blk * rows;
                        let nr = rows.min(n - r0);
                        let base = bi * n * c + h * d;
                        let sc = &mut s[..nr * n];
                        unsafe {
                            // S (nr × n) = Q_h (nr × d) · K_hᵀ (d × n)
                            gemm::gemm(
                                nr,
                                n,
                                d,
                                sc.as_mut_ptr(),
                                1,
                                n as isize,
                                false,
                                qs.as_ptr().add(base + r0 * c),
                                1,
                                c as isize,
                                ks.as_ptr().add(base),
                                c as isize,
                                1,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for row in sc.chunks_exact_mut(n) {
                            softmax_row(row, scale);
                        }
                        unsafe {
                            // O_h (nr × d) = P (nr × n) · V_h (n × d), into [B, N, C]
                            gemm::gemm(
                                nr,
                                d,
                                n,
                                dst.at(base + r0 * c),
                                1,
                                c as isize,
                                false,
                                sc.as_ptr(),
                                1,
                                n as isize,
                                vs.as_ptr().add(base),
                                1,
                                c as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                });
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, (b, n, c), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn transformer_kernels_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, c, heads, out) = (2, 37, 48, 4, 20);
        let x = Tensor::randn(0f32, 1., (b, n, c), &dev)?.affine(2.0, 3.0)?;
        // linear (+ GELU)
        let w = Tensor::randn(0f32, 0.3, (out, c), &dev)?;
        let bias = Tensor::randn(0f32, 1., out, &dev)?;
        let reference = candle_nn::Linear::new(w.clone(), Some(bias.clone())).forward(&x)?;
        let (ws, bs) = (w.flatten_all()?.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        assert!(max_diff(&linear(&x, &ws, Some(&bs), out)?, &reference)? < 1e-4);
        assert!(max_diff(&linear_gelu(&x, &ws, &bs)?, &reference.gelu()?)? < 1e-4);
        // layer norm + modulate
        let shift = Tensor::randn(0f32, 1., (b, c), &dev)?;
        let scale = Tensor::randn(0f32, 1., (b, c), &dev)?;
        let mean = x.mean_keepdim(2)?;
        let xc = x.broadcast_sub(&mean)?;
        let normed = xc.broadcast_div(&(xc.sqr()?.mean_keepdim(2)? + 1e-6)?.sqrt()?)?;
        let reference = normed.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)?;
        assert!(max_diff(&layer_norm_modulate(&x, &shift, &scale, 1e-6)?, &reference)? < 1e-4);
        // gated residual
        let y = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
        let reference = (&x + y.broadcast_mul(&shift.unsqueeze(1)?)?)?;
        assert!(max_diff(&add_gated(&x, &y, &shift)?, &reference)? < 1e-5);
        // attention: one block of query rows, and several (300² > the block budget)
        for n in [37, 300] {
            let q = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
            let k = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
            let v = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
            let d = c / heads;
            let split = |t: &Tensor| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
            let s = (split(&q)?.matmul(&split(&k)?.t()?)? * (1.0 / (d as f64).sqrt()))?;
            let reference =
                candle_nn::ops::softmax_last_dim(&s)?.matmul(&split(&v)?)?.transpose(1, 2)?.reshape((b, n, c))?;
            let fast = attention(&q, &k, &v, heads, 1.0 / (d as f32).sqrt())?;
            assert!(max_diff(&fast, &reference)? < 1e-5, "{n} tokens");
        }
        Ok(())
    }
}
