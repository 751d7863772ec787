//! The layers every model file is built from, and the one door to the CPU kernels
//! ([`super::cpu`]): a layer holds its weights once, as candle tensors in their storage dtype,
//! and each forward either runs the CPU kernel ([`cpu::takes`] the activations: CPU, f32) or
//! candle's own op, with the weights cast to the activations' dtype for that call.
//!
//! Storage and compute are separate ([`compute_dtype`]): on the CPU, activations are f32 whatever
//! the weights are stored in (f16/bf16 weights are converted where a call needs them, never
//! kept twice); on a GPU they are in the storage dtype.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::cpu::{self, conv::Padding, conv::SubPixelWeights, winograd::WinogradWeights};

/// The dtype activations are computed in, for weights stored as `storage` on `device`: on the
/// CPU f32 for half weights (candle's CPU matmul has no bf16, its f16 one is slower than f32,
/// and f16 activations overflow) and the storage dtype otherwise (f32, f64); on a GPU the storage
/// dtype.
pub fn compute_dtype(storage: DType, device: &Device) -> DType {
    match storage {
        DType::F16 | DType::BF16 if device.is_cpu() => DType::F32,
        d => d,
    }
}

/// `w` in the dtype of the activations `x` it meets: a no-op when they agree (the GPU, f32).
fn like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() { Ok(w.clone()) } else { w.to_dtype(x.dtype()) }
}

/// `f(weights, bias)` on the f32 values of a CPU weight and its optional bias.
fn with_wb<R>(w: &Tensor, b: Option<&Tensor>, f: impl FnOnce(&[f32], Option<&[f32]>) -> Result<R>) -> Result<R> {
    cpu::with_weights_f32(w, |ws| match b {
        Some(b) => cpu::with_weights_f32(b, |bs| f(ws, Some(bs))),
        None => f(ws, None),
    })
}

/// Input channels from which a 3×3 convolution runs as Winograd F(2×2, 3×3) rather than
/// im2col + GEMM. Measured on 2 cores (AVX-512, the `gemm` crate's AVX-512 kernels on both
/// sides): 0.54–0.70× the time from 64 channels up, 0.8–0.87× at 16 → 16 and 32 → 32, even at
/// 16 → 256, 1.05× slower at 8 → 16 (the transforms cost more than the products they save).
const WINOGRAD_MIN_CIN: usize = 16;

/// A 2-D convolution (checkpoint keys `weight`, `bias`). On the CPU: Winograd for 3×3 / stride 1
/// / padding 1 from [`WINOGRAD_MIN_CIN`] input channels, blocked im2col + GEMM otherwise
/// (square kernels, stride 1 or 2), and the fused nearest-×2-upsample + 3×3 convolution of
/// diffusers' `Upsample2D`; the transformed weights these need are made per call (a small cost
/// next to the convolution) rather than held beside the weights.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

/// A convolution with bias named by its checkpoint keys.
pub fn conv(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Conv::new(vb.get((cout, cin, k, k), "weight")?, Some(vb.get(cout, "bias")?), cfg)
}

/// A convolution without bias (`weight` only).
pub fn conv_no_bias(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Conv::new(vb.get((cout, cin, k, k), "weight")?, None, cfg)
}

impl Conv {
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Result<Self> {
        let (cout, _, _, _) = weight.dims4()?;
        if let Some(b) = &bias
            && b.dims1()? != cout
        {
            candle_core::bail!("convolution bias of {:?} for {cout} output channels", b.dims());
        }
        Ok(Self { weight, bias, cfg })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `(cout, cin, k)` for square kernels.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        let (cout, cin, kh, _) = self.weight.dims4()?;
        Ok((cout, cin, kh))
    }

    /// What the CPU kernels take: groups 1, dilation 1, square kernel, stride 1 or 2.
    fn plain(&self) -> bool {
        let (_, _, kh, kw) = self.weight.dims4().unwrap_or((0, 0, 0, 1));
        self.cfg.groups == 1 && self.cfg.dilation == 1 && kh == kw && (self.cfg.stride == 1 || self.cfg.stride == 2)
    }

    fn same_3x3(&self) -> bool {
        self.plain() && self.weight.dim(2).is_ok_and(|k| k == 3) && self.cfg.stride == 1 && self.cfg.padding == 1
    }

    /// candle's convolution, the weights cast to the activations' dtype.
    fn candle(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref().map(|b| like(b, x)).transpose()?;
        candle_nn::Conv2d::new(like(&self.weight, x)?, b, self.cfg).forward(x)
    }

