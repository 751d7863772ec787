//! The CPU f32 kernels behind [`super::layers`] (every other device or dtype goes through
//! candle). Measured on 2 cores (AVX-512) before these existed: candle's convolution ran
//! dpir-nano's 16→16 3×3 layers at ~2 GFLOP/s (a full im2col matrix per call, then a copy to
//! NCHW) and its group norm made ~10 passes over memory; together they were most of a frame.
//!
//! - [`conv`]: `k × k` convolutions as blocked im2col + GEMM, and nearest ×2 upsampling + 3×3
//!   convolution as four sub-pixel 2×2 convolutions (diffusers' `Upsample2D`);
//! - [`winograd`]: 3×3 / stride 1 convolutions by Winograd F(2×2, 3×3);
//! - [`transformer`]: linear layers, layer norm + modulation, gated residuals, attention;
//! - [`norm`]: group norm + optional SiLU;
//! - [`math`]: the vectorised element-wise maths they share (exp, SiLU, GELU, softmax rows).
//!
//! Weights are never copied into kernel-owned buffers: f32 weights are read in place from
//! candle's storage, f16/bf16 weights are converted to f32 where a call needs them ([`Weights`])
//! and the converted copy dropped after it. All kernels split their work over rayon's pool;
//! each is tested against candle's result for the same operation.

use candle_core::{DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};

pub mod conv;
pub mod math;
pub mod norm;
pub mod transformer;
pub mod winograd;

/// The one gate of the fast paths: `x` is an f32 tensor on the CPU and `DPIR_CPU_OPS=0` is not
/// set (candle's kernels instead, for side-by-side benchmarks).
pub fn takes(x: &Tensor) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("DPIR_CPU_OPS").is_none_or(|v| v != "0"))
        && matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
}

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

/// The f32 values of a CPU tensor, contiguous: borrowed when they already are, else copied once.
fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets())
            && x.dtype() == DType::F32
        {
            return f(&cpu.as_slice::<f32>()?[a..b]);
        }
    }
    f(&x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A CPU weight tensor's values as stored: f32 read in place, f16/bf16 converted on use.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl Weights<'_> {
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(v) => v.len(),
            Weights::F16(v) => v.len(),
            Weights::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `f` on the f32 values: in place for f32, else on a converted copy (vectorised, split
    /// over the cores) that lives for the call only.
    pub fn with_f32<R>(self, f: impl FnOnce(&[f32]) -> R) -> R {
        use half::slice::HalfFloatSliceExt;
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        match self {
            Weights::F32(v) => f(v),
            Weights::F16(v) => {
                let mut out = vec![0f32; v.len()];
                out.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(o, s)| s.convert_to_f32_slice(o));
                f(&out)
            }
            Weights::Bf16(v) => {
                let mut out = vec![0f32; v.len()];
                out.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(o, s)| s.convert_to_f32_slice(o));
                f(&out)
            }
        }
    }
}

/// `f` on the stored values of a CPU weight tensor (f32, f16 or bf16), borrowed from candle's
/// storage; a non-contiguous or otherwise-typed tensor is converted to f32 first.
pub fn with_weights<R>(w: &Tensor, f: impl FnOnce(Weights) -> Result<R>) -> Result<R> {
    {
        let (storage, layout) = w.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            match w.dtype() {
                DType::F32 => return f(Weights::F32(&cpu.as_slice::<f32>()?[a..b])),
                DType::F16 => return f(Weights::F16(&cpu.as_slice::<f16>()?[a..b])),
                DType::BF16 => return f(Weights::Bf16(&cpu.as_slice::<bf16>()?[a..b])),
                _ => {}
            }
        }
    }
    let v = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(Weights::F32(&v))
}

/// `f` on the f32 values of a CPU weight tensor: in place when stored f32, else converted for
/// the call.
pub fn with_weights_f32<R>(w: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_weights(w, |ws| ws.with_f32(f))
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
