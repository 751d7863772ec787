//! Models shared by the engines of one process: elements asking for the same model (source,
//! device, precision, load options) get one copy, kept while any of them holds it.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::model::dpir::{DeviceSpec, DpirModel, LoadOptions, Precision};
use crate::model::loader::{LoadError, ModelSource};

type Slot = Arc<Mutex<Weak<DpirModel>>>;

/// The map's lock is held only to find a model's slot; a model loads under its own slot's lock,
/// so one element loading a model (minutes for real DPIR) never blocks another's start.
static MODELS: LazyLock<Mutex<HashMap<String, Slot>>> = LazyLock::new(Default::default);

/// Load (or reuse) a model. `source` `None`: the embedded dpir-nano.
pub fn shared_model(
    source: Option<ModelSource>,
    device: DeviceSpec,
    precision: Precision,
    opts: &LoadOptions,
) -> Result<Arc<DpirModel>, LoadError> {
    let device = device.device().map_err(LoadError::Settings)?;
    let source = match source {
        Some(s) => s,
        None => ModelSource::embedded().ok_or_else(|| {
            LoadError::Invalid(
                "this build has no embedded model (weights/dpir-nano was missing at build time): set `model` to a \
                 model directory"
                    .into(),
            )
        })?,
    };
    let key =
        format!("{}|{:?}|{precision}|{:?}|{}", source.describe(), device.location(), opts.tiling, opts.low_memory);
    let slot = MODELS.lock().unwrap().entry(key).or_default().clone();
    let mut slot = slot.lock().unwrap();
    if let Some(m) = slot.upgrade() {
        return Ok(m);
    }
    let model = Arc::new(DpirModel::load(source, &device, precision, opts)?);
    *slot = Arc::downgrade(&model);
    Ok(model)
}
