//! SECTION:element-dpirrestore
//!
//! `dpirrestore` restores video frames and still images with DPIR (dual prompting, DiT:
//! "Dual Prompting Image Restoration with Diffusion Transformers", Kong et al., CVPR 2025),
//! optionally upscaling them ×2 or ×4. Every input frame gives exactly one output frame with the
//! same timestamps; the diffusion runs on a worker thread behind a bounded queue
//! (`max-inflight`), so the streaming thread and the pipeline's other branches (audio) keep
//! moving. Within a clip (a run of frames between scene cuts) the text prompt and the global
//! visual prompt are computed once and reused.
//!
//! Progress reaches the bus as `dpir-progress` element messages (`frame-index`, `frames-done`,
//! `fps`, and `eta` in seconds when the stream duration is known); model loading is announced
//! with Progress messages.
//!
//! ## Example launch line
//! ```text
//! gst-launch-1.0 filesrc location=film.ogv ! decodebin ! videoconvert ! \
//!     dpirrestore scale=2 steps=4 ! queue ! videoconvert ! x264enc ! mp4mux ! filesink location=out.mp4
//! ```
//! (The `queue` gives the encoder its own thread; x264 in the element's streaming thread was seen
//! to encode the same frames differently from run to run.)
//!
//! Interlaced material must be deinterlaced first (`deinterlace`).

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;

use crate::engine::{self, EngineError, EngineSettings, RestoreEngine};

mod caps;
mod imp;
mod messages;
mod video;

glib::wrapper! {
    /// The `dpirrestore` element.
    pub struct DpirRestore(ObjectSubclass<imp::DpirRestore>) @extends gst::Element, gst::Object;
}

impl DpirRestore {
    /// Replace the engine the element builds at READY→PAUSED (by default, DPIR from the
    /// `model` directory). For applications embedding the plugin from Rust, and for tests.
    pub fn set_engine_factory<F>(&self, factory: F)
    where
        F: Fn(&EngineSettings) -> Result<Box<dyn RestoreEngine>, EngineError> + Send + Sync + 'static,
    {
        self.imp().set_engine_factory(std::sync::Arc::new(factory));
    }
}

/// Converts a glib enum into the model's enum and back (the element stores the model's).
macro_rules! convert {
    ($glib:ident <=> $lib:path { $($a:ident <=> $b:ident),+ $(,)? }) => {
        impl From<$glib> for $lib {
            fn from(v: $glib) -> Self {
                match v { $($glib::$a => <$lib>::$b),+ }
            }
        }
        impl From<$lib> for $glib {
            fn from(v: $lib) -> Self {
                match v { $(<$lib>::$b => $glib::$a),+ }
            }
        }
    };
}

/// Colour correction after decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstDpirColorFix")]
pub enum ColorFix {
    #[enum_value(name = "Wavelet: output high frequencies + input low frequencies (official)", nick = "wavelet")]
    Wavelet,
    #[enum_value(name = "AdaIN: match per-channel mean and std of the input", nick = "adain")]
    Adain,
    #[enum_value(name = "None", nick = "none")]
    None,
}
convert!(ColorFix <=> engine::ColorFix { Wavelet <=> Wavelet, Adain <=> Adain, None <=> None });

/// How the LQ latent is drawn from the VAE posterior.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstDpirLqLatent")]
pub enum LqLatent {
    #[enum_value(name = "Sample the posterior (official test script)", nick = "sample")]
    Sample,
    #[enum_value(name = "Posterior mode (deterministic)", nick = "mode")]
    Mode,
}
convert!(LqLatent <=> engine::LqLatent { Sample <=> Sample, Mode <=> Mode });

/// Global-prompt tiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstDpirTiling")]
pub enum Tiling {
    #[enum_value(name = "Reference: the official tiling, negative-start quirk included", nick = "reference")]
    Reference,
    #[enum_value(name = "Corrected: every pixel covered; small frames give one tile", nick = "corrected")]
    Corrected,
}
convert!(Tiling <=> engine::TilingMode { Reference <=> Reference, Corrected <=> Corrected });

/// Initial noise of the sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstDpirNoise")]
pub enum Noise {
    #[enum_value(name = "One noise field per clip (less flicker)", nick = "per-clip")]
    PerClip,
    #[enum_value(name = "New noise every frame", nick = "per-frame")]
    PerFrame,
}
convert!(Noise <=> engine::NoiseMode { PerClip <=> PerClip, PerFrame <=> PerFrame });

/// Numeric precision of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(u32)]
#[enum_type(name = "GstDpirPrecision")]
pub enum Precision {
    #[enum_value(name = "float32", nick = "f32")]
    F32,
    #[enum_value(name = "float16", nick = "f16")]
    F16,
    #[enum_value(name = "bfloat16", nick = "bf16")]
    Bf16,
}
convert!(Precision <=> engine::Precision { F32 <=> F32, F16 <=> F16, Bf16 <=> Bf16 });

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    // The enums are part of the element's interface (properties): documented with the plugin.
    for t in [
        ColorFix::static_type(),
        LqLatent::static_type(),
        Tiling::static_type(),
        Noise::static_type(),
        Precision::static_type(),
    ] {
        t.mark_as_plugin_api(gst::PluginAPIFlags::empty());
    }
    gst::Element::register(Some(plugin), "dpirrestore", gst::Rank::NONE, DpirRestore::static_type())
}
