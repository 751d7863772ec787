//! The DPIR engine behind the element: model directory → restored frames.

use crate::engine::{EngineError, EngineSettings, FrameContext, Image, RestoreEngine, StreamInfo};

pub struct DpirEngine {}

impl DpirEngine {
    pub fn load(_settings: &EngineSettings) -> Result<Self, EngineError> {
        Err(EngineError::Model("DPIR engine: model loading is not wired yet".into()))
    }
}

impl RestoreEngine for DpirEngine {
    fn configure(&mut self, _info: &StreamInfo) -> Result<(), EngineError> {
        Ok(())
    }
    fn restore(&mut self, _frame: &Image, _ctx: &FrameContext) -> Result<Image, EngineError> {
        Err(EngineError::Runtime("not wired".into()))
    }
}
