//! The interface between the element and whatever restores frames.
//!
//! The element (GStreamer glue) converts every video frame to an [`Image`], asks a
//! [`RestoreEngine`] for the restored image, and converts back. The engine owns everything
//! model-related: padding to the sizes the model needs, clip-level caches, devices. Keeping the
//! trait here, apart from its implementation ([`crate::restorer`]), lets the model work evolve
//! without touching the element, and lets tests (and applications embedding the plugin from
//! Rust) plug in engines of their own. This module imports nothing of the crate but the model's
//! setting enums (plain values of a leaf module).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use crate::model::autoencoder::LqLatent;
pub use crate::model::color_fix::ColorFix;
pub use crate::model::dpir::{DeviceSpec, Precision};
pub use crate::model::prompt::TilingMode;

/// A frame as the engine sees it: packed RGB, row-major, values in [0, 1].
///
/// f32 carries 16-bit input (`RGBA64_LE`) and 10-bit input without rounding; 8-bit input maps
/// `v / 255` (exactly torchvision's `ToTensor`). [`StreamInfo::depth`] says which it was.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` values, RGB interleaved.
    pub data: Vec<f32>,
}

impl Image {
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height, data: vec![0.0; width * height * 3] }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [f32; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// What the element knows about the stream when caps are set (again on every caps change).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    pub in_width: usize,
    pub in_height: usize,
    /// Output size = input size × scale.
    pub scale: usize,
    /// Frames per second as a fraction; `None` for variable rate or stills.
    pub fps: Option<(i32, i32)>,
    /// Bits per colour component of the input (8, 10 or 16). 8-bit input is upsampled exactly as
    /// Pillow does (the official code's behaviour); deeper input keeps its precision throughout.
    pub depth: u32,
}

impl StreamInfo {
    pub fn out_width(&self) -> usize {
        self.in_width * self.scale
    }
    pub fn out_height(&self) -> usize {
        self.in_height * self.scale
    }
}

/// Why a new clip starts at a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipReason {
    /// First frame of the stream, or after a flush/seek.
    Start,
    /// Scene cut detected from frame statistics.
    SceneCut,
    /// `clip-max-frames` reached.
    MaxFrames,
    /// An application asked for it with the `dpir-clip` event.
    Event,
    /// The prompt changed (property, event or tags).
    Prompt,
}

impl ClipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ClipReason::Start => "start",
            ClipReason::SceneCut => "scene-cut",
            ClipReason::MaxFrames => "max-frames",
            ClipReason::Event => "event",
            ClipReason::Prompt => "prompt",
        }
    }
}

/// Per-frame context handed to the engine.
#[derive(Debug, Clone)]
pub struct FrameContext {
    /// Index of the frame since the stream started (or since the last flush).
    pub index: u64,
    /// Index of the clip this frame belongs to.
    pub clip_index: u64,
    /// `Some(reason)` on the first frame of a clip.
    pub new_clip: Option<ClipReason>,
    /// Text prompt for this clip (empty: no text, zero T5 tokens).
    pub prompt: String,
    /// Set when the element is flushing: long computations may stop early (the result is
    /// thrown away anyway).
    pub cancel: CancelFlag,
}

/// Cooperative cancellation, checked by engines between expensive steps.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, v: bool) {
        self.0.store(v, Ordering::Relaxed)
    }
}

/// Errors an engine reports; the element turns them into element errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model directory or its weights are unusable: the user must fix files or settings.
    #[error("{0}")]
    Model(String),
    /// A setting cannot be honoured (e.g. bf16 on CPU, CUDA not compiled in).
    #[error("{0}")]
    Settings(String),
    /// The stream cannot be processed (e.g. a frame size the model cannot take).
    #[error("{0}")]
    Stream(String),
    /// Anything failing while restoring a frame.
    #[error("{0}")]
    Runtime(String),
    /// Computation stopped because the element is flushing.
    #[error("cancelled")]
    Cancelled,
}

/// Initial noise of the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseMode {
    /// One noise field per clip (less flicker).
    #[default]
    PerClip,
    /// New noise every frame.
    PerFrame,
}

