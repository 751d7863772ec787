//! Real GStreamer pipelines on real footage (`../shared/media`, or `$DPIR_MEDIA`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

use gst::prelude::*;
use gstdpir::dpirrestore::DpirRestore;
use gstdpir::engine::{EngineError, EngineSettings, FrameContext, Image, RestoreEngine, StreamInfo, upscale_nearest};

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstdpir::plugin_register_static().expect("register dpir plugin");
    });
}

pub fn media(name: &str) -> PathBuf {
    let dir = std::env::var_os("DPIR_MEDIA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/media"));
    let p = dir.join(name);
    assert!(p.exists(), "missing real media {}", p.display());
    p
}

/// Run a pipeline to EOS; panics with the error message otherwise.
fn run(pipeline: &gst::Pipeline) {
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    for msg in bus.iter_timed(gst::ClockTime::from_seconds(600)) {
        match msg.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => {
                pipeline.set_state(gst::State::Null).unwrap();
                panic!("pipeline error: {} ({:?})", e.error(), e.debug());
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
}

/// Decoded video frames in a file.
fn count_frames(path: &std::path::Path) -> u64 {
    let p = gst::parse::launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! fakesink name=sink sync=false",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    p.by_name("sink").unwrap().static_pad("sink").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        n2.fetch_add(1, Ordering::SeqCst);
        gst::PadProbeReturn::Ok
    });
    run(&p);
    n.load(Ordering::SeqCst)
}

struct Nearest(usize);
impl RestoreEngine for Nearest {
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        self.0 = info.scale;
        Ok(())
    }
    fn restore(&mut self, frame: &Image, _ctx: &FrameContext) -> Result<Image, EngineError> {
        Ok(upscale_nearest(frame, self.0))
    }
}

#[test]
fn test_engine_1906_film_decoded_restored_encoded_keeps_every_frame() {
    init();
    let input = media("Shepard_Calais_1906_FrenchGP.ogv");
    let out = std::env::temp_dir().join(format!("dpir-film-test-{}.ogv", std::process::id()));
    let pipeline = gst::parse::launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! dpirrestore name=d scale=2 ! videoconvert ! \
         theoraenc ! oggmux ! filesink location=\"{}\"",
        input.display(),
        out.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    pipeline
        .by_name("d")
        .unwrap()
        .downcast_ref::<DpirRestore>()
        .unwrap()
        .set_engine_factory(|_s: &EngineSettings| Ok(Box::new(Nearest(1)) as Box<dyn RestoreEngine>));
    run(&pipeline);
    let frames_in = count_frames(&input);
    let frames_out = count_frames(&out);
    assert!(frames_in > 100, "the film has hundreds of frames, decoded {frames_in}");
    assert_eq!(frames_out, frames_in);
    std::fs::remove_file(&out).ok();
}
