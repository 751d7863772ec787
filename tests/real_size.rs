//! DPIR at its real widths, with one or two layers per component: a model directory written at
//! test time in the layout and with the `model.json` template of `weights/README.md` (SD3-medium's
//! 1536-wide, 24-head transformer with its 192² position table and `control_conv`, the SD3 VAE's
//! channels, T5-XXL's 4096-wide, 64-head encoder in two f16 shards, CLIP ViT-B/32 with its text
//! tower and the 1664-wide bigG vision tower; bf16, f16 and f32 files), run through the element,
//! so every real-size code path runs in seconds. The memory preflight is pinned here too: a limit
//! the model cannot fit in (`DPIR_MEMORY_LIMIT`, `ulimit -v`) stops `gst-launch-1.0` with an element
//! error that names the way out, never an abort.

mod common;

#[path = "../benches/real_size/weights.rs"]
mod weights;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// The folder holding this build's `libgstdpir.so` (`tests/run` builds it before the tests).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf(); // target/<profile>/deps/x
    assert!(dir.join("libgstdpir.so").exists(), "{} has no libgstdpir.so: run `cargo build` first", dir.display());
    dir
}

/// The real-width directory, written once per test run (about 1.5 GB in the temp folder).
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dpir-real-width-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/README.md")).unwrap();
        let template = weights::readme_template(&readme).unwrap();
        let tokenizer = fixtures().join("t5_encoder/tokenizer/tokenizer.json");
        let t0 = std::time::Instant::now();
        let w = weights::write_model_dir(&dir, weights::Layers::slim(), 5, &template, &tokenizer).unwrap();
        eprintln!(
            "real-width model: {:.2} G parameters, {:.2} GB on disk, written in {:.1} s",
            w.params() as f64 / 1e9,
            w.bytes() as f64 / 1e9,
            t0.elapsed().as_secs_f64()
        );
        dir
    })
}

/// `gst-launch-1.0` on one 64×48 frame through `dpirrestore model=<dir> {props}`, in a process of
/// its own (so a memory limit applies to it alone), with `env` and an optional `ulimit -v` (KiB):
/// its exit status and output.
fn gst_launch(props: &str, env: &[(&str, &str)], ulimit_kib: Option<u64>) -> (i32, String) {
    let pipeline = format!(
        "videotestsrc num-buffers=1 pattern=smpte ! video/x-raw,format=RGB,width=64,height=48 ! \
         dpirrestore model=\"{}\" device=cpu lq-latent=mode steps=1 {props} ! fakesink",
        model_dir().display()
    );
    let ulimit = ulimit_kib.map(|k| format!("ulimit -v {k}; ")).unwrap_or_default();
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("{ulimit}exec timeout 300 gst-launch-1.0 {pipeline}")])
        .env("GST_PLUGIN_PATH", plugin_dir())
        .env("GST_REGISTRY", std::env::temp_dir().join(format!("dpir-real-width-registry-{}.bin", std::process::id())));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The element restores a frame with the real-width model at each precision, the template
/// loading as written (sharded T5, the B/32 file's text tower skipped, bf16 and f16 files).
#[test]
fn the_readme_template_loads_and_the_element_restores_at_real_widths_in_every_precision() {
    for precision in ["f16", "bf16", "f32"] {
        let p = launch(&format!(
            "videotestsrc num-buffers=1 pattern=smpte ! video/x-raw,format=RGB,width=64,height=48 ! \
             dpirrestore model=\"{}\" device=cpu lq-latent=mode steps=1 precision={precision} \
             prompt=\"an old photograph\" ! identity name=o ! fakesink",
            model_dir().display()
        ));
        let frames = capture(&p, "o", 2);
        let t0 = std::time::Instant::now();
        run_pipeline(&p).unwrap_or_else(|e| panic!("precision={precision}: {e}"));
        let frames = frames.lock().unwrap();
        assert_eq!(frames.len(), 1, "precision={precision}");
        let info = gst_video::VideoInfo::from_caps(&frames[0].1).unwrap();
        assert_eq!((info.width(), info.height()), (64, 48));
        let map = frames[0].0.map_readable().unwrap();
        let distinct: std::collections::HashSet<u8> = map.iter().copied().collect();
        assert!(distinct.len() > 16, "precision={precision}: a flat frame ({} values)", distinct.len());
        eprintln!("precision={precision}: one 64x48 frame in {:.1} s (load included)", t0.elapsed().as_secs_f64());
    }
}

/// gst-launch ended on an element error (status 1 while playing, 255 when the pipeline cannot
/// start), not on a signal (134: abort, 137: the OOM killer).
fn assert_element_error(code: i32, out: &str) {
    assert!(matches!(code, 1 | 255), "exit status {code}: {out}");
    assert!(out.contains("ERROR: from element") && out.contains("dpirrestore"), "{out}");
}

/// A budget below the weights at f32 stops the element at start, naming the figures and the
/// precision that fits; below even that, it says nothing fits. Never an abort.
#[test]
fn a_memory_limit_the_weights_cannot_fit_in_is_an_element_error_naming_the_way_out() {
    let (code, out) = gst_launch("precision=f32", &[("DPIR_MEMORY_LIMIT", "2600M")], None);
    assert_element_error(code, &out);
    assert!(out.contains("DPIR_MEMORY_LIMIT=2600M") && out.contains("precision=f16"), "{out}");
    let (code, out) = gst_launch("precision=f16", &[("DPIR_MEMORY_LIMIT", "400M")], None);
    assert_element_error(code, &out);
    assert!(out.contains("nothing fits"), "{out}");
}

/// With room for every weight but not for a frame of the model's own tile size beside them, T5
/// embeds the prompt and is released (a new prompt loads it again, with no frame in flight): the
/// frame is restored, with a warning that says so.
#[test]
fn when_t5_does_not_fit_beside_the_rest_it_is_released_after_the_prompt_with_a_warning() {
    let (code, out) = gst_launch("precision=f16", &[("DPIR_MEMORY_LIMIT", "2600M")], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("T5 text encoder") && out.contains("released"), "{out}");
}

/// An address-space limit (`ulimit -v`) is a budget too: an element error, exit status 1, where
/// the same limit used to abort the process (`memory allocation failed`, SIGABRT).
#[test]
fn an_address_space_limit_gives_an_element_error_not_an_abort() {
    let (code, out) = gst_launch("precision=f32", &[], Some(2_700_000));
    assert_element_error(code, &out);
    assert!(out.contains("ulimit -v") && out.contains("precision=f16"), "{out}");
}

/// A frame too large for the memory left after loading is refused before its first frame, with
/// the tile size that would fit.
#[test]
fn a_frame_too_large_for_the_memory_left_stops_before_its_first_frame_naming_a_tile_size() {
    let pipeline = format!(
        "videotestsrc num-buffers=1 ! video/x-raw,format=RGB,width=2048,height=2048 ! \
         dpirrestore model=\"{}\" device=cpu precision=f16 low-memory=true steps=1 ! fakesink",
        model_dir().display()
    );
    let out = Command::new("bash")
        .args(["-c", &format!("exec timeout 300 gst-launch-1.0 {pipeline}")])
        .env("GST_PLUGIN_PATH", plugin_dir())
        .env("DPIR_MEMORY_LIMIT", "3G")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_element_error(out.status.code().unwrap_or(-1), &text);
    assert!(text.contains("2048x2048") && text.contains("tile-size="), "{text}");
}
