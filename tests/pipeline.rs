//! Real GStreamer pipelines on real footage (`$DPIR_MEDIA`): the 1906 film decoded, restored,
//! encoded and decoded again, once with a nearest-neighbour test engine over the whole film (the
//! element's frame accounting through real codecs) and once with the real engine and the
//! embedded dpir-nano on its first frames.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use gst::prelude::*;
use gstdpir::dpirrestore::DpirRestore;
use gstdpir::engine::{
    EngineError, EngineSettings, Frame, FrameContext, FrameTimings, Image, RestoreEngine, Restored, StreamInfo,
};

const FILM: &str = "Shepard_Calais_1906_FrenchGP.ogv";

struct Nearest(usize);
impl RestoreEngine for Nearest {
    fn configure(&mut self, info: &StreamInfo) -> Result<(), EngineError> {
        self.0 = info.scale;
        Ok(())
    }
    fn restore(&mut self, frame: Frame, _ctx: &FrameContext) -> Result<Restored, EngineError> {
        Ok(Restored {
            image: Image::upscale_nearest(&frame, self.0),
            timings: FrameTimings::default(),
            warnings: vec![],
        })
    }
}

#[test]
fn nearest_test_engine_the_whole_1906_film_decoded_restored_encoded_keeps_every_frame() {
    let input = media(FILM);
    let out = std::env::temp_dir().join(format!("dpir-film-test-{}.mkv", std::process::id()));
    let pipeline = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! dpirrestore name=d scale=2 ! videoconvert ! \
         avenc_ffv1 ! matroskamux ! filesink location=\"{}\"",
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
/// ×2, into a real encoder (FFV1 in Matroska, as `restore-film.sh` writes `.mkv`); every frame
/// restored comes out of the file, at twice the size, and each is the film's frame restored: the
/// model changed it (below 50 dB from the plain upscale that `fidelity=1` writes) and kept the
/// picture (above 30 dB from it; a shifted or garbled frame is far below). (Theora in Ogg here
/// decoded fewer frames than were written in 1 run of about 12 on a loaded machine; FFV1,
/// lossless, has no rate control or timing of its own.)
#[test]
fn embedded_model_restores_the_film_s_first_frames_through_real_codecs() {
    let frames = 12;
    let encode = |props: &str, name: &str| {
        let out = std::env::temp_dir().join(format!("dpir-film-nano-{name}-{}.mkv", std::process::id()));
        let pipeline = launch(&format!(
            "filesrc location=\"{}\" ! decodebin ! videoconvert ! identity eos-after={} ! dpirrestore name=d scale=2 \
             {props} ! videoconvert ! avenc_ffv1 ! matroskamux ! filesink location=\"{}\"",
            media(FILM).display(),
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
        std::fs::remove_file(&out).ok();
        let store = store.lock().unwrap();
        assert_eq!(store.len() as u64, n_in, "one restored frame per input frame");
        let s = store[0].1.structure(0).unwrap().to_owned();
        assert_eq!((s.get::<i32>("width").unwrap(), s.get::<i32>("height").unwrap()), (428, 320));
        store.iter().map(|(b, c)| rgb_rows_cropped(b, c, 428)).collect::<Vec<_>>()
    };
    let (restored, plain) = (encode("", "restored"), encode("fidelity=1", "plain"));
    assert_eq!(restored.len(), plain.len());
    // The frame that meets `eos-after` is not decoded alike in two runs (its input alone differs,
    // by about 30 dB): compare the frames before it.
    let db: Vec<f64> = restored.iter().zip(&plain).take(frames).map(|(r, p)| psnr(r, p)).collect();
    println!("restored vs plain upscale per frame, dB: {db:.1?}");
    for (i, d) in db.iter().enumerate() {
        assert!((30.0..50.0).contains(d), "frame {i}: restored vs plain upscale {d:.2} dB");
    }
}

/// The folder holding this build's `libgstdpir.so` (`tests/run` builds it before the tests):
/// programs other than the test binary (ges-launch-1.0) load the plugin from there.
fn plugin_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf(); // target/<profile>/deps/x
    assert!(
        dir.join("libgstdpir.so").exists(),
        "{} has no libgstdpir.so: run `cargo build` first (tests/run does)",
        dir.display()
    );
    dir
}

/// Render one second of the film through GES (`ges-launch-1.0`, the editing library's own tool)
/// into FFV1 in Matroska (lossless: `-f` sets the encoding profile), with `effect` on the clip or
/// none; returns the decoded frames' hashes. (The default `.ogv` profile, Theora, once decoded 14
/// of the 15 frames under load.)
fn ges_render(effect: Option<&str>, name: &str) -> Vec<u64> {
    let out = std::env::temp_dir().join(format!("dpir-ges-{name}-{}.mkv", std::process::id()));
    let mut cmd = std::process::Command::new("ges-launch-1.0");
    cmd.env("GST_PLUGIN_PATH", plugin_dir())
        .arg("+track")
        .arg("video")
        .arg("restrictions=video/x-raw,width=214,height=160,framerate=15/1")
        .arg("+clip")
        .arg(media(FILM))
        .arg("inpoint=2.0")
        .arg("duration=1.0");
    if let Some(e) = effect {
        cmd.arg("+effect").arg(e);
    }
    let status = cmd
        .arg("-o")
        .arg(format!("file://{}", out.display()))
        .arg("-f")
        .arg("video/x-matroska:video/x-ffv,ffvversion=(int)1")
        .output()
        .expect("ges-launch-1.0 (Debian ges1.0-tools)");
    assert!(status.status.success(), "ges-launch-1.0 failed: {}", String::from_utf8_lossy(&status.stderr));
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! video/x-raw,format=RGB ! fakesink name=sink",
        out.display()
    ));
    let store = capture(&p, "sink", 1000);
    run_pipeline(&p).expect("decoding the GES render");
    std::fs::remove_file(&out).ok();
    store
        .lock()
        .unwrap()
        .iter()
        .map(|(b, _)| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            b.map_readable().unwrap().as_slice().hash(&mut h);
            h.finish()
        })
        .collect()
}

