//! 3×3 / stride 1 / padding 1 convolutions by Winograd F(2×2, 3×3) (Lavin & Gray, 2016): what
//! PyTorch's oneDNN beat im2col with; 2.25× fewer multiply-adds from 16 input channels up.

use candle_core::{Result, Tensor};

use super::math::dispatch;
use super::{OutPtr, gemm_rm, par_ranges, with_f32};

/// A 3×3 convolution's weights transformed for [`conv3x3_winograd`]: `U = G g Gᵀ` per
/// (output, input) channel pair, stored as 16 matrices `[cout × cin]`, one per element of the
/// 4×4 transformed tile (computed in f64, rounded once).
#[derive(Debug, Clone)]
pub struct WinogradWeights {
    /// `[e = 4i + j][cout][cin]`.
    u: Vec<f32>,
    cout: usize,
    cin: usize,
}

impl WinogradWeights {
    /// From `[cout, cin, 3, 3]` row-major weights.
    pub fn new(weight: &[f32], cout: usize, cin: usize) -> Self {
        // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]
        let g_rows = |a: f64, b: f64, c: f64| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        let mut u = vec![0f32; 16 * cout * cin];
        for co in 0..cout {
            for ci in 0..cin {
                let g = &weight[(co * cin + ci) * 9..][..9];
                let g = |r: usize, c: usize| g[r * 3 + c] as f64;
                // (G g) column by column: 4 × 3, then (G g) Gᵀ row by row: 4 × 4.
                let cols: [[f64; 4]; 3] = std::array::from_fn(|c| g_rows(g(0, c), g(1, c), g(2, c)));
                for i in 0..4 {
                    for (j, v) in g_rows(cols[0][i], cols[1][i], cols[2][i]).into_iter().enumerate() {
                        u[((i * 4 + j) * cout + co) * cin + ci] = v as f32;
                    }
                }
            }
        }
        Self { u, cout, cin }
    }
}

/// Tile rows per Winograd block: the block's transformed input and products (`16 · (cin + cout)
/// · tiles` floats) near 512 KiB, so that they stay in cache between the transforms and the GEMMs
/// (2 MiB blocks were up to 1.25× slower on 16-channel layers), but at least 128 tiles (each of
/// the 16 GEMMs packs its `cout × cin` weights again), and never fewer blocks than threads.
fn winograd_tile_rows(cin: usize, cout: usize, tiles_w: usize, tiles_h: usize) -> usize {
    let tiles = (8192 / (cin + cout).max(1)).clamp(128, 4096);
    (tiles / tiles_w.max(1)).max(1).min(tiles_h.div_ceil(rayon::current_num_threads()).max(1))
}

