//! Shared machinery for the parity tests: case discovery, fixture loading, comparison.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::Value;

/// A case runner: computes the case's tensors from its inputs and weights.
pub type Runner = fn(&Case) -> Result<Vec<Produced>>;

/// How a produced tensor is compared with the stored one (fixture README §4).
#[derive(Debug, Clone, Copy)]
pub enum Tol {
    /// `max |a - b| <= eps` on float values.
    Abs(f64),
    /// Integer-valued tensors (token ids, tile boxes): bit-exact.
    Exact,
    /// uint8 images: at most `max_count` values may differ, each by at most `max_diff`.
    Uint8 { max_diff: f64, max_count: usize },
}

/// Suggested tolerances from the fixture README.
pub const FLOAT: Tol = Tol::Abs(1e-4);
pub const T5_FLOAT: Tol = Tol::Abs(2e-4);
pub const E2E_FLOAT: Tol = Tol::Abs(2e-4);
pub const UINT8: Tol = Tol::Uint8 { max_diff: 1.0, max_count: 8 };

/// One tensor produced by a runner, named as in `io.safetensors`.
pub struct Produced {
    pub name: String,
    pub tensor: Tensor,
    pub tol: Tol,
}

pub fn produced(name: &str, tensor: Tensor, tol: Tol) -> Produced {
    Produced { name: name.to_string(), tensor, tol }
}

/// A fixture case folder: its config and its io tensors (on the CPU, as stored).
pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub config: Value,
    pub io: HashMap<String, Tensor>,
}

impl Case {
    pub fn load(dir: &Path) -> Result<Self> {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let cfg_path = dir.join("config.json");
        let config: Value = serde_json::from_slice(
            &std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
        )?;
        let io_path = dir.join("io.safetensors");
        let io = candle_core::safetensors::load(&io_path, &Device::Cpu)
            .with_context(|| format!("reading {}", io_path.display()))?;
        Ok(Self { name, dir: dir.to_path_buf(), config, io })
    }

    /// An io tensor as stored (dtype as stored: f32, u8 or i64).
    pub fn io(&self, name: &str) -> Result<Tensor> {
        self.io.get(name).cloned().ok_or_else(|| anyhow!("{}: io tensor `{name}` missing", self.name))
    }

    /// An io tensor converted to f32.
    pub fn io_f32(&self, name: &str) -> Result<Tensor> {
        Ok(self.io(name)?.to_dtype(DType::F32)?)
    }

    /// A value of `config.json` by JSON pointer, e.g. `/call/num_inference_steps`.
    pub fn cfg(&self, pointer: &str) -> Result<&Value> {
        self.config.pointer(pointer).ok_or_else(|| anyhow!("{}: config.json has no `{pointer}`", self.name))
    }

    /// The constructor config of a component: `library_config` for component cases,
    /// `library_configs/<component>` for multi-component ones.
    pub fn library_config(&self, component: &str) -> Result<&Value> {
        self.config
            .pointer(&format!("/library_configs/{component}"))
            .or_else(|| self.config.get("library_config"))
            .ok_or_else(|| anyhow!("{}: no library config for `{component}`", self.name))
    }

    /// Path of a component's weight file: `weight_files/<component>` relative to the case
    /// folder, else `weights.safetensors`.
    pub fn weight_path(&self, component: &str) -> PathBuf {
        match self.config.pointer(&format!("/weight_files/{component}")).and_then(Value::as_str) {
            Some(rel) => self.dir.join(rel),
            None => self.dir.join("weights.safetensors"),
        }
    }

    /// A float32 VarBuilder over a component's weight file, through the model loader's path.
    pub fn var_builder(&self, component: &str) -> Result<VarBuilder<'static>> {
        let path = self.weight_path(component);
        let vb = gstdpir::model::loader::var_builder_from_files(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
            .with_context(|| format!("loading {}", path.display()))?;
        Ok(vb)
    }

