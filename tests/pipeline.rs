//! Real GStreamer pipelines on real footage (`$DPIR_MEDIA`): the 1906 film decoded, restored,
//! encoded and decoded again, once with a nearest-neighbour test engine over the whole film (the
//! element's frame accounting through real codecs) and once with the real engine and the
//! embedded dpir-nano on its first frames.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use gst::prelude::*;
use gstdpir::dpirrestore::DpirRestore;
use gstdpir::engine::{EngineError, EngineSettings, FrameContext, Image, RestoreEngine, StreamInfo, upscale_nearest};

const FILM: &str = "Shepard_Calais_1906_FrenchGP.ogv";

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
fn nearest_test_engine_the_whole_1906_film_decoded_restored_encoded_keeps_every_frame() {
    let input = media(FILM);
    let out = std::env::temp_dir().join(format!("dpir-film-test-{}.ogv", std::process::id()));
    let pipeline = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! dpirrestore name=d scale=2 ! videoconvert ! \
         theoraenc ! oggmux ! filesink location=\"{}\"",
        input.display(),
        out.display()
    ));
    pipeline
        .by_name("d")
        .unwrap()
        .downcast_ref::<DpirRestore>()
        .unwrap()
        .set_engine_factory(|_s: &EngineSettings| Ok(Box::new(Nearest(1)) as Box<dyn RestoreEngine>));
    run_pipeline(&pipeline).expect("film pipeline");
    let frames_in = count_frames(&input);
    let frames_out = count_frames(&out);
    assert!(frames_in > 100, "the film has hundreds of frames, decoded {frames_in}");
    assert_eq!(frames_out, frames_in);
    std::fs::remove_file(&out).ok();
}

/// The element as a user runs it: no `model` property (the embedded dpir-nano), the real engine,
/// ×2, into a real encoder; every frame restored comes out of the file, at twice the size.
#[test]
fn embedded_model_restores_the_film_s_first_frames_through_real_codecs() {
    let input = media(FILM);
    let out = std::env::temp_dir().join(format!("dpir-film-nano-{}.ogv", std::process::id()));
    let frames = 12;
    let pipeline = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! identity eos-after={} ! dpirrestore name=d scale=2 ! \
         videoconvert ! theoraenc ! oggmux ! filesink location=\"{}\"",
        input.display(),
        frames + 1,
        out.display()
    ));
    let n_in = count_buffers(&pipeline, "d");
    run_pipeline(&pipeline).expect("embedded model pipeline");
    let n_in = n_in.load(Ordering::SeqCst);
    assert!(n_in >= frames as u64, "{n_in} frames reached the element");
    let check = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! video/x-raw,format=RGB ! fakesink name=sink",
        out.display()
    ));
    let store = capture(&check, "sink", 1000);
    run_pipeline(&check).expect("decoding the restored file");
    let store = store.lock().unwrap();
    assert_eq!(store.len() as u64, n_in, "one restored frame per input frame");
    let s = store[0].1.structure(0).unwrap().to_owned();
    assert_eq!((s.get::<i32>("width").unwrap(), s.get::<i32>("height").unwrap()), (428, 320));
    std::fs::remove_file(&out).ok();
}
