//! gst-dpir: a GStreamer plugin restoring video and stills with DPIR (dual prompting, DiT),
//! Kong et al., CVPR 2025, running on candle.
//!
//! Layout: [`model`] is pure candle (no GStreamer types); [`engine`] is the small interface the
//! element drives, implemented by [`restorer`] (the per-frame policy) with [`cache`] (the
//! per-clip tensors) beside it; [`scene`] finds the clips on the element side; the
//! `dpirrestore` element (feature `gst`) is GStreamer glue only.

pub mod cache;
pub mod engine;
pub mod model;
pub mod restorer;
pub mod scene;

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