    /// `self(x)` with the convolution's padding replaced by `pad` (CPU kernels only).
    fn cpu_conv(&self, x: &Tensor, pad: Padding) -> Result<Tensor> {
        let (cout, cin, k) = self.dims()?;
        with_wb(&self.weight, self.bias.as_ref(), |w, b| {
            if k == 3 && self.cfg.stride == 1 && pad == Padding::same(1) && cin >= WINOGRAD_MIN_CIN {
                cpu::winograd::conv3x3_winograd(x, &WinogradWeights::new(w, cout, cin), b)
            } else {
                cpu::conv::conv2d(x, w, b, k, pad, self.cfg.stride)
            }
        })
    }

    /// `self(upsample_nearest(x, 2×))`, diffusers' `Upsample2D`.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::takes(x) && self.same_3x3() && x.rank() == 4 {
            let (cout, cin, _) = self.dims()?;
            return with_wb(&self.weight, self.bias.as_ref(), |w, b| {
                cpu::conv::upsample2x_conv3x3(x, &SubPixelWeights::new(w, cout, cin), b)
            });
        }
        let (_, _, h, w) = x.dims4()?;
        self.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }

    /// `self(x)` on `x` zero-padded by one row below and one column right first (diffusers'
    /// `Downsample2D` with `padding=0`), without the padded copy on the CPU.
    pub fn forward_pad_right_bottom(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::takes(x) && self.plain() && x.rank() == 4 {
            let p = Padding::same(self.cfg.padding);
            return self.cpu_conv(x, Padding { bottom: p.bottom + 1, right: p.right + 1, ..p });
        }
        self.forward(&x.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?)
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::takes(x) && self.plain() && x.rank() == 4 {
            return self.cpu_conv(x, Padding::same(self.cfg.padding));
        }
        self.candle(x)
    }
}

/// A group norm (checkpoint keys `weight`, `bias`), SiLU fused on demand.
#[derive(Debug, Clone)]
pub struct Gn {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, ch: usize, eps: f64, vb: VarBuilder) -> Result<Gn> {
    if groups == 0 || !ch.is_multiple_of(groups) {
        candle_core::bail!("group norm: {ch} channels in {groups} groups");
    }
    Ok(Gn { weight: vb.get(ch, "weight")?, bias: vb.get(ch, "bias")?, groups, eps })
}

impl Gn {
    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if cpu::takes(x) && x.rank() == 4 {
            return with_wb(&self.weight, Some(&self.bias), |g, b| {
                cpu::norm::group_norm(x, self.groups, g, b.unwrap_or_default(), self.eps, silu)
            });
        }
        let c = self.weight.dim(0)?;
        let y = candle_nn::GroupNorm::new(like(&self.weight, x)?, like(&self.bias, x)?, c, self.groups, self.eps)?
            .forward(x)?;
        if silu { candle_nn::ops::silu(&y) } else { Ok(y) }
    }

    /// `silu(group_norm(x))`, the pre-activation of every resnet conv and of `conv_out`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

impl Module for Gn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

/// A linear layer (checkpoint keys `weight` `[out, in]`, optional `bias`); on the CPU one GEMM
/// that starts from the bias, with a fused tanh-GELU variant.
#[derive(Debug, Clone)]
pub struct Lin {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A linear layer with bias named by its checkpoint keys.
pub fn linear(in_f: usize, out_f: usize, vb: VarBuilder) -> Result<Lin> {
    Ok(Lin { weight: vb.get((out_f, in_f), "weight")?, bias: Some(vb.get(out_f, "bias")?) })
}

/// A linear layer without bias.
pub fn linear_no_bias(in_f: usize, out_f: usize, vb: VarBuilder) -> Result<Lin> {
    Ok(Lin { weight: vb.get((out_f, in_f), "weight")?, bias: None })
}

impl Lin {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    fn candle(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.bias.as_ref().map(|b| like(b, x)).transpose()?;
        candle_nn::Linear::new(like(&self.weight, x)?, b).forward(x)
    }

    /// `self(x)` in the reference's order, on every device: the product, then the bias, in
    /// candle's kernels (the CPU path starts from the bias: the same sum, other roundings).
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        self.candle(x)
    }

    /// `gelu_tanh(self(x))`.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::takes(x)
            && let Some(bias) = &self.bias
        {
            return with_wb(&self.weight, Some(bias), |w, b| {
                cpu::transformer::linear_gelu(x, w, b.unwrap_or_default())
            });
        }
        self.forward(x)?.gelu()
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if cpu::takes(x) {
            let out = self.weight.dim(0)?;
            return with_wb(&self.weight, self.bias.as_ref(), |w, b| cpu::transformer::linear(x, w, b, out));
        }
        self.candle(x)
    }
}

/// An affine layer norm over the last dimension (checkpoint keys `weight`, `bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::LayerNorm::new(like(&self.weight, x)?, like(&self.bias, x)?, self.eps).forward(x)
    }
}

/// T5's layer norm: RMS only (no mean, no bias), statistics in f32 (checkpoint key `weight`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

