//! SD3's flow-matching Euler sampler, reproducing diffusers 0.29.2
//! `FlowMatchEulerDiscreteScheduler` bit for bit (fixture README §3.7): the float32 / float64
//! mix of its recipe is deliberate.

use candle_core::{DType, Result, Tensor};

/// `scheduler/scheduler_config.json`; unknown keys ignored.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
}

impl Default for FlowMatchEulerConfig {
    /// SD3's scheduler config.
    fn default() -> Self {
        Self { num_train_timesteps: 1000, shift: 3.0 }
    }
}

#[derive(Debug, Clone)]
pub struct FlowMatchEulerScheduler {
    cfg: FlowMatchEulerConfig,
    sigma_min: f32,
    sigma_max: f32,
    timesteps: Vec<f32>,
    /// n + 1 values, the last 0.
    sigmas: Vec<f32>,
}

/// diffusers' shift, evaluated in the given precision: `shift·s / (1 + (shift−1)·s)`.
fn shift_f32(shift: f32, s: f32) -> f32 {
    (shift * s) / (1.0 + (shift - 1.0) * s)
}

fn shift_f64(shift: f64, s: f64) -> f64 {
    (shift * s) / (1.0 + (shift - 1.0) * s)
}

/// `np.linspace(start, stop, n)` (float64, endpoint exact).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

impl FlowMatchEulerScheduler {
    pub fn new(cfg: FlowMatchEulerConfig) -> Self {
        // Construction runs in float32: the training sigmas are t/N for t = N..1, shifted.
        let n = cfg.num_train_timesteps.max(1);
        let shift = cfg.shift as f32;
        // t = N gives s = N/N = 1 exactly.
        let sigma_max = shift_f32(shift, 1.0f32);
        let sigma_min = shift_f32(shift, 1.0f32 / n as f32);
        let mut s = Self { cfg, sigma_min, sigma_max, timesteps: vec![], sigmas: vec![0.0] };
        s.set_timesteps(28);
        s
    }

    pub fn config(&self) -> &FlowMatchEulerConfig {
        &self.cfg
    }

    /// Prepare `n` inference steps (the sigmas are shifted a second time, in float64, as diffusers does).
    pub fn set_timesteps(&mut self, n: usize) {
        let nt = self.cfg.num_train_timesteps as f64;
        let ts = linspace(self.sigma_max as f64 * nt, self.sigma_min as f64 * nt, n);
        let sigmas: Vec<f32> = ts.iter().map(|t| shift_f64(self.cfg.shift, t / nt) as f32).collect();
        self.timesteps = sigmas.iter().map(|s| s * nt as f32).collect();
        self.sigmas = sigmas;
        self.sigmas.push(0.0);
    }

