//! gst-dpir: a GStreamer plugin restoring video and stills with DPIR (dual prompting, DiT),
//! Kong et al., CVPR 2025, running on candle.
//!
//! Layers, each importing only the ones after it: the `dpirrestore` element (feature `gst`,
//! GStreamer glue only) → [`clip`] (the clip policy: where clips start, each frame's position,
//! the prompt in force) → [`engine`] (the interface the element drives, the DPIR engine and its
//! per-clip state) → [`model`] (pure candle, no GStreamer types).

pub mod clip;
pub mod engine;
pub mod model;

#[cfg(feature = "gst")]
pub mod dpirrestore;

#[cfg(feature = "gst")]
fn plugin_init(plugin: &gst::Plugin) -> Result<(), gst::glib::BoolError> {
    dpirrestore::register(plugin)
}

#[cfg(feature = "gst")]
gst::plugin_define!(
    dpir,
    env!("CARGO_PKG_DESCRIPTION"),
    plugin_init,
    concat!(env!("CARGO_PKG_VERSION"), "-", env!("COMMIT_ID")),
    "MIT/X11",
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_NAME"),
    env!("CARGO_PKG_REPOSITORY"),
    env!("BUILD_REL_DATE")
);