pub fn rms_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm { weight: vb.get(dim, "weight")?, eps })
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(x.dtype())?;
        y.broadcast_mul(&like(&self.weight, &y)?)
    }
}

/// `x + y · gate[:, None]` (a transformer block's gated residual): `x`, `y` `[B, N, C]`, `gate`
/// `[B, C]`; one pass on the CPU.
pub fn add_gated(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if cpu::takes(x) && x.rank() == 3 {
        return cpu::transformer::add_gated(x, y, gate);
    }
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// `layer_norm(x) · (1 + scale[:, None]) + shift[:, None]`: LayerNorm without affine over the
/// last dimension (eps `eps`), then diffusers' adaLN modulation; one pass on the CPU. The
/// fallback is two-pass and in at least f32 (hidden states of the real model have large means,
/// so the one-pass E[x²]−E[x]² of candle's fused kernel is avoided).
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if cpu::takes(x) && x.rank() == 3 {
        return cpu::transformer::layer_norm_modulate(x, shift, scale, eps);
    }
    let dt = x.dtype();
    let xf = x.to_dtype(match dt {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    })?;
    let xc = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    normed.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// Upper bound on the bytes of one attention score matrix on candle's path (heads and query
/// rows are chunked beyond it).
const ATTN_CHUNK_BYTES: usize = 1 << 28;

/// Multi-head attention `softmax(q kᵀ · scale) v` on `[B, N, heads·d]` tensors, returning
/// `[B, N, heads·d]`: the CPU kernel (heads read in place, the scale applied inside the softmax),
/// else [`attention_reference`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    if cpu::takes(q) && q.rank() == 3 {
        return cpu::transformer::attention(q, k, v, heads, scale as f32);
    }
    attention_reference(q, k, v, heads, scale)
}