    /// The `io` entries of config.json whose role is `output`.
    pub fn outputs(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .config
            .get("io")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter(|(_, e)| e.get("role").and_then(Value::as_str) == Some("output"))
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// `$DPIR_FIXTURES` (`tests/run` sets it to `../shared/fixtures`); unset is an error.
pub fn fixtures_dir() -> Result<PathBuf, String> {
    std::env::var_os("DPIR_FIXTURES")
        .map(PathBuf::from)
        .ok_or_else(|| "DPIR_FIXTURES is not set: run `bash tests/run` (it points it at ../shared/fixtures)".into())
}

/// Max |a - b| and the number of differing values, both as f64.
pub fn diff_stats(actual: &Tensor, expected: &Tensor) -> Result<(f64, usize)> {
    let a = actual.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let e = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut max = 0f64;
    let mut count = 0usize;
    for (x, y) in a.iter().zip(e.iter()) {
        let d = (x - y).abs();
        if d.is_nan() {
            return Ok((f64::NAN, a.len()));
        }
        if d > 0.0 {
            count += 1;
        }
        max = max.max(d);
    }
    Ok((max, count))
}

/// Compare one produced tensor with the stored one.
pub fn check(case: &str, p: &Produced, expected: &Tensor) -> Result<String> {
    if p.tensor.dims() != expected.dims() {
        bail!("{case}::{}: shape {:?}, expected {:?}", p.name, p.tensor.dims(), expected.dims());
    }
    let (max, count) = diff_stats(&p.tensor, expected)?;
    let ok = match p.tol {
        Tol::Abs(eps) => max <= eps,
        Tol::Exact => max == 0.0,
        Tol::Uint8 { max_diff, max_count } => max <= max_diff && count <= max_count,
    };
    let msg = format!("{case}::{}: max |diff| = {max:.3e}, {count} values differ (tolerance {:?})", p.name, p.tol);
    if ok { Ok(msg) } else { bail!(msg) }
}

type CaseResult = Result<HashMap<String, Produced>, String>;

/// Every case folder becomes trials; every case in `expected` must be there (a missing one is a
/// failing `<case>::present` trial), so coverage cannot shrink unseen.
pub fn main(runners: &'static [(&'static str, Runner)], expected: &'static [&'static str]) {
    let args = Arguments::from_args();
    let mut trials = Vec::new();
    let mut dirs: Vec<PathBuf> = match fixtures_dir() {
        Err(msg) => {
            trials.push(Trial::test("fixtures_present", move || Err(Failed::from(msg))));
            Vec::new()
        }
        Ok(root) => match std::fs::read_dir(&root) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect(),
            Err(e) => {
                let msg = format!("cannot read fixtures at {} ({e}); set DPIR_FIXTURES", root.display());
                trials.push(Trial::test("fixtures_present", move || Err(Failed::from(msg))));
                Vec::new()
            }
        },
    };
    dirs.sort();
    for &case in expected {
        if !dirs.iter().any(|d| d.file_name().is_some_and(|n| n == case)) {
            let msg = format!("fixture case `{case}` is missing from DPIR_FIXTURES (tests/parity.rs lists it)");
            trials.push(Trial::test(format!("{case}::present"), move || Err(Failed::from(msg))));
        }
    }
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let runner = runners
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, r)| *r);
        let Some(runner) = runner else {
            let msg = format!("fixture case `{name}` has no runner in tests/parity.rs");
            trials.push(Trial::test(format!("{name}::has_runner"), move || Err(Failed::from(msg))));
            continue;
        };
        let case = match Case::load(&dir) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let msg = format!("{e:#}");
                trials.push(Trial::test(format!("{name}::load"), move || Err(Failed::from(msg))));
                continue;
            }
        };
        // The runner runs once per case, shared by its per-tensor trials.
        let result: Arc<OnceLock<CaseResult>> = Arc::new(OnceLock::new());
        let outputs = case.outputs();
        if outputs.is_empty() {
            let msg = format!("{name}: config.json lists no outputs");
            trials.push(Trial::test(format!("{name}::outputs"), move || Err(Failed::from(msg))));
        }
        for out in outputs {
            let case = case.clone();
            let result = result.clone();
            trials.push(Trial::test(format!("{name}::{out}"), move || {
                let produced = result.get_or_init(|| {
                    runner(&case)
                        .map(|v| v.into_iter().map(|p| (p.name.clone(), p)).collect())
                        .map_err(|e| format!("{e:#}"))
                });
                let produced =
                    produced.as_ref().map_err(|e| Failed::from(format!("{}: runner failed: {e}", case.name)))?;
                let p = produced
                    .get(&out)
                    .ok_or_else(|| Failed::from(format!("{}: runner did not produce output `{out}`", case.name)))?;
                let expected = case.io(&out).map_err(|e| Failed::from(e.to_string()))?;
                let msg = check(&case.name, p, &expected).map_err(|e| Failed::from(e.to_string()))?;
                if std::env::var_os("DPIR_PARITY_VERBOSE").is_some() {
                    eprintln!("{msg}");
                }
                Ok(())
            }));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
