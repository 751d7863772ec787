//! The engine: what the element drives to restore frames, between the element (GStreamer glue,
//! [`crate::dpirrestore`]) and the model (pure candle, [`crate::model`]).
//!
//! The element converts each video frame to a [`Frame`], asks a [`RestoreEngine`] for the
//! restored [`Image`] with the frame's [`FrameContext`] (its clip, from [`crate::clip`]), and
//! converts back. The engine owns everything model-related: the loaded model
//! ([`models::shared_model`]), padding to the sizes the model needs, the per-clip state
//! ([`clip_state`]), devices. Tests and applications embedding the plugin from Rust can plug in
//! engines of their own. Imports run one way: element → clip policy → engine → model.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use crate::model::autoencoder::LqLatent;
pub use crate::model::color_fix::ColorFix;
pub use crate::model::dpir::{DeviceSpec, Precision};
pub use crate::model::loader::LoadError;
pub use crate::model::memory::rss as resident_memory;
pub use crate::model::prompt::TilingMode;

pub mod clip_state;
pub mod dpir;
pub mod models;

/// A frame as the element hands it over: packed RGB, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub pixels: Pixels,
}

/// A frame's RGB values, interleaved: 8-bit frames as bytes (the model's 8-bit path takes them
/// as they are, as the official code does), deeper ones (10-, 16-bit) as floats in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    Rgb8(Vec<u8>),
    RgbF32(Vec<f32>),
}

impl Frame {
    /// The RGB value of a pixel in [0, 1].
    pub fn pixel(&self, x: usize, y: usize) -> [f32; 3] {
        let i = (y * self.width + x) * 3;
        match &self.pixels {
            Pixels::Rgb8(v) => [v[i] as f32 / 255.0, v[i + 1] as f32 / 255.0, v[i + 2] as f32 / 255.0],
            Pixels::RgbF32(v) => [v[i], v[i + 1], v[i + 2]],
        }
    }
}

/// A restored image: three planes (R, G, B) of `width × height` floats in [0, 1], as the model
/// gives them (NCHW); the element writes them into the output format in one pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub planes: Vec<f32>,
}

impl Image {
    pub fn pixel(&self, x: usize, y: usize) -> [f32; 3] {
        let (i, n) = (y * self.width + x, self.width * self.height);
        [self.planes[i], self.planes[n + i], self.planes[2 * n + i]]
    }

