//! Layers with CPU f32 fast paths ([`super::cpu_ops`]) in front of candle's modules: the
//! same weights and results, candle's kernels on every other device or dtype (CUDA, f16, bf16)
//! and when `DPIR_CPU_OPS=0`.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

use super::cpu_ops;

fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Input channels from which a 3×3 convolution runs as Winograd F(2×2, 3×3) rather than
/// im2col + GEMM. Measured on 2 cores (AVX-512, the `gemm` crate's AVX-512 kernels on both
/// sides): 0.54–0.70× the time from 64 channels up, 0.8–0.87× at 16 → 16 and 32 → 32, even at
/// 16 → 256, 1.05× slower at 8 → 16 (the transforms cost more than the products they save).
const WINOGRAD_MIN_CIN: usize = 16;

/// A `Conv2d` with the CPU paths of [`cpu_ops`]: Winograd for 3×3 / stride 1 / padding 1 from
/// [`WINOGRAD_MIN_CIN`] input channels, blocked im2col + GEMM otherwise (stride 1 and 2), and the
/// fused nearest-×2-upsample + 3×3 convolution of diffusers' `Upsample2D`.
#[derive(Debug, Clone)]
pub struct Conv {
    inner: Conv2d,
    fast: Option<Arc<FastConv>>,
}

#[derive(Debug)]
struct FastConv {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    cout: usize,
    k: usize,
    padding: cpu_ops::Padding,
    stride: usize,
    /// For 3×3 / padding 1 / stride 1 convolutions, made on first use (a layer needs one or
    /// the other, and the SD3 autoencoder's would otherwise hold three copies of its weights):
    /// the same convolution applied after a nearest ×2 upsampling, as four 2×2 kernels on the
    /// input ...
    sub_pixel: OnceLock<cpu_ops::SubPixelWeights>,
    /// ... and the Winograd-transformed weights of the plain convolution.
    winograd: OnceLock<cpu_ops::WinogradWeights>,
}

impl FastConv {
    /// 3×3, padding 1, stride 1.
    fn same_3x3(&self) -> bool {
        self.k == 3 && self.stride == 1 && self.padding == cpu_ops::Padding::same(1)
    }

    fn dims(&self) -> (usize, usize) {
        let cin = self.weight.len() / (self.k * self.k * self.cout);
        (self.cout, cin)
    }
}

/// A convolution named by its checkpoint keys (`weight`, `bias`).
pub fn conv(cin: usize, cout: usize, k: usize, stride: usize, padding: usize, vb: VarBuilder) -> Result<Conv> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Conv::new(candle_nn::conv2d(cin, cout, k, cfg, vb)?)
}

impl Conv {
    /// Square kernels, groups 1, dilation 1 take the fast path; anything else stays candle's.
    pub fn new(inner: Conv2d) -> Result<Self> {
        let w = inner.weight();
        let cfg = *inner.config();
        let (cout, _, kh, kw) = w.dims4()?;
        let plain = cfg.groups == 1 && cfg.dilation == 1 && kh == kw && (cfg.stride == 1 || cfg.stride == 2);
        let fast = if plain && cpu_f32(w) {
            let bias = inner.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
            let weight = w.flatten_all()?.to_vec1::<f32>()?;
            let padding = cpu_ops::Padding::same(cfg.padding);
            Some(Arc::new(FastConv {
                weight,
                bias,
                cout,
                k: kh,
                padding,
                stride: cfg.stride,
                sub_pixel: OnceLock::new(),
                winograd: OnceLock::new(),
            }))
        } else {
            None
        };
        Ok(Self { inner, fast })
    }