/// How the engine should run: the element's model-side properties, typed. Its `Default` is the
/// single source of the element's defaults (every ParamSpec default comes from it).
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    /// Model directory; `None`: the embedded default model.
    pub model: Option<PathBuf>,
    pub device: DeviceSpec,
    pub precision: Precision,
    /// Sampling steps; 0: the model's `sampler.default_steps` (28 if it gives none).
    pub steps: u32,
    pub seed: u64,
    pub prompt: String,
    pub color_fix: ColorFix,
    pub lq_latent: LqLatent,
    /// Global-prompt tiling.
    pub tiling: TilingMode,
    /// Latent tile size for large frames; 0: the model's own (`sampler.tile_size` in model.json,
    /// else DPIR's 128 = 1024 px, at most what the model's position table takes).
    pub tile_size: u32,
    /// Overlap of latent tiles; negative: the model's own (`sampler.tile_overlap`, else DPIR's 8
    /// = 64 px, at most a quarter of the tile).
    pub tile_overlap: i32,
    pub noise: NoiseMode,
    /// Free the prompt encoders between clips.
    pub low_memory: bool,
    /// Compute the text embedding and the global visual prompt once per clip (true, the
    /// default) or again for every frame (false: for measurements of what the reuse saves).
    pub reuse_prompts: bool,
    /// Warm start (`warm-start`): 0 = off (every frame samples from noise); `s` in (0, 1]: from
    /// the second frame of a clip on, sampling starts from the previous frame's final latent
    /// re-noised to the σ of step `round((1 − s)·steps)` and runs only the remaining
    /// `≈ s·steps` steps. Fewer steps and less flicker on static shots; on motion the previous
    /// frame's content can linger (ghosting) the lower `s` is.
    pub warm_start: f64,
    /// Fidelity (`fidelity`): negative (-1, the default) = the model's own (`fidelity` in its
    /// model.json, chosen from its validation table; 0 when it names none);
    /// 0 = the full restoration; `f` in (0, 1]: the output is
    /// `(1 − f)·restored + f·LQ` in pixel space, LQ being the input upsampled to the output
    /// size (8-bit: Pillow's bicubic, as the model sees it; deeper: float). 1 gives the LQ back
    /// (the input itself at `scale=1`). Works for any model: how far to trust it on material
    /// it was not trained for is the user's call.
    pub fidelity: f64,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            model: None,
            device: DeviceSpec::Auto,
            precision: Precision::F32,
            steps: 0,
            seed: 0,
            prompt: String::new(),
            color_fix: ColorFix::Wavelet,
            lq_latent: LqLatent::Sample,
            tiling: TilingMode::Reference,
            tile_size: 0,
            tile_overlap: -1,
            noise: NoiseMode::PerClip,
            low_memory: false,
            reuse_prompts: true,
            warm_start: 0.0,
            fidelity: -1.0,
        }
    }
}

/// Something that restores frames. One instance per element; called from the element's
/// worker thread only, so `&mut self` needs no locking.
pub trait RestoreEngine: Send {
    /// Called before the first frame and again whenever the caps change.
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError>;

    /// Restore one frame; the output must be `info.out_width() × info.out_height()`.
    fn restore(&mut self, frame: &Image, ctx: &FrameContext) -> Result<Image, EngineError>;

    /// Expected processing time per frame, for the LATENCY query; `None` if unknown yet.
    fn latency(&self) -> Option<Duration> {
        None
    }

    /// Where the last frame's time went, for the debug log.
    fn timings(&self) -> Option<String> {
        None
    }

    /// A short human-readable description (model, device, precision) for logs.
    fn describe(&self) -> String {
        String::from("engine")
    }

    /// Warnings raised since the last call (e.g. a precision fallback): the element posts each
    /// as a GStreamer warning message, so applications see them.
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
}

/// Builds an engine from settings; called when the element goes READY→PAUSED.
pub type EngineFactory = Arc<dyn Fn(&EngineSettings) -> Result<Box<dyn RestoreEngine>, EngineError> + Send + Sync>;

/// Nearest-neighbour upscaling: the cheapest restoration, used for frames skipped under QoS
/// and by tests.
pub fn upscale_nearest(frame: &Image, scale: usize) -> Image {
    let mut out = Image::new(frame.width * scale, frame.height * scale);
    for y in 0..out.height {
        for x in 0..out.width {
            let src = ((y / scale) * frame.width + x / scale) * 3;
            let dst = (y * out.width + x) * 3;
            out.data[dst..dst + 3].copy_from_slice(&frame.data[src..src + 3]);
        }
    }
    out
}
