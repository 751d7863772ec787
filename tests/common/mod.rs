//! Helpers shared by the integration tests: plugin registration, real media, pipelines, and a
//! model directory assembled from the tiny fixture weights.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use gst::prelude::*;
use serde_json::{Value, json};

pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        gst::init().unwrap();
        gstdpir::plugin_register_static().expect("register dpir plugin");
    });
}

/// A shared data folder named by `var` (`tests/run` points `DPIR_MEDIA` and `DPIR_FIXTURES` at
/// `../shared`): unset or missing fails the test, never skips it.
pub fn shared_dir(var: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with `bash tests/run`, which points it at ../shared")
    });
    assert!(p.is_dir(), "{var}={} is not a directory", p.display());
    p
}

pub fn media(name: &str) -> PathBuf {
    let p = shared_dir("DPIR_MEDIA").join(name);
    assert!(p.exists(), "missing real media {}", p.display());
    p
}

pub fn fixtures() -> PathBuf {
    shared_dir("DPIR_FIXTURES")
}

/// Run a pipeline to EOS. Returns the error text if it ended with an ERROR message.
pub fn run_pipeline(pipeline: &gst::Pipeline) -> Result<(), String> {
    let _ = pipeline.set_state(gst::State::Playing);
    let bus = pipeline.bus().unwrap();
    let mut result = Err("pipeline timed out".to_string());
    for msg in bus.iter_timed(gst::ClockTime::from_seconds(900)) {
        match msg.view() {
            gst::MessageView::Eos(_) => {
                result = Ok(());
                break;
            }
            gst::MessageView::Error(e) => {
                result = Err(format!("{}", e.error()));
                break;
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    result
}

pub fn launch(desc: &str) -> gst::Pipeline {
    init();
    gst::parse::launch(desc).unwrap_or_else(|e| panic!("{desc}: {e}")).downcast::<gst::Pipeline>().unwrap()
}

/// Count buffers through the sink pad of the element named `name`.
pub fn count_buffers(pipeline: &gst::Pipeline, name: &str) -> Arc<AtomicU64> {
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    pipeline.by_name(name).unwrap().static_pad("sink").unwrap().add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        n2.fetch_add(1, Ordering::SeqCst);
        gst::PadProbeReturn::Ok
    });
    n
}

/// Keep copies of the buffers (and their caps) reaching the sink pad of `name`.
pub fn capture(pipeline: &gst::Pipeline, name: &str, max: usize) -> Arc<Mutex<Vec<(gst::Buffer, gst::Caps)>>> {
    let store = Arc::new(Mutex::new(Vec::new()));
    let s2 = store.clone();
    pipeline.by_name(name).unwrap().static_pad("sink").unwrap().add_probe(
        gst::PadProbeType::BUFFER,
        move |pad, info| {
            if let Some(buf) = info.buffer() {
                let mut v = s2.lock().unwrap();
                if v.len() < max {
                    v.push((buf.copy(), pad.current_caps().unwrap()));
                }
            }
            gst::PadProbeReturn::Ok
        },
    );
    store
}

/// PSNR in dB between two 8-bit images of the same layout.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "images of different sizes");
    let se: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    10.0 * (255f64.powi(2) / (se / a.len() as f64).max(1e-12)).log10()
}

/// The RGB rows of a captured 8-bit RGB buffer, `w` pixels of each (left-aligned crop), without
/// the stride's padding.
pub fn rgb_rows_cropped(buf: &gst::Buffer, caps: &gst::Caps, w: usize) -> Vec<u8> {
    let info = gst_video::VideoInfo::from_caps(caps).unwrap();
    assert!(w <= info.width() as usize);
    let stride = info.stride()[0] as usize;
    let map = buf.map_readable().unwrap();
    (0..info.height() as usize).flat_map(|y| map[y * stride..y * stride + w * 3].to_vec()).collect()
}

/// Decoded video frames in a file.
pub fn count_frames(path: &Path) -> u64 {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! fakesink name=sink sync=false",
        path.display()
    ));
    let n = count_buffers(&p, "sink");
    run_pipeline(&p).unwrap();
    n.load(Ordering::SeqCst)
}

fn write_json(path: &Path, v: &Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// A model directory built from the tiny fixture components (the same files the parity tests
/// use), laid out as a user would lay out real SD3/DPIR checkpoints.
pub fn fixture_model_dir(name: &str, with_text: bool) -> PathBuf {
    let fx = fixtures();
    let e2e: Value = serde_json::from_slice(&std::fs::read(fx.join("pipeline_e2e/config.json")).unwrap()).unwrap();
    let cfgs = &e2e["library_configs"];
    let dir = std::env::temp_dir().join(format!("dpir-test-model-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let copy = |src: &str, dst: &str| {
        let d = dir.join(dst);
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
        std::fs::copy(fx.join(src), d).unwrap();
    };
    copy("dpir_transformer_square/weights.safetensors", "transformer/diffusion_pytorch_model.safetensors");
    write_json(&dir.join("transformer/config.json"), &cfgs["transformer"]);
    copy("sd3_vae/weights.safetensors", "vae/diffusion_pytorch_model.safetensors");
    write_json(&dir.join("vae/config.json"), &cfgs["vae"]);
    copy("clip_vision_b32/weights.safetensors", "image_encoder_one/model.safetensors");
    write_json(&dir.join("image_encoder_one/config.json"), &cfgs["image_encoder_one"]);
    copy("clip_vision_bigg/weights.safetensors", "image_encoder_two/model.safetensors");
    write_json(&dir.join("image_encoder_two/config.json"), &cfgs["image_encoder_two"]);
    let mut manifest = json!({
        "format": "gst-dpir/1",
        "name": format!("fixture-{name}"),
        "transformer": {"config": "transformer/config.json", "weights": ["transformer/diffusion_pytorch_model.safetensors"]},
        "vae": {"kind": "autoencoder_kl", "config": "vae/config.json", "weights": ["vae/diffusion_pytorch_model.safetensors"]},
        "image_encoder_one": {"config": "image_encoder_one/config.json", "weights": ["image_encoder_one/model.safetensors"]},
        "image_encoder_two": {"config": "image_encoder_two/config.json", "weights": ["image_encoder_two/model.safetensors"]},
        "sampler": {"shift": 3.0, "default_steps": 28}
    });
    if with_text {
        copy("t5_encoder/weights.safetensors", "text_encoder_3/model.safetensors");
        write_json(&dir.join("text_encoder_3/config.json"), &cfgs["text_encoder_three"]);
        copy("t5_encoder/tokenizer/tokenizer.json", "tokenizer_3/tokenizer.json");
        manifest["text_encoder"] = json!({
            "config": "text_encoder_3/config.json",
            "weights": ["text_encoder_3/model.safetensors"],
            "tokenizer": "tokenizer_3/tokenizer.json"
        });
    }
    write_json(&dir.join("model.json"), &manifest);
    dir
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}