/// `dpirrestore` as an effect in an editing application (GES): one second of the 1906 film at
/// 15 frames/s renders to 15 frames, and they are restored ones (they differ from the same
/// render without the effect).
#[test]
fn ges_effect_renders_every_frame_of_the_clip_restored() {
    init();
    let restored = ges_render(Some("dpirrestore"), "effect");
    let plain = ges_render(None, "plain");
    assert_eq!(restored.len(), 15, "one second at 15 frames/s");
    assert_eq!(plain.len(), 15);
    let same = restored.iter().zip(&plain).filter(|(a, b)| a == b).count();
    assert_eq!(same, 0, "{same} frames came out of GES unrestored");
}

/// `pipelines/lib/launch.py` (what the film script runs) reports an error that comes
/// while the pipeline is still starting (jpegparse on a file with no JPEG frame, while
/// `dpirrestore` loads its model) and exits; GStreamer 1.22's gst-launch-1.0 waited forever on
/// this about once in 30 runs under load. Twenty runs, each must end within 60 s.
#[test]
fn launch_py_never_waits_forever_on_an_error_while_the_pipeline_starts() {
    let broken = std::env::temp_dir().join(format!("dpir-launch-broken-{}.jpg", std::process::id()));
    std::fs::write(&broken, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let python = std::env::var("DPIR_PYTHON").unwrap_or("/usr/bin/python3".into());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/lib/launch.py");
    for run in 0..20 {
        let mut child = std::process::Command::new(&python)
            .arg(&script)
            .args(["filesrc", &format!("location={}", broken.display()), "!", "jpegparse", "!", "avdec_mjpeg"])
            .args(["!", "videoconvert", "!", "dpirrestore", "!", "videoconvert", "!", "fakesink"])
            .env("GST_PLUGIN_PATH", plugin_dir())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("launch.py (Debian python3-gi)");
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed().as_secs() > 60 {
                child.kill().ok();
                panic!("run {run}: launch.py still waiting after 60 s on an error while starting");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "run {run}: {err}");
        assert!(err.contains("No valid frames found"), "run {run}: the error is not reported: {err}");
    }
    std::fs::remove_file(&broken).ok();
}