/// [`attention`] as the reference (HF, diffusers) computes it, on every device: the query
/// pre-scaled, `q kᵀ` in candle's matmuls, the softmax in f32; the score matrix chunked (by
/// heads, then query rows) to at most 256 MiB.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let nk = k.dim(1)?;
    if heads == 0 || !c.is_multiple_of(heads) {
        candle_core::bail!("attention: {c} channels in {heads} heads");
    }
    let d = c / heads;
    let split = |t: &Tensor, n: usize| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(&(q * scale)?, n)?, split(k, nk)?, split(v, nk)?);
    let kt = k.t()?;
    let one = |q: &Tensor, kt: &Tensor, v: &Tensor| -> Result<Tensor> {
        let s = q.matmul(kt)?.to_dtype(DType::F32)?;
        candle_nn::ops::softmax_last_dim(&s)?.to_dtype(v.dtype())?.matmul(v)
    };
    // Heads per chunk, and query rows per chunk when one head alone is too large.
    let per_head = b * n * nk * 4;
    let head_chunk = (ATTN_CHUNK_BYTES / per_head.max(1)).clamp(1, heads);
    let rows = (ATTN_CHUNK_BYTES / (b * nk * 4).max(1)).clamp(1, n);
    let out = if head_chunk == heads {
        one(&q, &kt, &v)?
    } else {
        let mut parts = Vec::new();
        let mut h0 = 0;
        while h0 < heads {
            let hn = head_chunk.min(heads - h0);
            let (qh, kh, vh) = (q.narrow(1, h0, hn)?, kt.narrow(1, h0, hn)?, v.narrow(1, h0, hn)?);
            let mut rows_out = Vec::new();
            let mut r0 = 0;
            while r0 < n {
                let rn = rows.min(n - r0);
                rows_out.push(one(&qh.narrow(2, r0, rn)?, &kh, &vh)?);
                r0 += rn;
            }
            parts.push(Tensor::cat(&rows_out, 2)?);
            h0 += hn;
        }
        Tensor::cat(&parts, 1)?
    };
    out.transpose(1, 2)?.reshape((b, n, c))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn vb(ts: HashMap<String, Tensor>, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_tensors(ts, dtype, &Device::Cpu)
    }

    /// Each wrapper against candle's module on the same weights: the CPU kernel path (f32
    /// activations) with weights stored in f32 and in f16, and the cases the kernels leave to
    /// candle.
    #[test]
    fn layers_match_candle_with_weights_stored_in_f32_and_f16() -> Result<()> {
        let dev = Device::Cpu;
        let x3 = Tensor::randn(0f32, 1., (2, 9, 24), &dev)?;
        let x4 = Tensor::randn(0f32, 1., (1, 16, 7, 10), &dev)?;
        let w = Tensor::randn(0f32, 0.2, (12, 24), &dev)?;
        let b = Tensor::randn(0f32, 0.2, 12, &dev)?;
        let cw = Tensor::randn(0f32, 0.1, (8, 16, 3, 3), &dev)?;
        let cb = Tensor::randn(0f32, 0.1, 8, &dev)?;
        let g = (Tensor::randn(0f32, 0.1, 16, &dev)? + 1.0)?;
        let gb = Tensor::randn(0f32, 0.1, 16, &dev)?;
        for storage in [DType::F32, DType::F16] {
            let tol = if storage == DType::F32 { 1e-4 } else { 1e-2 };
            let ts = HashMap::from([
                ("l.weight".to_string(), w.clone()),
                ("l.bias".to_string(), b.clone()),
                ("c.weight".to_string(), cw.clone()),
                ("c.bias".to_string(), cb.clone()),
                ("n.weight".to_string(), g.clone()),
                ("n.bias".to_string(), gb.clone()),
            ]);
            let vb = vb(ts, storage);
            // linear with and without bias, and its GELU variant
            let reference = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x3)?;
            let lin = linear(24, 12, vb.pp("l"))?;
            assert!(max_diff(&lin.forward(&x3)?, &reference)? < tol, "{storage:?} linear");
            assert!(max_diff(&lin.forward_gelu(&x3)?, &reference.gelu()?)? < tol, "{storage:?} linear gelu");
            let nob = linear_no_bias(24, 12, vb.pp("l"))?;
            let reference = candle_nn::Linear::new(w.clone(), None).forward(&x3)?;
            assert!(max_diff(&nob.forward(&x3)?, &reference)? < tol, "{storage:?} linear, no bias");
            // 3×3 convolution (Winograd: 16 input channels), stride 2 (im2col), upsampled
            let cfg = Conv2dConfig { padding: 1, ..Default::default() };
            let reference = candle_nn::Conv2d::new(cw.clone(), Some(cb.clone()), cfg).forward(&x4)?;
            let c = conv(16, 8, 3, 1, 1, vb.pp("c"))?;
            assert!(max_diff(&c.forward(&x4)?, &reference)? < tol, "{storage:?} conv");
            let up = x4.upsample_nearest2d(14, 20)?;
            let reference = candle_nn::Conv2d::new(cw.clone(), Some(cb.clone()), cfg).forward(&up)?;
            assert!(max_diff(&c.forward_upsampled(&x4)?, &reference)? < tol, "{storage:?} upsampled conv");
            let cfg2 = Conv2dConfig { stride: 2, ..Default::default() };
            let padded = x4.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            let reference = candle_nn::Conv2d::new(cw.clone(), Some(cb.clone()), cfg2).forward(&padded)?;
            let c2 = conv(16, 8, 3, 2, 0, vb.pp("c"))?;
            assert!(max_diff(&c2.forward_pad_right_bottom(&x4)?, &reference)? < tol, "{storage:?} downsample");
            // group norm without and with SiLU
            let reference = candle_nn::GroupNorm::new(g.clone(), gb.clone(), 16, 4, 1e-6)?.forward(&x4)?;
            let gn = group_norm(4, 16, 1e-6, vb.pp("n"))?;
            assert!(max_diff(&gn.forward(&x4)?, &reference)? < tol, "{storage:?} group norm");
            let reference = candle_nn::ops::silu(&reference)?;
            assert!(max_diff(&gn.forward_silu(&x4)?, &reference)? < tol, "{storage:?} group norm + silu");
        }
        Ok(())
    }

    /// The kernel and candle's chunked path give the same attention, one head and several, and
    /// the chunked path stays exact when its chunks are smaller than a head.
    #[test]
    fn attention_kernel_and_candle_path_agree() -> Result<()> {
        let dev = Device::Cpu;
        for heads in [1, 4] {
            let (b, n, c) = (2, 37, 32);
            let q = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
            let k = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
            let v = Tensor::randn(0f32, 1., (b, n, c), &dev)?;
            let d = c / heads;
            let split = |t: &Tensor| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
            let s = (split(&q)?.matmul(&split(&k)?.t()?)? / (d as f64).sqrt())?;
            let reference =
                candle_nn::ops::softmax_last_dim(&s)?.matmul(&split(&v)?)?.transpose(1, 2)?.reshape((b, n, c))?;
            let scale = 1.0 / (d as f64).sqrt();
            assert!(max_diff(&attention(&q, &k, &v, heads, scale)?, &reference)? < 1e-5, "{heads} heads, kernel");
            // the reference path, and candle's path for activations the kernel does not take (f64)
            assert!(max_diff(&attention_reference(&q, &k, &v, heads, scale)?, &reference)? < 1e-5, "{heads} heads");
            let (q64, k64, v64) = (q.to_dtype(DType::F64)?, k.to_dtype(DType::F64)?, v.to_dtype(DType::F64)?);
            assert!(max_diff(&attention(&q64, &k64, &v64, heads, scale)?, &reference)? < 1e-5, "{heads} heads, candle");
        }
        Ok(())
    }
}