    /// Nearest-neighbour upscaling of a frame: the cheapest "restoration", for frames skipped
    /// under QoS and for tests.
    pub fn upscale_nearest(frame: &Frame, scale: usize) -> Image {
        let (w, h) = (frame.width * scale, frame.height * scale);
        let n = w * h;
        let mut planes = vec![0f32; 3 * n];
        for y in 0..h {
            for x in 0..w {
                let p = frame.pixel(x / scale, y / scale);
                for (c, v) in p.into_iter().enumerate() {
                    planes[c * n + y * w + x] = v;
                }
            }
        }
        Image { width: w, height: h, planes }
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

/// Per-frame context handed to the engine: where the frame is in its clip, from the clip
/// policy (the element's `crate::clip::ClipTracker`).
#[derive(Debug, Clone)]
pub struct FrameContext {
    /// Index of the frame since the stream started (or since the last flush).
    pub index: u64,
    /// Index of the clip this frame belongs to.
    pub clip_index: u64,
    /// Position of the frame in its clip (0: the clip's first frame).
    pub position: u64,
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
    /// The model could not be loaded (files, a setting, memory): see [`LoadError`].
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A setting cannot be honoured (e.g. a tile size the model cannot take).
    #[error("{0}")]
    Settings(String),
    /// The stream cannot be processed (e.g. a frame size the model cannot take, or the memory
    /// it needs).
    #[error("{0}")]
    Stream(String),
    /// The model failed while restoring a frame.
    #[error("DPIR: {0}")]
    Runtime(#[from] candle_core::Error),
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
    /// The stream's first prompt (the element's `prompt` property when it starts): embedded
    /// while loading, so a model whose T5 is released does not load it again for it.
    pub prompt: String,
    pub color_fix: ColorFix,
    pub lq_latent: LqLatent,
    /// Global-prompt tiling.
    pub tiling: TilingMode,
    /// Latent tile size for large frames; 0: the model's own (`sampler.tile_size` in model.json,
    /// else DPIR's 128 = 1024 px, at most what the model's position table takes). A size below
    /// the autoencoder's own tiles shrinks those too (less memory).
    pub tile_size: u32,
    /// Overlap of latent tiles; negative: the model's own (`sampler.tile_overlap`, else DPIR's 8
    /// = 64 px, at most a quarter of the tile).
    pub tile_overlap: i32,
    pub noise: NoiseMode,
    /// Keep T5 only while it embeds a new prompt.
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
    /// model.json, chosen from its validation table; 0 when it names none); 0 = the full
    /// restoration; `f` in (0, 1]: the output is `(1 − f)·restored + f·LQ` in pixel space, LQ
    /// being the input upsampled to the output size (8-bit: Pillow's bicubic, as the model sees
    /// it; deeper: float). 1 gives the LQ back (the input itself at `scale=1`).
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

/// Where one frame's time went, and (when memory profiling is on) each stage's peak resident
/// memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameTimings {
    pub upsample: Duration,
    pub text: Duration,
    pub global_prompt: Duration,
    pub local_prompt: Duration,
    pub encode: Duration,
    pub sample: Duration,
    pub steps: usize,
    pub decode: Duration,
    /// Colour fix, fidelity blend and conversion.
    pub color_fix: Duration,
    /// The model's fusion stage (zero when it has none).
    pub fusion: Duration,
    pub total: Duration,
    /// Peak resident bytes per stage (`DPIR_PROFILE_MEMORY=1`), in the order above from `text`.
    pub peak_rss: Option<[u64; 7]>,
}

impl std::fmt::Display for FrameTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "upsample {:.1} ms, T5 {:.1} ms, global prompt {:.1} ms, local prompt {:.1} ms, encode {:.1} ms, \
             sample {:.1} ms ({} steps), decode {:.1} ms, colour fix {:.1} ms, fusion {:.1} ms, total {:.1} ms",
            ms(self.upsample),
            ms(self.text),
            ms(self.global_prompt),
            ms(self.local_prompt),
            ms(self.encode),
            ms(self.sample),
            self.steps,
            ms(self.decode),
            ms(self.color_fix),
            ms(self.fusion),
            ms(self.total)
        )?;
        if let Some(p) = self.peak_rss {
            let m = |b: u64| b as f64 / (1u64 << 20) as f64;
            write!(
                f,
                "; peak RSS MiB: T5 {:.0}, global prompt {:.0}, local prompt {:.0}, encode {:.0}, sample {:.0}, \
                 decode {:.0}, colour fix {:.0}",
                m(p[0]),
                m(p[1]),
                m(p[2]),
                m(p[3]),
                m(p[4]),
                m(p[5]),
                m(p[6])
            )?;
        }
        Ok(())
    }
}

/// One restored frame with everything the element reports about it.
#[derive(Debug, Clone)]
pub struct Restored {
    pub image: Image,
    pub timings: FrameTimings,
    /// Warnings raised by this frame (e.g. a precision fallback): posted as GStreamer warnings.
    pub warnings: Vec<String>,
}

/// Something that restores frames. One instance per element; called from the element's
/// worker thread only, so `&mut self` needs no locking.
pub trait RestoreEngine: Send {
    /// Called before the first frame and again whenever the caps change.
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError>;

    /// Restore one frame (the engine may keep or reuse its pixels); the output must be
    /// `info.out_width() × info.out_height()`.
    fn restore(&mut self, frame: Frame, ctx: &FrameContext) -> Result<Restored, EngineError>;

    /// A short human-readable description (model, device, precision) for logs.
    fn describe(&self) -> String {
        String::from("engine")
    }

    /// Warnings about the settings, raised when the engine was built (a setting without
    /// effect, T5 released to fit in memory).
    fn load_warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Builds an engine from settings; called when the element goes READY→PAUSED.
pub type EngineFactory = Arc<dyn Fn(&EngineSettings) -> Result<Box<dyn RestoreEngine>, EngineError> + Send + Sync>;