    /// `self(upsample_nearest(x, 2×))`, diffusers' `Upsample2D`.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = &self.fast
            && f.same_3x3()
        {
            let sp = f.sub_pixel.get_or_init(|| {
                let (cout, cin) = f.dims();
                cpu_ops::SubPixelWeights::new(&f.weight, cout, cin)
            });
            if let Some(r) = cpu_ops::upsample2x_conv3x3(x, sp, f.bias.as_deref()) {
                return r;
            }
        }
        let (_, _, h, w) = x.dims4()?;
        x.upsample_nearest2d(2 * h, 2 * w)?.apply(self)
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// `self(x)` on `x` zero-padded by one row below and one column right first (diffusers'
    /// `Downsample2D` with `padding=0`), without the padded copy on the fast path.
    pub fn forward_pad_right_bottom(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = &self.fast {
            let p = cpu_ops::Padding { bottom: f.padding.bottom + 1, right: f.padding.right + 1, ..f.padding };
            if let Some(r) = cpu_ops::conv2d(x, &f.weight, f.bias.as_deref(), f.k, p, f.stride) {
                return r;
            }
        }
        x.pad_with_zeros(candle_core::D::Minus1, 0, 1)?.pad_with_zeros(candle_core::D::Minus2, 0, 1)?.apply(self)
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = &self.fast
            && f.same_3x3()
            && f.dims().1 >= WINOGRAD_MIN_CIN
        {
            let wg = f.winograd.get_or_init(|| {
                let (cout, cin) = f.dims();
                cpu_ops::WinogradWeights::new(&f.weight, cout, cin)
            });
            if let Some(r) = cpu_ops::conv3x3_winograd(x, wg, f.bias.as_deref()) {
                return r;
            }
        }
        if let Some(f) = &self.fast
            && let Some(r) = cpu_ops::conv2d(x, &f.weight, f.bias.as_deref(), f.k, f.padding, f.stride)
        {
            return r;
        }
        self.inner.forward(x)
    }
}

/// A `GroupNorm` with the CPU f32 fast path of [`cpu_ops::group_norm`], SiLU fused on demand.
#[derive(Debug, Clone)]
pub struct Gn {
    inner: GroupNorm,
    fast: Option<Arc<(Vec<f32>, Vec<f32>)>>,
    groups: usize,
    eps: f64,
}

/// A group norm named by its checkpoint keys (`weight`, `bias`).
pub fn group_norm(groups: usize, ch: usize, eps: f64, vb: VarBuilder) -> Result<Gn> {
    let (w, b) = (vb.get(ch, "weight")?, vb.get(ch, "bias")?);
    let inner = GroupNorm::new(w.clone(), b.clone(), ch, groups, eps)?;
    let fast = if cpu_f32(&w) { Some(Arc::new((w.to_vec1::<f32>()?, b.to_vec1::<f32>()?))) } else { None };
    Ok(Gn { inner, fast, groups, eps })
}

impl Gn {
    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if let Some(f) = &self.fast
            && let Some(r) = cpu_ops::group_norm(x, self.groups, &f.0, &f.1, self.eps, silu)
        {
            return r;
        }
        let y = self.inner.forward(x)?;
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

/// A `Linear` whose CPU f32 path is one GEMM from the bias ([`cpu_ops::linear`]), with a fused
/// tanh-GELU variant.
#[derive(Debug, Clone)]
pub struct Lin {
    inner: Linear,
    fast: Option<Arc<(Vec<f32>, Option<Vec<f32>>)>>,
    out_features: usize,
}

/// A linear layer named by its checkpoint keys (`weight`, `bias`).
pub fn linear(in_f: usize, out_f: usize, vb: VarBuilder) -> Result<Lin> {
    Lin::new(candle_nn::linear(in_f, out_f, vb)?)
}

impl Lin {
    pub fn new(inner: Linear) -> Result<Self> {
        let w = inner.weight();
        let out_features = w.dim(0)?;
        let fast = if cpu_f32(w) {
            let b = inner.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
            Some(Arc::new((w.flatten_all()?.to_vec1::<f32>()?, b)))
        } else {
            None
        };
        Ok(Self { inner, fast, out_features })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// `gelu_tanh(self(x))`.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = &self.fast
            && let Some(b) = &f.1
            && let Some(r) = cpu_ops::linear_gelu(x, &f.0, b)
        {
            return r;
        }
        self.forward(x)?.gelu()
    }
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(f) = &self.fast
            && let Some(r) = cpu_ops::linear(x, &f.0, f.1.as_deref(), self.out_features)
        {
            return r;
        }
        self.inner.forward(x)
    }
}