    /// Model timesteps (σ·1000, float32), one per step.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Sigmas, `num_steps + 1` values ending with 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// The initial latent is pure noise at σ = 1.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// One Euler step from `sigmas[i]` to `sigmas[i+1]`, computed in float32 as
    /// `denoised = x − v·σ; d = (x − denoised)/σ; x' = x + d·(σ_next − σ)` (not `x + dt·v`,
    /// which rounds differently). Returns the dtype of `model_output`.
    pub fn step(&self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Result<Tensor> {
        if step_index + 1 >= self.sigmas.len() {
            candle_core::bail!("step index {step_index} out of range ({} steps)", self.num_steps());
        }
        let dev = sample.device();
        let sigma = self.sigmas[step_index];
        let dt = self.sigmas[step_index + 1] - sigma;
        let x = sample.to_dtype(DType::F32)?;
        let v = model_output.to_dtype(DType::F32)?;
        let s = Tensor::new(sigma, dev)?;
        let denoised = (&x - v.broadcast_mul(&s)?)?;
        let d = (&x - denoised)?.broadcast_div(&s)?;
        let prev = (&x + d.broadcast_mul(&Tensor::new(dt, dev)?)?)?;
        prev.to_dtype(model_output.dtype())
    }
}

impl FlowMatchEulerScheduler {
    /// diffusers' `scale_noise`: bring a sample to the σ of step `step_index` by mixing in
    /// noise, `σ·noise + (1 − σ)·sample`, in f32 (a warm start re-noises the previous result
    /// this way before sampling resumes at that step).
    pub fn scale_noise(&self, sample: &Tensor, step_index: usize, noise: &Tensor) -> Result<Tensor> {
        let Some(&sigma) = self.sigmas.get(step_index) else {
            candle_core::bail!("step index {step_index} out of range ({} steps)", self.num_steps());
        };
        let s = sigma as f64;
        (noise.to_dtype(DType::F32)? * s)? + (sample.to_dtype(DType::F32)? * (1.0 - s))?
    }
}

impl Default for FlowMatchEulerScheduler {
    fn default() -> Self {
        Self::new(FlowMatchEulerConfig::default())
    }
}

/// Classifier-free guidance: `uncond + g·(cond − uncond)`. DPIR runs without CFG by default;
/// when it is used, the unconditional branch is the transformer evaluated on all-zero
/// `prompt_embeds` and `pooled_prompt_embeds` (same latent, control and timestep).
pub fn guidance(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    uncond + ((cond - uncond)? * scale)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd3_schedule() {
        let mut s = FlowMatchEulerScheduler::default();
        s.set_timesteps(4);
        assert_eq!(s.timesteps()[0], 1000.0);
        assert!((s.timesteps()[1] - 857.6923).abs() < 1e-3);
        assert!((s.timesteps()[3] - 8.9286).abs() < 1e-3);
        s.set_timesteps(28);
        assert_eq!(s.sigmas().len(), 29);
        assert_eq!(s.sigmas()[0], 1.0);
        assert!((s.sigmas()[1] - 0.98738).abs() < 1e-5);
        assert!((s.sigmas()[27] - 0.00893).abs() < 1e-5);
        assert_eq!(s.sigmas()[28], 0.0);
        s.set_timesteps(1);
        assert_eq!((s.timesteps(), s.sigmas()), (&[1000.0f32][..], &[1.0f32, 0.0][..]));
    }

    #[test]
    fn scale_noise_mixes_by_the_step_sigma() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut s = FlowMatchEulerScheduler::default();
        s.set_timesteps(4);
        let x = Tensor::new(&[2.0f32, -1.0], &dev)?;
        let n = Tensor::new(&[0.5f32, 0.25], &dev)?;
        // Step 0 is pure noise; step 2 is σ = 0.6022 (SD3 schedule, 4 steps).
        assert_eq!(s.scale_noise(&x, 0, &n)?.to_vec1::<f32>()?, vec![0.5, 0.25]);
        let sig = s.sigmas()[2];
        assert!((sig - 0.602_150_5).abs() < 1e-5, "{sig}");
        let got = s.scale_noise(&x, 2, &n)?.to_vec1::<f32>()?;
        let want = [sig * 0.5 + (1.0 - sig) * 2.0, sig * 0.25 - (1.0 - sig)];
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
        assert!(s.scale_noise(&x, 5, &n).is_err());
        Ok(())
    }

    #[test]
    fn last_step_lands_on_the_prediction() -> Result<()> {
        // At σ → 0 flow matching gives x0 = x − σ·v.
        let dev = candle_core::Device::Cpu;
        let mut s = FlowMatchEulerScheduler::default();
        s.set_timesteps(1);
        let x = Tensor::new(&[1.0f32, -2.0], &dev)?;
        let v = Tensor::new(&[0.5f32, 0.25], &dev)?;
        assert_eq!(s.step(&v, 0, &x)?.to_vec1::<f32>()?, vec![0.5, -2.25]);
        assert!(s.step(&v, 1, &x).is_err());
        let g = guidance(&x, &v, 2.0)?.to_vec1::<f32>()?;
        assert_eq!(g, vec![0.0, 2.5]);
        Ok(())
    }
}
