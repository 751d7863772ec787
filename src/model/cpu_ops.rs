//! CPU fast paths for the autoencoder's layers (f32 only; every other device or dtype goes
//! through candle). Measured on 2 cores (AVX-512) before these existed: candle's convolution ran
//! dpir-nano's 16→16 3×3 layers at ~2 GFLOP/s (a full im2col matrix per call, then a copy to
//! NCHW) and its group norm made ~10 passes over memory; together they were most of a frame.
//!
//! - [`conv2d`]: a `k × k` convolution as **blocked im2col + GEMM**: output rows in blocks whose
//!   patch matrix stays in cache, each block one call of the `gemm` crate (the one candle's matmul
//!   uses, with its runtime AVX2/AVX-512 kernels) writing straight into the NCHW output; 1×1
//!   convolutions multiply the input planes in place, no copy.
//! - [`conv3x3_winograd`]: 3×3 / stride 1 / padding 1 convolutions from 16 input channels up by
//!   **Winograd F(2×2, 3×3)**: 16 GEMMs over transformed 4×4 tiles, 2.25× fewer multiply-adds;
//!   weights transformed once ([`WinogradWeights`]). What PyTorch's oneDNN beat im2col with.
//! - [`upsample2x_conv3x3`]: nearest ×2 upsampling followed by a 3×3 convolution (the decoder's
//!   `Upsample2D`) as four **sub-pixel** 2×2 convolutions of the low-resolution input, one per
//!   output phase, with the 3×3 taps that land on the same input pixel summed ([`SubPixelWeights`]):
//!   2.25× fewer multiply-adds and no upsampled copy.
//! - [`group_norm`]: group norm + optional SiLU in two passes.
//!
//! All split their work over the machine's cores; each is tested against candle's result for the
//! same operation.

use candle_core::{DType, Device, Result, Storage, Tensor};

/// Threads for one op: rayon's pool (`RAYON_NUM_THREADS`, default the machine's cores), but
/// never more than there are work items.
fn threads(items: usize) -> usize {
    rayon::current_num_threads().min(items).max(1)
}

/// Run `f(first_item, chunk)` over `out` cut into `items` equal parts, one contiguous run of
/// items per thread of rayon's (persistent) pool.
fn par_chunks<F>(out: &mut [f32], items: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    use rayon::prelude::*;
    let per_item = out.len() / items.max(1);
    let n = threads(items);
    let items_per_thread = items.div_ceil(n);
    if n == 1 {
        f(0, out);
        return;
    }
    out.par_chunks_mut(items_per_thread * per_item).enumerate().for_each(|(t, chunk)| f(t * items_per_thread, chunk));
}

/// Run `f(lo, hi)` over `[0, items)` split into one contiguous range per thread.
fn par_ranges<F>(items: usize, f: F)
where
    F: Fn(usize, usize) + Sync,
{
    use rayon::prelude::*;
    let n = threads(items);
    if n == 1 {
        f(0, items);
        return;
    }
    let per = items.div_ceil(n);
    (0..n).into_par_iter().for_each(|t| {
        let (lo, hi) = (t * per, ((t + 1) * per).min(items));
        if lo < hi {
            f(lo, hi);
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

/// The f32 values of a CPU tensor, contiguous: borrowed when they already are, else copied once.
fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<f32>()?[a..b]);
        }
    }
    f(&x.flatten_all()?.to_vec1::<f32>()?)
}

/// A raw output pointer shared by threads that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// (A method, so that closures capture the `Sync` wrapper, not the raw pointer.)
    fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// `dst (m × n, row stride dst_rs) (+)= lhs (m × k, row-major) · rhs (k × n, row stride rhs_rs)`:
/// added to `dst` when `accumulate`, else overwriting it; single-threaded (callers split the work).
///
/// # Safety
/// The pointers must cover the extents given.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    rhs: *const f32,
    rhs_rs: usize,
    accumulate: bool,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            1,
            k as isize,
            rhs,
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Output rows per im2col block: the patch matrix (`k_len × rows·wo` floats) near 512 KiB, so
/// that it stays in cache between its writing and the GEMM reading it. (Measured side by side on
/// the bench's medium VAE: 1 MiB blocks, or a minimum of 256–512 columns per block, were no
/// better and mostly slower.)
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
) -> Option<Result<Tensor>> {
    if !cpu_f32(x) || !(stride == 1 || stride == 2) {
        return None;
    }
    Some((|| {
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
    })())
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
pub fn upsample2x_conv3x3(x: &Tensor, weights: &SubPixelWeights, bias: Option<&[f32]>) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
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
    })())
}

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
pub fn conv3x3_winograd(x: &Tensor, wg: &WinogradWeights, bias: Option<&[f32]>) -> Option<Result<Tensor>> {
    if !cpu_f32(x) {
        return None;
    }
    Some((|| {
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
                            winograd_input_tiles(
                                chan,
                                w,
                                h,
                                r0 + tr,
                                &mut scratch,
                                &mut v,
                                ci * nt + tr * tw,
                                cin * nt,
                            );
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
    })())
}

