//! `scheduler`: FlowMatchEulerDiscreteScheduler sigmas/timesteps and a 4-step Euler chain
//! (README §3.7: sigmas/timesteps exact, the Euler chain at ≤ 1e-6).
use anyhow::Result;
use candle_core::{Device, Tensor};
use gstdpir::model::scheduler::{FlowMatchEulerConfig, FlowMatchEulerScheduler};

use crate::common::{Case, Produced, Tol, produced};

const SCHED: Tol = Tol::Abs(1e-6);

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let cfg: FlowMatchEulerConfig = serde_json::from_value(case.library_config("scheduler")?.clone())?;
    let mut s = FlowMatchEulerScheduler::new(cfg);
    let mut out = Vec::new();
    for name in case.outputs() {
        if let Some(n) = name.strip_prefix("timesteps_") {
            s.set_timesteps(n.parse()?);
            out.push(produced(&name, Tensor::new(s.timesteps(), &Device::Cpu)?, Tol::Exact));
        } else if let Some(n) = name.strip_prefix("sigmas_") {
            s.set_timesteps(n.parse()?);
            out.push(produced(&name, Tensor::new(s.sigmas(), &Device::Cpu)?, Tol::Exact));
        }
    }
    let v = case.io_f32("model_outputs")?;
    let steps = v.dim(0)?;
    s.set_timesteps(steps);
    let mut x = case.io_f32("sample")?;
    let mut chain = Vec::with_capacity(steps);
    for i in 0..steps {
        x = s.step(&v.get(i)?, i, &x)?;
        chain.push(x.clone());
    }
    out.push(produced(&format!("euler_prev_samples_{steps}"), Tensor::stack(&chain, 0)?, SCHED));
    Ok(out)
}
