//! Vectorised element-wise maths shared by the kernels: sums, exp, SiLU, GELU, softmax rows,
//! layer-norm rows; each compiled for AVX2 + FMA where the CPU has them ([`dispatch`]).

/// Runs `$body` (a loop over slices calling the `#[inline(always)]` helpers below) compiled for
/// AVX2 + FMA when the CPU has them (checked once at run time), else for the baseline target:
/// the crate is built for plain x86-64, where libm's `expf`/`tanhf` are scalar calls.
macro_rules! dispatch {
    ($name:ident ($($arg:ident : $ty:ty),*) $body:block) => {
        dispatch!($name ($($arg: $ty),*) -> () $body);
    };
    ($name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty $body:block) => {
        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
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
pub(super) use dispatch;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