// ---- vectorisable math -------------------------------------------------------------------

/// Runs `$body` (a loop over slices calling the `#[inline(always)]` helpers below) compiled for
/// AVX2 + FMA when the CPU has them (checked once at run time), else for the baseline target:
/// the crate is built for plain x86-64, where libm's `expf`/`tanhf` are scalar calls.
macro_rules! dispatch {
    ($name:ident ($($arg:ident : $ty:ty),*) $body:block) => {
        dispatch!($name ($($arg: $ty),*) -> () $body);
    };
    ($name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret $body
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `fast` was compiled for.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body
        }
    };
}

/// Sum with 16 independent partial sums (a plain `iter().sum()` is one serial dependency chain
/// that the compiler may not reorder, so it never vectorises).
#[inline(always)]
fn sum16(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Sum of `(x − c)²` with 16 partial sums.
#[inline(always)]
fn sum_sq16(v: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..16 {
            let d = ch[i] - c;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&x| (x - c) * (x - c)).sum::<f32>()
}

/// Maximum with 16 partial maxima (NaN-free input).
#[inline(always)]
fn max16(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

dispatch!(sums(v: &[f32]) -> (f32, f32) {
    let s = sum16(v);
    (s, sum_sq16(v, 0.0))
});

/// `e^x` in f32 with a relative error below 3e-7 (2.5 units in the last place), written
/// without libm so that it vectorises: `2^n · e^r` with `n = round(x·log2 e)` (round by adding
/// 1.5·2^23), `r = x − n·ln 2` in two parts (Cody–Waite), `e^r` by its Taylor series to r⁶
/// (|r| ≤ ln 2 / 2). Inputs are clamped to [−87, 88] (e^x then stays a normal f32).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let k = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    p * f32::from_bits(((k + 127) << 23) as u32)
}

/// SiLU `x · σ(x)` with [`exp`].
#[inline(always)]
fn silu1(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU, tanh approximation (torch `gelu(approximate="tanh")`, candle's `gelu`):
/// `0.5·x·(1 + tanh(u)) = x · σ(2u)`, `u = √(2/π)·(x + 0.044715·x³)`.
#[inline(always)]
fn gelu1(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    let u = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

dispatch!(affine_silu(v: &mut [f32], scale: f32, shift: f32) {
    for x in v.iter_mut() {
        *x = silu1(*x * scale + shift);
    }
});

dispatch!(bias_gelu_rows(v: &mut [f32], bias: &[f32]) {
    for row in v.chunks_exact_mut(bias.len()) {
        for (x, &b) in row.iter_mut().zip(bias) {
            *x = gelu1(*x + b);
        }
    }
});

dispatch!(softmax_row(v: &mut [f32], scale: f32) {
    let max = max16(v);
    for x in v.iter_mut() {
        *x = exp((*x - max) * scale);
    }
    let inv = 1.0 / sum16(v);
    for x in v.iter_mut() {
        *x *= inv;
    }
});

dispatch!(layer_norm_modulate_row(row: &mut [f32], shift: &[f32], scale: &[f32], eps: f32) {
    // Two passes (hidden states of the real model have large means).
    let n = row.len() as f32;
    let mean = sum16(row) / n;
    let var = sum_sq16(row, mean) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((x, &sh), &sc) in row.iter_mut().zip(shift).zip(scale) {
        *x = (*x - mean) * inv * (1.0 + sc) + sh;
    }
});

// ---- transformer kernels ----------------------------------------------------------------------

/// `x · wᵀ + b` for `x` `[…, in]` (CPU f32), `w` `[out, in]` row-major: one GEMM per call that
/// starts from the bias (candle's `Linear` multiplies, then adds the bias in a second pass).
pub fn linear(x: &Tensor, w: &[f32], b: Option<&[f32]>, out_features: usize) -> Option<Result<Tensor>> {
    if !(enabled() && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32) {
        return None;
    }
    Some((|| {
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
    })())
}

/// `gelu_tanh(x · wᵀ + b)`: [`linear`] with the bias and the activation in one pass.
pub fn linear_gelu(x: &Tensor, w: &[f32], b: &[f32]) -> Option<Result<Tensor>> {
    let y = linear(x, w, None, b.len())?;
    Some(y.and_then(|y| {
        let shape = y.dims().to_vec();
        let mut v = y.flatten_all()?.to_vec1::<f32>()?;
        let rows = v.len() / b.len().max(1);
        par_chunks(&mut v, rows, |_, chunk| bias_gelu_rows(chunk, b));
        Tensor::from_vec(v, shape, y.device())
    }))
}

/// LayerNorm without affine over the last dim (eps `eps`), then `· (1 + scale) + shift` per
/// sample: `x` `[B, N, C]`, `shift`/`scale` `[B, C]` (diffusers' `norm(x) * (1 + scale[:, None])
/// + shift[:, None]`), CPU f32.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    if !(enabled() && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 3) {
        return None;
    }
    Some((|| {
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
    })())
}

/// `x + y · gate[:, None, :]` for `x`, `y` `[B, N, C]` and `gate` `[B, C]` (a transformer
/// block's gated residual), CPU f32, in one pass.
pub fn add_gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Option<Result<Tensor>> {
    if !(enabled() && matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 3) {
        return None;
    }
    Some((|| {
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
    })())
}

/// Multi-head attention `softmax(q kᵀ · scale) v` on `[B, N, heads·d]` tensors (CPU f32), the
/// heads read and written in place through strides: no `[B, H, N, d]` copies. Query rows are
/// taken in blocks so that the score matrix stays bounded (`rows × N`); blocks of all heads
/// and samples are spread over the cores.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Option<Result<Tensor>> {
    if !(enabled() && matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32 && q.rank() == 3) {
        return None;
    }
    Some((|| {
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
    })())
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
    use candle_core::Module;

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
            let fast = conv2d(&x, &ws, Some(&bs), k, Padding::same(pad), stride).unwrap()?;
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
            let fast = conv2d(&x, &wt.flatten_all()?.to_vec1::<f32>()?, None, 3, pad, 2).unwrap()?;
            assert_eq!(fast.dims(), reference.dims());
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "{h}x{w}: max |diff| {err}");
        }
        Ok(())
    }

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
            let fast = conv3x3_winograd(&x, &wg, bs.as_deref()).unwrap()?;
            assert_eq!(fast.dims(), reference.dims());
            // Sums of cin · 9 unit-variance products: relative to their size, a few ulps.
            let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?;
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err <= 1e-5 * scale.max(1.0), "cin {cin} cout {cout} {h}x{w}: max |diff| {err} (max {scale})");
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
            let fast = upsample2x_conv3x3(&x, &sp, Some(&bias.to_vec1::<f32>()?)).unwrap()?;
            assert_eq!(fast.dims(), reference.dims());
            let err = (fast - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-4, "cin {cin} cout {cout} {h}x{w}: max |diff| {err}");
        }
        Ok(())
    }

    #[test]
    fn fast_exp_is_within_three_ulps_of_libm() {
        let mut worst = 0f32;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3 + 1.234e-4;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        // Clamped, never inf or NaN: softmax and SiLU of extreme values stay finite.
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

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
        assert!(max_diff(&linear(&x, &ws, Some(&bs), out).unwrap()?, &reference)? < 1e-4);
        assert!(max_diff(&linear_gelu(&x, &ws, &bs).unwrap()?, &reference.gelu()?)? < 1e-4);
        // layer norm + modulate
        let shift = Tensor::randn(0f32, 1., (b, c), &dev)?;
        let scale = Tensor::randn(0f32, 1., (b, c), &dev)?;
        let mean = x.mean_keepdim(2)?;
        let xc = x.broadcast_sub(&mean)?;
        let normed = xc.broadcast_div(&(xc.sqr()?.mean_keepdim(2)? + 1e-6)?.sqrt()?)?;
        let reference = normed.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)?;
        assert!(max_diff(&layer_norm_modulate(&x, &shift, &scale, 1e-6).unwrap()?, &reference)? < 1e-4);
        // gated residual
        let y = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
        let reference = (&x + y.broadcast_mul(&shift.unsqueeze(1)?)?)?;
        assert!(max_diff(&add_gated(&x, &y, &shift).unwrap()?, &reference)? < 1e-5);
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
            let fast = attention(&q, &k, &v, heads, 1.0 / (d as f32).sqrt()).unwrap()?;
            assert!(max_diff(&fast, &reference)? < 1e-5, "{n} tokens");
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