/// A 3×3 convolution with padding 1 and stride 1 (groups 1) on NCHW f32 by **Winograd
/// F(2×2, 3×3)** (Lavin & Gray, 2016): each 2×2 output tile comes from its 4×4 input tile with
/// 16 products per channel pair instead of 36 — the input tiles transformed (`V = Bᵀ d B`), 16
/// GEMMs `M_e = U_e · V_e` over a block of tiles, the output transformed back (`Y = Aᵀ M A`).
/// Rounding differs from a direct convolution by a few ulps of the inputs' magnitude (the
/// transforms only add, subtract and halve). `None` where the fast path does not apply.
pub fn conv3x3_winograd(x: &Tensor, wg: &WinogradWeights, bias: Option<&[f32]>) -> Result<Tensor> {
    let (b, cin, h, w) = x.dims4()?;
    let cout = wg.cout;
    if cin != wg.cin {
        candle_core::bail!("winograd conv: {cin} input channels, weights for {}", wg.cin);
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let rows = winograd_tile_rows(cin, cout, tw, th);
    let blocks = th.div_ceil(rows);
    let plane = h * w;
    let mut out = vec![0f32; b * cout * plane];
    with_f32(x, |xs| {
        let dst = OutPtr(out.as_mut_ptr());
        par_ranges(b * blocks, |lo, hi| {
            let cap = rows * tw;
            let mut v = vec![0f32; 16 * cin * cap];
            let mut m = vec![0f32; 16 * cout * cap];
            let mut scratch = vec![0f32; 16 * (tw + 1)];
            for item in lo..hi {
                let (bi, r0) = (item / blocks, (item % blocks) * rows);
                let nr = rows.min(th - r0);
                let nt = nr * tw;
                let img = &xs[bi * cin * plane..(bi + 1) * cin * plane];
                for ci in 0..cin {
                    let chan = &img[ci * plane..(ci + 1) * plane];
                    for tr in 0..nr {
                        winograd_input_tiles(chan, w, h, r0 + tr, &mut scratch, &mut v, ci * nt + tr * tw, cin * nt);
                    }
                }
                for e in 0..16 {
                    unsafe {
                        gemm_rm(
                            cout,
                            nt,
                            cin,
                            m.as_mut_ptr().add(e * cout * nt),
                            nt,
                            wg.u.as_ptr().add(e * cout * cin),
                            v.as_ptr().add(e * cin * nt),
                            nt,
                            false,
                        )
                    };
                }
                for co in 0..cout {
                    let bv = bias.map_or(0.0, |bb| bb[co]);
                    for tr in 0..nr {
                        let y0 = 2 * (r0 + tr);
                        let row = |y: usize| unsafe {
                            std::slice::from_raw_parts_mut(dst.at((bi * cout + co) * plane + y * w), w)
                        };
                        let o1 = (y0 + 1 < h).then(|| row(y0 + 1));
                        winograd_output_tiles(&m, co * nt + tr * tw, cout * nt, tw, bv, &mut scratch, row(y0), o1);
                    }
                }
            }
        });
        Ok(())
    })?;
    Tensor::from_vec(out, (b, cout, h, w), x.device())
}

dispatch!(winograd_input_tiles(
    chan: &[f32],
    w: usize,
    h: usize,
    ty: usize,
    scratch: &mut [f32],
    v: &mut [f32],
    at: usize,
    e_stride: usize
) {
    // One row of tiles of one channel: V = Bᵀ d B for the 4×4 input tiles at rows 2ty − 1 ..
    // 2ty + 2, columns 2tx − 1 .. 2tx + 2 (zero outside), written to v[at + e·e_stride + tx].
    // Every step runs over contiguous slices (vectorised): Bᵀ down the zero-padded rows, then
    // the result split into even and odd columns, then B along them.
    let tw = w.div_ceil(2);
    let (n, pw) = (tw + 1, 2 * tw + 2);
    let (pad, rest) = scratch.split_at_mut(4 * pw);
    let (ev, rest) = rest.split_at_mut(4 * n);
    let od = &mut rest[..4 * n];
    // Padded row i: column c holds input column c − 1.
    for (i, prow) in pad.chunks_exact_mut(pw).enumerate() {
        prow.fill(0.0);
        let iy = (2 * ty + i) as isize - 1;
        if iy >= 0 && (iy as usize) < h {
            prow[1..=w].copy_from_slice(&chan[iy as usize * w..(iy as usize + 1) * w]);
        }
    }
    // Bᵀ: rows [d0 − d2, d1 + d2, d2 − d1, d1 − d3].
    {
        let (r0, rest) = pad.split_at_mut(pw);
        let (r1, rest) = rest.split_at_mut(pw);
        let (r2, r3) = rest.split_at_mut(pw);
        for (((a, b), c), d) in r0.iter_mut().zip(r1.iter_mut()).zip(r2.iter_mut()).zip(r3.iter_mut()) {
            let (x0, x1, x2, x3) = (*a, *b, *c, *d);
            *a = x0 - x2;
            *b = x1 + x2;
            *c = x2 - x1;
            *d = x1 - x3;
        }
    }
    for i in 0..4 {
        let prow = &pad[i * pw..(i + 1) * pw];
        let (e, o) = (&mut ev[i * n..(i + 1) * n], &mut od[i * n..(i + 1) * n]);
        for ((e, o), pair) in e.iter_mut().zip(o.iter_mut()).zip(prow.chunks_exact(2)) {
            *e = pair[0];
            *o = pair[1];
        }
    }
    // B: tile tx reads columns e[tx], o[tx], e[tx + 1], o[tx + 1].
    for i in 0..4 {
        let (e, o) = (&ev[i * n..(i + 1) * n], &od[i * n..(i + 1) * n]);
        let (e0, e1, o0, o1) = (&e[..tw], &e[1..], &o[..tw], &o[1..]);
        let base = |j: usize| at + (4 * i + j) * e_stride;
        for (d, (a, b)) in v[base(0)..][..tw].iter_mut().zip(e0.iter().zip(e1)) {
            *d = a - b;
        }
        for (d, (a, b)) in v[base(1)..][..tw].iter_mut().zip(o0.iter().zip(e1)) {
            *d = a + b;
        }
        for (d, (a, b)) in v[base(2)..][..tw].iter_mut().zip(e1.iter().zip(o0)) {
            *d = a - b;
        }
        for (d, (a, b)) in v[base(3)..][..tw].iter_mut().zip(o0.iter().zip(o1)) {
            *d = a - b;
        }
    }
});

dispatch!(winograd_output_tiles(
    m: &[f32],
    at: usize,
    e_stride: usize,
    tw: usize,
    bias: f32,
    scratch: &mut [f32],
    o0: &mut [f32],
    o1: Option<&mut [f32]>
) {
    // One row of tiles of one output channel: Y = Aᵀ M A + bias with Aᵀ = [[1, 1, 1, 0],
    // [0, 1, −1, −1]], M_e at m[at + e·e_stride ..][..tw]; output rows o0 and (unless past the
    // bottom) o1, columns 2tx and 2tx + 1 (unless past the right edge). Contiguous slices
    // throughout (vectorised), the interleave last.
    let ms: [&[f32]; 16] = std::array::from_fn(|e| &m[at + e * e_stride..][..tw]);
    let (s, y) = scratch[..12 * tw].split_at_mut(8 * tw);
    // Aᵀ M: s[j] = M0j + M1j + M2j, s[4 + j] = M1j − M2j − M3j.
    for (j, sj) in s.chunks_exact_mut(tw).enumerate() {
        let (top, col) = (j < 4, j % 4);
        let (a, b, c) = if top { (ms[col], ms[4 + col], ms[8 + col]) } else { (ms[4 + col], ms[8 + col], ms[12 + col]) };
        if top {
            for (d, ((&x, &y), &z)) in sj.iter_mut().zip(a.iter().zip(b).zip(c)) {
                *d = x + y + z;
            }
        } else {
            for (d, ((&x, &y), &z)) in sj.iter_mut().zip(a.iter().zip(b).zip(c)) {
                *d = x - y - z;
            }
        }
    }
    // … A: y[2r] = s0 + s1 + s2 + bias, y[2r + 1] = s1 − s2 − s3 + bias, for output row r.
    for r in 0..2 {
        let sr = |j: usize| &s[(4 * r + j) * tw..(4 * r + j + 1) * tw];
        let (ya, yb) = y[2 * r * tw..(2 * r + 2) * tw].split_at_mut(tw);
        for (d, ((&a, &b), &c)) in ya.iter_mut().zip(sr(0).iter().zip(sr(1)).zip(sr(2))) {
            *d = a + b + c + bias;
        }
        for (d, ((&a, &b), &c)) in yb.iter_mut().zip(sr(1).iter().zip(sr(2)).zip(sr(3))) {
            *d = a - b - c + bias;
        }
    }
    let interleave = |o: &mut [f32], a: &[f32], b: &[f32]| {
        let full = o.len() / 2;
        for (pair, (&x, &y)) in o.chunks_exact_mut(2).zip(a.iter().zip(b)) {
            pair[0] = x;
            pair[1] = y;
        }
        if o.len() % 2 == 1 {
            o[2 * full] = a[full];
        }
    };
    interleave(o0, &y[..tw], &y[tw..2 * tw]);
    if let Some(o1) = o1 {
        interleave(o1, &y[2 * tw..3 * tw], &y[3 * tw..4 * tw]);
    }
});

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn winograd_convolution_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        // Odd and even sizes (partial edge tiles), one-pixel images, several tile-row blocks
        // per thread, with and without bias.
        let cases = [(5usize, 7usize, 13usize, 17usize), (8, 4, 1, 1), (3, 6, 2, 9), (16, 16, 70, 90), (64, 32, 9, 8)];
        for (n, &(cin, cout, h, w)) in cases.iter().enumerate() {
            let x = Tensor::randn(0f32, 1., (2, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1., (cout, cin, 3, 3), &dev)?;
            let bias = (n % 2 == 0).then(|| Tensor::randn(0f32, 1., cout, &dev)).transpose()?;
            let cfg = candle_nn::Conv2dConfig { padding: 1, ..Default::default() };
            let reference = candle_nn::Conv2d::new(wt.clone(), bias.clone(), cfg).forward(&x)?;
            let wg = WinogradWeights::new(&wt.flatten_all()?.to_vec1::<f32>()?, cout, cin);
            let bs = bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
            let fast = conv3x3_winograd(&x, &wg, bs.as_deref())?;
            assert_eq!(fast.dims(), reference.dims());
            // Sums of cin · 9 unit-variance products: relative to their size, a few ulps.
            let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-5 * scale.max(1.0), "cin {cin} cout {cout} {h}x{w}: max |diff| {err} (max {scale})");
        }
        Ok(())
    }
}
