//! The real DPIR engine inside the element, from a model directory assembled from the tiny
//! fixture weights: the 1906 film end to end, determinism, equality with the library, scale=2
//! with latent tiling, a large still, and every kind of broken model directory.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::Ordering;

use common::*;
use gst::prelude::*;
use gstdpir::engine::dpir::DpirEngine;
use gstdpir::engine::{
    ClipReason, ColorFix, DeviceSpec, EngineSettings, Frame, FrameContext, Image, LqLatent, NoiseMode, Pixels,
    Precision, RestoreEngine, StreamInfo, TilingMode,
};

/// An image's planes as interleaved 8-bit RGB, rounded as the element writes them.
fn rgb8(img: &Image) -> Vec<u8> {
    (0..img.width * img.height * 3)
        .map(|i| {
            let p = img.pixel((i / 3) % img.width, i / 3 / img.width);
            (p[i % 3].clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect()
}

/// The upsampled LQ frame's planes at the output size (the tensor is padded to a multiple of 16).
fn lq_planes(up: &gstdpir::engine::dpir::Upsampled) -> Vec<f32> {
    let lq = up.lq.narrow(2, 0, up.height).unwrap().narrow(3, 0, up.width).unwrap();
    lq.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// An 8-bit frame whose values are `f(i)` for byte `i`.
fn frame8(w: usize, h: usize, f: impl Fn(usize) -> u8) -> Frame {
    Frame { width: w, height: h, pixels: Pixels::Rgb8((0..w * h * 3).map(f).collect()) }
}

const FILM: &str = "Shepard_Calais_1906_FrenchGP.ogv";

/// The film through the element. `size` scales it down first (the tiny fixture VAE runs at a
/// few frames/s on 2 cores at full size); no `videorate`: every decoded frame reaches the
/// element. `frames` bounds the length with `identity eos-after`.
fn film_pipeline(
    model: &Path,
    extra: &str,
    frames: Option<u32>,
    size: Option<(u32, u32)>,
    sink: &str,
) -> gst::Pipeline {
    let limit = frames.map(|n| format!("identity eos-after={n} ! ")).unwrap_or_default();
    let scale =
        size.map(|(w, h)| format!("videoscale ! video/x-raw,width={w},height={h},")).unwrap_or("video/x-raw,".into());
    launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! {scale}format=RGB ! {limit}queue name=in ! \
         dpirrestore name=d model=\"{}\" steps=2 lq-latent=mode seed=7 {extra} ! queue name=out ! {sink}",
        media(FILM).display(),
        model.display()
    ))
}

fn frame_hashes(store: &[(gst::Buffer, gst::Caps)]) -> Vec<u64> {
    store
        .iter()
        .map(|(b, _)| {
            let mut h = DefaultHasher::new();
            b.map_readable().unwrap().as_slice().hash(&mut h);
            h.finish()
        })
        .collect()
}

#[test]
fn fixture_model_restores_the_1906_film_frame_for_frame_and_deterministically() {
    let model = fixture_model_dir("film", true);
    // Lossless FFV1 in Matroska: a frame count through it is exact (a lossy encoder's rate
    // control may drop or duplicate).
    let out = std::env::temp_dir().join(format!("dpir-film-{}.mkv", std::process::id()));
    let p = film_pipeline(
        &model,
        "",
        None,
        Some((64, 48)),
        &format!("identity name=o ! videoconvert ! avenc_ffv1 ! matroskamux ! filesink location=\"{}\"", out.display()),
    );
    let n_in = count_buffers(&p, "in");
    let first = capture(&p, "o", 400);
    let first_in = capture(&p, "d", 400);
    let t0 = std::time::Instant::now();
    run_pipeline(&p).expect("film pipeline");
    let secs = t0.elapsed().as_secs_f64();
    let n_in = n_in.load(Ordering::SeqCst);
    assert!(n_in >= 280, "the whole film (19.2 s at 15 frames/s) is decoded: {n_in} frames");
    assert_eq!(count_frames(&out), n_in, "one output frame per input frame");
    eprintln!(
        "film: {n_in} frames in {secs:.1} s ({:.1} frames/s), peak RSS {:.0} MiB",
        n_in as f64 / secs,
        peak_rss_mib()
    );

    // Same seed, lq-latent=mode: bit-identical output (first 60 frames).
    let p2 = film_pipeline(&model, "", Some(61), Some((64, 48)), "identity name=o ! fakesink");
    let again = capture(&p2, "o", 400);
    let again_in = capture(&p2, "d", 400);
    run_pipeline(&p2).unwrap();
    // The frame `identity eos-after` ends on can come out of the decoder chain differently
    // (seen: its input bytes differ); every frame whose input is identical must come out identical.
    let (b, bi) = (frame_hashes(&again.lock().unwrap()), frame_hashes(&again_in.lock().unwrap()));
    let (a, ai) = (frame_hashes(&first.lock().unwrap()), frame_hashes(&first_in.lock().unwrap()));
    let same_input: Vec<usize> = (0..b.len()).filter(|&i| ai[i] == bi[i]).collect();
    assert!(same_input.len() >= 59, "only {} frames had identical input", same_input.len());
    let differing: Vec<usize> = same_input.iter().copied().filter(|&i| a[i] != b[i]).collect();
    assert!(differing.is_empty(), "frames {differing:?} differ between two runs with the same seed and input");
    std::fs::remove_file(&out).ok();
    std::fs::remove_dir_all(&model).ok();
}

/// The first frame of the film (scaled to `size`) through the element with `props`, and the
/// same frame through the library engine with `settings`: (element output, library output,
/// output width × height).
fn element_and_library(
    model: &Path,
    size: (u32, u32),
    props: &str,
    settings: &EngineSettings,
    scale: usize,
) -> (Vec<u8>, Vec<u8>, (usize, usize)) {
    let p = film_pipeline(model, props, Some(2), Some(size), "identity name=o ! fakesink");
    let ins = capture(&p, "d", 1);
    let outs = capture(&p, "o", 1);
    run_pipeline(&p).unwrap();
    let (inbuf, incaps) = ins.lock().unwrap()[0].clone();
    let (outbuf, outcaps) = outs.lock().unwrap()[0].clone();
    let info = gst_video::VideoInfo::from_caps(&incaps).unwrap();
    let out_info = gst_video::VideoInfo::from_caps(&outcaps).unwrap();
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(inbuf.as_ref(), &info).unwrap();
    let (w, h, stride) = (info.width() as usize, info.height() as usize, info.stride()[0] as usize);
    let data = frame.plane_data(0).unwrap();
    let img = frame8(w, h, |i| data[(i / (w * 3)) * stride + i % (w * 3)]);
    let mut engine = DpirEngine::load(settings).unwrap();
    engine.configure(&StreamInfo { in_width: w, in_height: h, scale, fps: None, depth: 8 }).unwrap();
    let ctx = first_frame(&settings.prompt);
    let lib = engine.restore(img, &ctx).unwrap().image;
    let (ow, oh, ostride) = (out_info.width() as usize, out_info.height() as usize, out_info.stride()[0] as usize);
    assert_eq!((lib.width, lib.height), (ow, oh));
    let map = outbuf.map_readable().unwrap();
    let mut el = Vec::with_capacity(ow * oh * 3);
    for y in 0..oh {
        el.extend_from_slice(&map[y * ostride..y * ostride + ow * 3]);
    }
    (el, rgb8(&lib), (ow, oh))
}

/// Each model-side property reaches the engine: the element's output equals the library's with
/// the same setting, and differs from the output without it (so an element that ignored the
/// property would fail). Frames are 560×144 so that `tiling` matters (a side in (512, 1024) is
/// where the official tiling's quirk bites).
#[test]
fn element_output_equals_the_library_for_every_model_property() {
    let model = fixture_model_dir("equal", true);
    let base = EngineSettings {
        model: Some(model.clone()),
        device: DeviceSpec::Cpu,
        steps: 2,
        seed: 7,
        lq_latent: LqLatent::Mode,
        prompt: "an old racing car".into(),
        ..Default::default()
    };
    let size = (560, 144);
    let base_props = "prompt=\"an old racing car\"";
    let size = (size.0 as usize, size.1 as usize);
    let (el0, lib0, _) = element_and_library(&model, (size.0 as u32, size.1 as u32), base_props, &base, 1);
    assert!(el0 == lib0, "element and library disagree with default settings");
    type Tweak = fn(&mut EngineSettings);
    let cases: [(&str, Tweak, usize); 9] = [
        ("color-fix=adain", |s| s.color_fix = ColorFix::Adain, 1),
        ("color-fix=none", |s| s.color_fix = ColorFix::None, 1),
        ("tiling=corrected", |s| s.tiling = TilingMode::Corrected, 1),
        ("noise=per-frame", |s| s.noise = NoiseMode::PerFrame, 1),
        ("lq-latent=sample", |s| s.lq_latent = LqLatent::Sample, 1),
        ("tile-size=16 tile-overlap=4", |s| (s.tile_size, s.tile_overlap) = (16, 4), 1),
        ("tile-size=16 tile-overlap=6", |s| (s.tile_size, s.tile_overlap) = (16, 6), 1),
        ("fidelity=0.5", |s| s.fidelity = 0.5, 1),
        ("scale=2", |_| {}, 2),
    ];
    let mut outputs = std::collections::HashMap::new();
    for (props, tweak, scale) in cases {
        let mut settings = base.clone();
        tweak(&mut settings);
        // ×2 from half the size: the same output size as the others.
        let input = ((size.0 / scale) as u32, (size.1 / scale) as u32);
        let t0 = std::time::Instant::now();
        let (el, lib, (w, h)) = element_and_library(&model, input, &format!("{base_props} {props}"), &settings, scale);
        assert!(el == lib, "[{props}] element and library disagree");
        if scale == 1 {
            let differing = el.iter().zip(&el0).filter(|(a, b)| a != b).count();
            assert!(differing > 0, "[{props}] changes nothing: the element ignores it");
        } else {
            assert_eq!((w, h), size);
        }
        eprintln!("[{props}] element == library ({w}x{h}, {:.1} s)", t0.elapsed().as_secs_f64());
        outputs.insert(props, el);
    }
    // The overlap alone changes the output (the tile size above changes it either way).
    assert!(
        outputs["tile-size=16 tile-overlap=4"] != outputs["tile-size=16 tile-overlap=6"],
        "tile-overlap changes nothing: the element ignores it"
    );
    std::fs::remove_dir_all(&model).ok();
}

/// `noise`: `per-clip` draws one noise field for a clip, `per-frame` a new one for every frame
/// (by its position in the clip): on a still shot (the same frame three times, one clip; the
/// `colors` pattern is static, `smpte`'s is not) the per-clip frames are identical and the
/// per-frame ones all differ.
#[test]
fn noise_per_frame_changes_every_frame_of_a_still_shot_and_per_clip_none() {
    let model = fixture_model_dir("noise", false);
    for (mode, identical) in [("per-clip", true), ("per-frame", false)] {
        let p = launch(&format!(
            "videotestsrc num-buffers=3 pattern=colors ! video/x-raw,format=RGB,width=64,height=48 ! \
             dpirrestore model=\"{}\" device=cpu steps=1 lq-latent=mode noise={mode} ! identity name=o ! fakesink",
            model.display()
        ));
        let frames = capture(&p, "o", 3);
        run_pipeline(&p).unwrap();
        let h = frame_hashes(&frames.lock().unwrap());
        assert_eq!(h.len(), 3);
        if identical {
            assert!(h[0] == h[1] && h[1] == h[2], "noise={mode}: the still shot's frames differ");
        } else {
            assert!(h[0] != h[1] && h[1] != h[2] && h[0] != h[2], "noise={mode}: frames repeat");
        }
    }
    std::fs::remove_dir_all(&model).ok();
}

/// `low-memory` through the element: the model it loads keeps T5 only while it embeds a prompt
/// (the load message says so), and without it T5 stays.
#[test]
fn low_memory_through_the_element_loads_t5_per_new_prompt() {
    let model = fixture_model_dir("lowmem-element", true);
    for (low, phrase) in [(true, "T5 loaded per new prompt"), (false, "T5 kept loaded")] {
        let p = launch(&format!(
            "videotestsrc num-buffers=1 ! video/x-raw,format=RGB,width=64,height=48 ! \
             dpirrestore model=\"{}\" device=cpu steps=1 low-memory={low} ! fakesink",
            model.display()
        ));
        let texts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let t2 = texts.clone();
        p.bus().unwrap().set_sync_handler(move |_, msg| {
            if let gst::MessageView::Progress(pr) = msg.view() {
                t2.lock().unwrap().push(pr.get().2.to_string());
            }
            gst::BusSyncReply::Pass
        });
        run_pipeline(&p).unwrap();
        let texts = texts.lock().unwrap();
        assert!(texts.iter().any(|t| t.contains(phrase)), "low-memory={low}: {texts:?}");
    }
    std::fs::remove_dir_all(&model).ok();
}

/// The context of a stream's first frame (a new clip) with `prompt`.
fn first_frame(prompt: &str) -> FrameContext {
    FrameContext {
        index: 0,
        clip_index: 0,
        position: 0,
        new_clip: Some(ClipReason::Start),
        prompt: prompt.into(),
        cancel: Default::default(),
    }
}

/// The RGB rows of a captured 8-bit RGB buffer, without the stride's padding.
fn rgb_rows(buf: &gst::Buffer, caps: &gst::Caps) -> Vec<u8> {
    rgb_rows_cropped(buf, caps, gst_video::VideoInfo::from_caps(caps).unwrap().width() as usize)
}

/// `fidelity` blends the restoration towards the input in pixel space: at `scale=1`,
/// `fidelity=1` gives the input frame back exactly, and `fidelity=0.5` lies halfway between the
/// full restoration and the input (to the 8-bit rounding of each).
#[test]
fn fidelity_one_gives_the_input_back_and_a_half_lies_halfway() {
    let model = fixture_model_dir("fidelity", true);
    let run = |props: &str| {
        let p = film_pipeline(&model, props, Some(2), Some((128, 96)), "identity name=o ! fakesink");
        let ins = capture(&p, "d", 1);
        let outs = capture(&p, "o", 1);
        run_pipeline(&p).unwrap();
        let (i, o) = (ins.lock().unwrap()[0].clone(), outs.lock().unwrap()[0].clone());
        (rgb_rows(&i.0, &i.1), rgb_rows(&o.0, &o.1))
    };
    let (input, full) = run("fidelity=0");
    let (_, one) = run("fidelity=1");
    let (_, half) = run("fidelity=0.5");
    assert!(one == input, "fidelity=1 does not give the input back");
    let moved = full.iter().zip(&input).filter(|(a, b)| a.abs_diff(**b) > 2).count();
    assert!(moved > full.len() / 10, "the full restoration is the input ({moved} values moved): nothing to blend");
    let worst = half
        .iter()
        .zip(full.iter().zip(&input))
        .map(|(&h, (&r, &i))| (h as f64 - (r as f64 + i as f64) / 2.0).abs())
        .fold(0f64, f64::max);
    assert!(worst <= 1.0, "fidelity=0.5 is {worst} levels from halfway between restoration and input");
    std::fs::remove_dir_all(&model).ok();
}

#[test]
fn fixture_model_at_scale_2_tiles_the_latent_and_keeps_every_frame() {
    // 214×160 ×2 → 428×320 → padded 432×320 → latent 54×40: more than the tiny transformer's
    // 32-latent position table, so latent tiling must engage.
    let model = fixture_model_dir("scale2", false);
    let p = film_pipeline(&model, "scale=2 tile-size=32 tile-overlap=8", Some(4), None, "identity name=o ! fakesink");
    let n_in = count_buffers(&p, "in");
    let outs = capture(&p, "o", 100);
    let t0 = std::time::Instant::now();
    run_pipeline(&p).expect("scale=2 pipeline");
    let outs = outs.lock().unwrap();
    assert_eq!(outs.len() as u64, n_in.load(Ordering::SeqCst));
    let s = outs[0].1.structure(0).unwrap().to_owned();
    assert_eq!((s.get::<i32>("width").unwrap(), s.get::<i32>("height").unwrap()), (428, 320));
    eprintln!(
        "scale=2: {} frames in {:.1} s, peak RSS {:.0} MiB",
        outs.len(),
        t0.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    std::fs::remove_dir_all(&model).ok();
}

/// Run the element on a broken model directory: exactly one ERROR, with the given words.
fn assert_model_error(model: &Path, words: &[&str]) {
    let p = launch(&format!(
        "videotestsrc num-buffers=2 ! video/x-raw,format=RGB,width=64,height=48 ! dpirrestore model=\"{}\" ! fakesink",
        model.display()
    ));
    let err = run_pipeline(&p).expect_err("a broken model directory must end the pipeline with an error");
    for w in words {
        assert!(err.contains(w), "error `{err}` should mention `{w}`");
    }
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("model.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn missing_weight_file_names_the_file() {
    let d = fixture_model_dir("missing", false);
    std::fs::remove_file(d.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    assert_model_error(&d, &["vae/diffusion_pytorch_model.safetensors", "cannot read"]);
}

#[test]
fn truncated_safetensors_is_reported_as_truncated() {
    let d = fixture_model_dir("truncated", false);
    let f = d.join("transformer/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    assert_model_error(&d, &["transformer/diffusion_pytorch_model.safetensors", "truncated"]);
}

#[test]
fn wrong_shape_names_the_tensor_and_the_expected_shape() {
    let d = fixture_model_dir("shape", false);
    // A transformer config that does not match its weights (wider heads).
    let cfg_path = d.join("transformer/config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["attention_head_dim"] = serde_json::json!(32);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    assert_model_error(&d, &["transformer", "shape", "expected"]);
}

#[test]
fn wrong_dtype_names_the_tensor() {
    let d = fixture_model_dir("dtype", false);
    // Rewrite one CLIP weight file with an integer tensor in it.
    let f = d.join("image_encoder_one/model.safetensors");
    let mut ts = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).unwrap();
    let name = "vision_model.pre_layrnorm.weight".to_string();
    let t = ts[&name].to_dtype(candle_core::DType::I64).unwrap();
    ts.insert(name, t);
    candle_core::safetensors::save(&ts, &f).unwrap();
    assert_model_error(&d, &["vision_model.pre_layrnorm.weight", "dtype"]);
}

#[test]
fn pickle_is_refused_with_conversion_advice() {
    let d = fixture_model_dir("pickle", false);
    std::fs::write(d.join("vae/diffusion_pytorch_model.bin"), [0x80u8, 0x02, b'}', b'q', 0]).unwrap();
    edit_manifest(&d, |m| m["vae"]["weights"] = serde_json::json!(["vae/diffusion_pytorch_model.bin"]));
    assert_model_error(&d, &["pickle", "save_file"]);
}

#[test]
fn unknown_manifest_key_is_named() {
    let d = fixture_model_dir("unknown", false);
    edit_manifest(&d, |m| m["controlnet"] = serde_json::json!("x"));
    assert_model_error(&d, &["model.json", "unknown field `controlnet`"]);
}

#[test]
fn empty_directory_says_model_json_is_missing() {
    let d = std::env::temp_dir().join(format!("dpir-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    assert_model_error(&d, &["no model.json", "empty"]);
    std::fs::remove_dir_all(&d).ok();
}

/// Every precision the element offers runs on the CPU, on the embedded model and on a model
/// directory: the weights are held in it and computed in f32, so the frames stay within the
/// weights' rounding of the f32 ones.
#[test]
fn every_precision_restores_on_the_cpu_with_the_embedded_model_and_a_model_directory() {
    let d = fixture_model_dir("precisions", true);
    for model in [String::new(), format!("model=\"{}\"", d.display())] {
        let run = |precision: &str| -> Vec<Vec<u8>> {
            let p = launch(&format!(
                "videotestsrc num-buffers=2 pattern=smpte ! video/x-raw,format=RGB,width=64,height=48 ! \
                 dpirrestore {model} device=cpu precision={precision} lq-latent=mode ! identity name=o ! fakesink"
            ));
            let frames = capture(&p, "o", 10);
            run_pipeline(&p).unwrap_or_else(|e| panic!("{model} precision={precision}: {e}"));
            frames.lock().unwrap().iter().map(|(b, _)| b.map_readable().unwrap().to_vec()).collect()
        };
        let reference = run("f32");
        for precision in ["f16", "bf16"] {
            let got = run(precision);
            assert_eq!(got.len(), 2, "{model} {precision}");
            let diff = got.iter().flatten().zip(reference.iter().flatten()).map(|(a, b)| a.abs_diff(*b)).max();
            let mean =
                got.iter().flatten().zip(reference.iter().flatten()).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>()
                    / reference.iter().flatten().count() as f64;
            eprintln!("{model} precision={precision}: max {diff:?} levels from f32, mean {mean:.3}");
            assert!(mean < 2.0, "{model} precision={precision}: mean {mean:.3} levels from f32");
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

fn engine_settings(model: &Path, low_memory: bool) -> EngineSettings {
    EngineSettings {
        model: Some(model.to_path_buf()),
        device: DeviceSpec::Cpu,
        steps: 1,
        lq_latent: LqLatent::Mode,
        low_memory,
        ..Default::default()
    }
}

/// `fidelity=1` returns the LQ frame (the input upsampled to the output size) without running
/// the model: no prompt is encoded and no frame is sampled, and the values are the upsampled
/// input's, at `scale=2` as at 1.
#[test]
fn fidelity_one_returns_the_upsampled_input_without_running_the_model() {
    let d = fixture_model_dir("fidelity-one", false);
    let settings = EngineSettings { fidelity: 1.0, ..engine_settings(&d, false) };
    let mut e = DpirEngine::load(&settings).unwrap();
    e.configure(&StreamInfo { in_width: 20, in_height: 12, scale: 2, fps: None, depth: 8 }).unwrap();
    let img = frame8(20, 12, |i| ((i * 37) % 256) as u8);
    let ctx = first_frame("");
    let out = e.restore(img.clone(), &ctx).unwrap().image;
    let up = e.upsample(img).unwrap();
    assert_eq!((out.width, out.height), (40, 24));
    assert!(out.planes == lq_planes(&up), "fidelity=1 is not the upsampled input");
    let stats = e.stats();
    assert_eq!((stats.frames, stats.local_encodes, stats.global_encodes), (0, 0, 0), "the model ran: {stats:?}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn two_elements_naming_the_same_directory_share_one_loaded_model() {
    let d = fixture_model_dir("shared", false);
    let a = DpirEngine::load(&engine_settings(&d, false)).unwrap();
    let b = DpirEngine::load(&engine_settings(&d, false)).unwrap();
    assert!(std::sync::Arc::ptr_eq(a.model(), b.model()));
    drop((a, b));
    std::fs::remove_dir_all(&d).ok();
}

/// `low-memory`: T5 embeds the stream's first prompt while the model loads and is released
/// before the rest is built; a new prompt loads it again, and it is released after it.
#[test]
fn low_memory_keeps_the_text_encoder_only_while_it_embeds_a_new_prompt() {
    let d = fixture_model_dir("lowmem", true);
    let settings = EngineSettings { prompt: "a car".into(), ..engine_settings(&d, true) };
    let mut e = DpirEngine::load(&settings).unwrap();
    assert!(!e.model().text_encoder_loaded(), "released once the first prompt was embedded");
    assert!(!e.model().plan.text_resident);
    e.configure(&StreamInfo { in_width: 32, in_height: 32, scale: 1, fps: None, depth: 8 }).unwrap();
    let img = frame8(32, 32, |_| 0);
    let ctx = |i: u64, prompt: &str| FrameContext {
        index: i,
        clip_index: 0,
        position: i,
        new_clip: (i == 0).then_some(ClipReason::Start),
        prompt: prompt.into(),
        cancel: Default::default(),
    };
    e.restore(img.clone(), &ctx(0, "a car")).unwrap();
    assert!(!e.model().text_encoder_loaded(), "the first prompt needed no reload");
    e.restore(img.clone(), &ctx(1, "a boat")).unwrap();
    assert!(!e.model().text_encoder_loaded(), "released after the new prompt");
    assert_eq!(e.stats().text_encodes, 2);
    // Without low-memory (and with memory to spare) T5 stays.
    let e = DpirEngine::load(&engine_settings(&d, false)).unwrap();
    assert!(e.model().text_encoder_loaded() && e.model().plan.text_resident);
    std::fs::remove_dir_all(&d).ok();
}

/// The embedded dpir-nano (no `model` property) restores a photo that real codecs degraded
/// (Lanczos to half size, JPEG at quality 30) at ×2, for two photos: the output is the photo
/// (at most 0.5 dB below the plain upscale against the original; dpir-nano's margin over it is a
/// few tenths of a dB either way, its model card's floor is 0.2 dB on its own set) and the model
/// did change it (30–50 dB from the plain upscale, which `fidelity=1` gives): a shifted, tinted,
/// garbled or unrestored picture fails.
#[test]
fn embedded_dpir_nano_restores_a_jpeg_degraded_photo_with_no_model_property() {
    for photo in ["chelsea.png", "coffee.png"] {
        let png = media(photo);
        let original = launch(&format!(
            "filesrc location=\"{}\" ! pngdec ! videoconvert ! video/x-raw,format=RGB ! identity name=o ! fakesink",
            png.display()
        ));
        let got = capture(&original, "o", 1);
        run_pipeline(&original).unwrap();
        let (buf, caps) = got.lock().unwrap()[0].clone();
        let info = gst_video::VideoInfo::from_caps(&caps).unwrap();
        let (w, h) = (info.width() as usize / 2, info.height() as usize / 2);
        let crop = |b: &gst::Buffer, c: &gst::Caps| {
            let rows = rgb_rows_cropped(b, c, 2 * w);
            rows[..2 * w * 3 * 2 * h].to_vec()
        };
        let reference = crop(&buf, &caps);
        let restore = |props: &str| {
            let p = launch(&format!(
                "filesrc location=\"{}\" ! pngdec ! videoconvert ! videoscale method=lanczos ! \
                 video/x-raw,width={w},height={h} ! videoconvert ! jpegenc quality=30 ! jpegdec ! videoconvert ! \
                 video/x-raw,format=RGB ! dpirrestore scale=2 {props} ! identity name=o ! fakesink",
                png.display()
            ));
            let outs = capture(&p, "o", 1);
            run_pipeline(&p).expect("embedded model");
            let (b, c) = outs.lock().unwrap()[0].clone();
            let s = c.structure(0).unwrap();
            assert_eq!((s.get::<i32>("width").unwrap(), s.get::<i32>("height").unwrap()), (2 * w as i32, 2 * h as i32));
            crop(&b, &c)
        };
        let (restored, plain) = (restore(""), restore("fidelity=1"));
        let (r, u, changed) = (psnr(&restored, &reference), psnr(&plain, &reference), psnr(&restored, &plain));
        println!("{photo}: restored {r:.2} dB, plain upscale {u:.2} dB, restored vs plain {changed:.2} dB");
        assert!(r >= u - 0.5, "{photo}: restored {r:.2} dB against the original, the plain upscale {u:.2} dB");
        assert!((30.0..50.0).contains(&changed), "{photo}: restored vs plain upscale {changed:.2} dB");
    }
}

/// One RGBA64_LE frame through `dpirrestore {props}` (appsrc → element → appsink): the output's
/// 16-bit RGB values, row-major.
fn restore_rgba64(props: &str, w: usize, h: usize, rgb: &dyn Fn(usize, usize) -> f64) -> Vec<[u16; 3]> {
    init();
    let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgba64Le, w as u32, h as u32).build().unwrap();
    let p = launch(&format!(
        "appsrc name=src caps=\"{}\" ! dpirrestore {props} ! appsink name=sink",
        info.to_caps().unwrap()
    ));
    let src = p.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let sink = p.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    let mut raw = Vec::with_capacity(w * h * 8);
    for y in 0..h {
        for x in 0..w {
            let v = (rgb(x, y) * 65535.0).round() as u16;
            for c in [v, v, v, 65535] {
                raw.extend_from_slice(&c.to_le_bytes());
            }
        }
    }
    p.set_state(gst::State::Playing).unwrap();
    src.push_buffer(gst::Buffer::from_mut_slice(raw)).unwrap();
    src.end_of_stream().unwrap();
    let sample = sink.pull_sample().expect("a restored frame");
    let map = sample.buffer().unwrap().map_readable().unwrap().to_vec();
    p.set_state(gst::State::Null).unwrap();
    map.chunks_exact(8).map(|p| [0, 1, 2].map(|c| u16::from_le_bytes([p[2 * c], p[2 * c + 1]]))).collect()
}

/// Deep colour end to end, with the embedded model: a horizontal ramp rising by 0.8 of one 8-bit
/// level across a 16-bit frame and the same ramp rounded to 8-bit values give different outputs
/// through the element (before, frames were rounded to 8 bits and both gave the same); the
/// frame reaches the model unrounded (the engine's LQ tensor equals the 16-bit input to f32
/// precision); and the element's 16-bit output is the engine's float result to within one
/// 16-bit unit, not 8-bit values.
#[test]
fn a_16_bit_ramp_finer_than_one_8_bit_level_survives_the_element() {
    let (w, h) = (128usize, 64usize);
    let rise = 0.8 / 255.0;
    let ramp = |x: usize, _y: usize| 0.5 + rise * x as f64 / (w - 1) as f64;
    let rounded = |x: usize, y: usize| (ramp(x, y) * 255.0).round() / 255.0;
    let a = restore_rgba64("lq-latent=mode", w, h, &ramp);
    let b = restore_rgba64("lq-latent=mode", w, h, &rounded);
    assert_ne!(a, b, "the 16-bit ramp and its 8-bit rounding give the same output");

    // The same frame through the engine: what the model sees, and its float result.
    let settings = EngineSettings { device: DeviceSpec::Cpu, lq_latent: LqLatent::Mode, ..Default::default() };
    let mut engine = DpirEngine::load(&settings).unwrap();
    engine.configure(&StreamInfo { in_width: w, in_height: h, scale: 1, fps: None, depth: 16 }).unwrap();
    let mut data = vec![0f32; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let v = ((ramp(x, y) * 65535.0).round() / 65535.0) as f32;
            data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&[v; 3]);
        }
    }
    let frame = Frame { width: w, height: h, pixels: Pixels::RgbF32(data.clone()) };
    let ctx = first_frame("");
    let lq = engine.upsample(frame.clone()).unwrap().lq;
    let lq = lq.squeeze(0).unwrap().permute((1, 2, 0)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let lq_err = lq.iter().zip(&data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(lq_err < 1e-6, "the model sees the 16-bit input to within {lq_err} (one 8-bit level is 3.9e-3)");
    let out = engine.restore(frame, &ctx).unwrap().image;
    let mut worst = 0f64;
    let mut eight_bit_like = 0;
    for (i, px) in a.iter().enumerate() {
        for (&o, &p) in out.pixel(i % w, i / w).iter().zip(px) {
            worst = worst.max((o as f64 * 65535.0 - p as f64).abs());
            eight_bit_like += (p % 257 == 0) as usize;
        }
    }
    let n = a.len() * 3;
    eprintln!("16-bit output vs engine float: max {worst:.2} units; {eight_bit_like} of {n} values are 8-bit levels");
    assert!(worst < 0.51, "the element's 16-bit output is {worst} units from the engine's float result");
    assert!(eight_bit_like < n / 50, "{eight_bit_like} of {n} output values are 8-bit levels: rounded on the way");
}

/// A fixture model whose VAE decoder output is scaled by 1e5: its activations overflow f16
/// (±65504) but not f32.
fn overflowing_model_dir() -> std::path::PathBuf {
    let d = fixture_model_dir("f16-overflow", false);
    let f = d.join("vae/diffusion_pytorch_model.safetensors");
    let mut ts = candle_core::safetensors::load(&f, &candle_core::Device::Cpu).unwrap();
    for name in ["decoder.conv_out.weight", "decoder.conv_out.bias"] {
        let t = (&ts[name] * 1e5).unwrap();
        ts.insert(name.to_string(), t);
    }
    candle_core::safetensors::save(&ts, &f).unwrap();
    d
}

/// precision=f16 on the CPU holds the weights in f16 but computes in f32: a model whose
/// activations overflow f16 restores every frame with no warning (no fallback is needed), as
/// the f32 run does. (On a GPU, where f16 computes in f16, the engine falls back to bf16.)
#[test]
fn f16_weights_on_the_cpu_compute_in_f32_so_activations_past_f16_s_range_do_not_overflow() {
    let d = overflowing_model_dir();
    let run = |precision: &str| {
        let p = launch(&format!(
            "videotestsrc num-buffers=3 pattern=smpte ! video/x-raw,format=RGB,width=64,height=48 ! \
             dpirrestore model=\"{}\" device=cpu precision={precision} steps=1 lq-latent=mode ! identity name=o ! fakesink",
            d.display()
        ));
        let frames = capture(&p, "o", 10);
        let warnings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let w2 = warnings.clone();
        p.bus().unwrap().set_sync_handler(move |_, msg| {
            if let gst::MessageView::Warning(w) = msg.view() {
                w2.lock().unwrap().push(w.error().to_string());
            }
            gst::BusSyncReply::Pass
        });
        run_pipeline(&p).expect("no error: the overflow is recovered");
        let hashes = frame_hashes(&frames.lock().unwrap());
        let warnings = warnings.lock().unwrap().clone();
        (hashes, warnings)
    };
    let (f32_frames, f32_warnings) = run("f32");
    let (f16_frames, f16_warnings) = run("f16");
    assert!(f32_warnings.is_empty(), "{f32_warnings:?}");
    assert!(f16_warnings.is_empty(), "no fallback on the CPU: {f16_warnings:?}");
    assert_eq!((f16_frames.len(), f32_frames.len()), (3, 3));
    std::fs::remove_dir_all(&d).ok();
}

/// The shipped model's directory (`weights/dpir-nano`, what the build embeds).
fn shipped_model_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/dpir-nano")
}

/// The shipped fusion stage, loaded by the element's loader from the model directory, gives
/// PyTorch's result (`weights/train/fusion.py reference`, the training code's `Fusion` with the
/// same f16 weights) on a real photo region, to float precision.
#[test]
fn the_shipped_fusion_stage_matches_pytorch_on_its_reference() {
    use candle_core::{Device, Tensor};
    let dir = shipped_model_dir();
    let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fusion_reference.safetensors");
    let bytes = std::fs::read(&reference).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("model.json")).unwrap()).unwrap();
    let meta = meta.metadata().as_ref().expect("reference metadata");
    assert_eq!(
        manifest["sha256"]["fusion/model.safetensors"].as_str(),
        meta.get("fusion_sha256").map(String::as_str),
        "the reference was made from other fusion weights: run weights/train/fusion.py reference"
    );
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let model = gstdpir::model::dpir::DpirModel::load(
        gstdpir::model::loader::ModelSource::Dir(dir),
        &Device::Cpu,
        Precision::F32,
        &Default::default(),
    )
    .unwrap();
    let fusion = model.fusion.as_ref().expect("the shipped model has a fusion stage");
    let out = fusion.forward(&t["lq"], &t["restored"]).unwrap();
    let err = (&out - &t["output"]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let moved: Tensor = (&t["output"] - &t["lq"]).unwrap().abs().unwrap().mean_all().unwrap();
    let moved = moved.to_scalar::<f32>().unwrap();
    assert!(moved > 1e-3, "the reference output must differ from its input (mean |out - lq| {moved})");
    assert!(err < 1e-4, "max |Rust - PyTorch| {err}");
}

/// A fusion stage whose config does not match its weights stops the element with an error that
/// names the stage, the tensor and the shape it expected.
#[test]
fn a_fusion_config_that_does_not_match_its_weights_names_the_tensor() {
    let d = fixture_model_dir("fusion-shape", false);
    let src = shipped_model_dir().join("fusion");
    std::fs::create_dir_all(d.join("fusion")).unwrap();
    std::fs::copy(src.join("model.safetensors"), d.join("fusion/model.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["channels"] = serde_json::json!(cfg["channels"].as_u64().unwrap() + 8);
    std::fs::write(d.join("fusion/config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    edit_manifest(&d, |m| {
        m["fusion"] = serde_json::json!({"config": "fusion/config.json", "weights": ["fusion/model.safetensors"]})
    });
    assert_model_error(&d, &["fusion", "convs.0.weight", "shape"]);
    std::fs::remove_dir_all(&d).ok();
}

/// `fidelity=-1` (the default) takes the model's own `fidelity` from model.json: a model that
/// names 1 gives the upsampled input back without running, as `fidelity=1` does; one that names
/// a value out of range is refused with an error naming it.
#[test]
fn the_default_fidelity_is_the_model_s_own_and_an_out_of_range_one_is_refused() {
    let d = fixture_model_dir("model-fidelity", false);
    edit_manifest(&d, |m| m["fidelity"] = serde_json::json!(1.0));
    let settings = engine_settings(&d, false);
    assert_eq!(settings.fidelity, -1.0, "the element's default is the model's own");
    let mut e = DpirEngine::load(&settings).unwrap();
    e.configure(&StreamInfo { in_width: 20, in_height: 12, scale: 2, fps: None, depth: 8 }).unwrap();
    let img = frame8(20, 12, |i| ((i * 53) % 256) as u8);
    let out = e.restore(img.clone(), &first_frame("")).unwrap().image;
    assert!(out.planes == lq_planes(&e.upsample(img).unwrap()), "the model's fidelity 1 did not give the input back");
    assert_eq!(e.stats().frames, 0, "the model ran although its own fidelity is 1");
    drop(e); // loaded models are shared while in use: the next load must read the edited manifest
    edit_manifest(&d, |m| m["fidelity"] = serde_json::json!(1.5));
    assert_model_error(&d, &["fidelity", "out of range"]);
    std::fs::remove_dir_all(&d).ok();
}
