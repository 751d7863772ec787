//! `pipelines/restore-distributed.sh` (the `pipelines/dpir_ray` package) on a local Ray with 2
//! workers and on a Ray cluster of three nodes on this machine (`ray.cluster_utils.Cluster`: a head
//! and two worker nodes with a CPU each), against `pipelines/restore-film.sh` with the same
//! arguments, on real footage with scene cuts: an excerpt of the 1906 film (Theora in Ogg, so
//! chunks start by seeking into inter-coded video) and the film joined with `bikes.mp4` (lossless,
//! with an audio track). Decoded, `.mkv` outputs must hold the same frames bit for bit, as many,
//! with the same timestamps, and the same audio; `.mp4` outputs (H.264 encoded per chunk) every
//! frame with restore-film.sh's timestamps, at its quality, and each chunk's bytes the same when
//! rendered again elsewhere. A worker killed mid-chunk, a node lost mid-chunk and an interrupted
//! driver must not change that; bad input must fail with a clear message and leave no OUT behind.
//! The package's pure parts (planning, resume, the join's timeline) have plain-Python unit tests
//! (`tests/python`), run from here.
//!
//! The scripts run as a user runs them, with this build's plugin (`target/<profile>`) on
//! `GST_PLUGIN_PATH` and Ray from the virtual environment `tests/setup-ray.sh` makes
//! (`$DPIR_RAY_VENV`, default `~/.cache/gst-dpir-ray-venv`; `tests/run` calls it). The tests
//! run one at a time: each starts its own Ray on the machine's cores.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;

const FILM: &str = "Shepard_Calais_1906_FrenchGP.ogv";
const BIKES: &str = "bikes.mp4";

/// One test at a time (each runs Ray and the model on every core); a failed test must not
/// poison the others.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder holding this build's `libgstdpir.so` (`tests/run` builds it before the tests).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf(); // target/<profile>/deps/x
    assert!(
        dir.join("libgstdpir.so").exists(),
        "{} has no libgstdpir.so: run `cargo build` first (tests/run does)",
        dir.display()
    );
    dir
}

fn ray_venv() -> PathBuf {
    std::env::var_os("DPIR_RAY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/gst-dpir-ray-venv"))
}

/// The Ray virtual environment must be there: without it these tests fail, never skip.
fn check_ray_venv() {
    let venv = ray_venv();
    let ok = Command::new(venv.join("bin/python"))
        .args(["-c", "import ray, gi"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "no Ray virtual environment in {}: run `bash tests/setup-ray.sh` (tests/run does)", venv.display());
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gst-dpir-distributed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---- test inputs made from the real media --------------------------------------------------

/// Decoded frames of a real video at `w × h` RGB (letterboxed if the shape differs), as buffers.
fn decode_rgb(file: &str, w: u32, h: u32) -> Vec<gst::Buffer> {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! videoscale ! \
         video/x-raw,format=RGB,width={w},height={h},pixel-aspect-ratio=1/1 ! fakesink name=s sync=false",
        media(file).display()
    ));
    let store = capture(&p, "s", 10_000);
    run_pipeline(&p).expect("decode");
    store.lock().unwrap().iter().map(|(b, _)| b.copy()).collect()
}

enum Container {
    /// Theora in Ogg: inter-coded, a keyframe every 8 frames (chunks start mid-GOP).
    Theora,
    /// FFV1 in Matroska, with a FLAC audio track as long as the video.
    Ffv1WithAudio,
}

/// Write `frames` (RGB `w × h`) at 15 frames/s.
fn write_video(path: &Path, frames: &[gst::Buffer], w: u32, h: u32, container: Container) {
    let n = frames.len();
    let (venc, mux, audio) = match container {
        Container::Theora => {
            ("theoraenc keyframe-auto=false keyframe-freq=8 keyframe-force=8", "oggmux", String::new())
        }
        // 48 kHz: 3200 samples a frame, so the audio lasts exactly as long as the video.
        Container::Ffv1WithAudio => (
            "avenc_ffv1",
            "matroskamux",
            format!(
                "audiotestsrc wave=sine freq=330 volume=0.3 num-buffers={n} samplesperbuffer=3200 ! \
                 audio/x-raw,rate=48000,channels=2 ! flacenc ! queue ! m."
            ),
        ),
    };
    let p = launch(&format!(
        "appsrc name=src format=time caps=video/x-raw,format=RGB,width={w},height={h},framerate=15/1,pixel-aspect-ratio=1/1 ! \
         videoconvert ! {venc} ! queue ! {mux} name=m ! filesink location=\"{}\" {audio}",
        path.display()
    ));
    let src = p.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let frame = gst::ClockTime::from_nseconds(1_000_000_000 / 15);
    p.set_state(gst::State::Playing).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let mut b = f.copy();
        {
            let b = b.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_nseconds(i as u64 * 1_000_000_000 / 15));
            b.set_duration(frame);
        }
        src.push_buffer(b).unwrap();
    }
    src.end_of_stream().unwrap();
    run_pipeline(&p).expect("writing a test input");
}

/// Frames 71–100 of the 1906 film (its camera change is at 81), Theora in Ogg, 214×160.
fn film_excerpt() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let frames = decode_rgb(FILM, 214, 160);
        let path = std::env::temp_dir().join(format!("gst-dpir-distributed-film-{}.ogv", std::process::id()));
        write_video(&path, &frames[71..101], 214, 160, Container::Theora);
        path
    })
}

/// Frames 70–95 of the film (cut at 81) then frames 20–45 of bikes.mp4 (cut at 30), at 108×80,
/// FFV1 in Matroska with audio: cuts at frames 11, 26 (the join) and 36.
fn joined() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let mut frames = decode_rgb(FILM, 108, 80)[70..96].to_vec();
        frames.extend_from_slice(&decode_rgb(BIKES, 108, 80)[20..46]);
        let path = std::env::temp_dir().join(format!("gst-dpir-distributed-joined-{}.mkv", std::process::id()));
        write_video(&path, &frames, 108, 80, Container::Ffv1WithAudio);
        path
    })
}

const JOINED_FRAMES: usize = 52;
const JOINED_CUTS: [u64; 4] = [0, 11, 26, 36];
/// 4 chunks on `joined()`: one per clip (11, 15, 10, 16 frames).
const JOINED_CHUNK_FRAMES: &str = "15";

// ---- running the scripts -------------------------------------------------------------------

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    seconds: f64,
}

fn script(name: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(repo().join("pipelines").join(name))
        .env("GST_PLUGIN_PATH", plugin_dir())
        .env_remove("RAY_ADDRESS")
        .env_remove("GST_LAUNCH_OPTS");
    c
}

fn run(mut cmd: Command) -> Run {
    let t0 = Instant::now();
    let out = cmd.output().expect("running a pipeline script");
    let r = Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    eprintln!("-- {:?}: {} in {:.1} s\n{}{}", cmd, r.status, r.seconds, tail(&r.stdout, 30), tail(&r.stderr, 15));
    r
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("   | {l}\n")).collect()
}

fn restore_film(input: &Path, out: &Path, props: &[&str]) -> Run {
    let mut c = script("restore-film.sh");
    c.arg(input).arg(out).args(props);
    let r = run(c);
    assert!(r.status.success(), "restore-film.sh failed:\n{}", r.stderr);
    r
}

fn distributed(input: &Path, out: &Path, args: &[&str]) -> Command {
    let mut c = script("restore-distributed.sh");
    c.arg(input).arg(out).args(["--workers", "2"]).args(args);
    c
}

/// restore-film.sh's output for `joined()` (OUT.mkv, default properties), made once.
fn joined_reference() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("gst-dpir-distributed-joined-ref-{}.mkv", std::process::id()));
        restore_film(joined(), &out, &[]);
        out
    })
}

/// restore-film.sh's `.mp4` of `joined()` (H.264 at its default constant quality), made once.
fn joined_single_mp4() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("gst-dpir-distributed-joined-ref-{}.mp4", std::process::id()));
        restore_film(joined(), &out, &[]);
        out
    })
}

/// The `.mp4` kind's segment records (`chunk-NNNNN.h264-crf18.json`) in a work directory, by chunk.
fn mp4_records(work: &Path) -> Vec<serde_json::Value> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(work)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().ends_with(".h264-crf18.json"))
        .collect();
    names.sort();
    names.iter().map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()).collect()
}

/// restore-distributed.sh's `.mp4` of `joined()` on the local Ray (4 chunks, parts kept), made once:
/// (OUT, the chunks' records).
fn joined_local_mp4() -> &'static (PathBuf, Vec<serde_json::Value>) {
    static P: OnceLock<(PathBuf, Vec<serde_json::Value>)> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gst-dpir-distributed-joined-mp4-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (out, work) = (dir.join("dist.mp4"), dir.join("parts"));
        let mut c = distributed(joined(), &out, &["--chunk-frames", JOINED_CHUNK_FRAMES, "--keep-parts"]);
        c.arg("--work-dir").arg(&work);
        let r = run(c);
        assert!(r.status.success(), "restore-distributed.sh .mp4 failed:\n{}", r.stderr);
        let records = mp4_records(&work);
        assert_eq!(records.len(), 4, "a record per chunk");
        (out, records)
    })
}

/// A spawned driver whose stdout lines arrive on a channel (and are kept).
struct Live {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Live {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning the driver");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { child, lines: rx, seen: Vec::new() }
    }

    /// The next stdout line matching `pred` (within `timeout`).
    fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    eprintln!("   | {l}");
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => {
                    panic!("no such line from the driver within {timeout:?}; it printed:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// Wait for the driver to exit; returns its status, all of stdout and stderr.
    fn finish(mut self) -> (ExitStatus, String, String) {
        let status = self.child.wait().unwrap();
        for l in self.lines.iter() {
            eprintln!("   | {l}");
            self.seen.push(l);
        }
        let mut err = String::new();
        use std::io::Read;
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        eprintln!("{}", tail(&err, 15));
        (status, self.seen.join("\n"), err)
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill -{sig} {pid} failed");
}

// ---- decoding and comparing outputs ---------------------------------------------------------

/// A decoded frame: pts, duration, RGB bytes.
type Frame = (Option<gst::ClockTime>, Option<gst::ClockTime>, Vec<u8>);

fn decoded_video(path: &Path) -> Vec<Frame> {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! video/x-raw ! videoconvert ! video/x-raw,format=RGB ! fakesink name=s sync=false",
        path.display()
    ));
    let store = capture(&p, "s", 100_000);
    run_pipeline(&p).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display()));
    let v = store.lock().unwrap();
    v.iter().map(|(b, caps)| (b.pts(), b.duration(), pixels(b, caps))).collect()
}

/// The pixel rows of an RGB frame, without the stride's padding bytes (their content is not
/// defined: 214 × 3 bytes are padded to 644).
fn pixels(b: &gst::Buffer, caps: &gst::Caps) -> Vec<u8> {
    let s = caps.structure(0).unwrap();
    let (w, h) = (s.get::<i32>("width").unwrap() as usize, s.get::<i32>("height").unwrap() as usize);
    let (row, stride) = (w * 3, (w * 3).next_multiple_of(4));
    let map = b.map_readable().unwrap();
    assert_eq!(map.len(), stride * h, "an RGB frame of {w}x{h} with the default stride");
    map.chunks(stride).flat_map(|r| r[..row].to_vec()).collect()
}

/// Decoded audio: first timestamp and the samples (S16LE).
fn decoded_audio(path: &Path) -> (Option<gst::ClockTime>, Vec<u8>) {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! audio/x-raw ! audioconvert ! audio/x-raw,format=S16LE ! fakesink name=s sync=false",
        path.display()
    ));
    let store = capture(&p, "s", 100_000);
    run_pipeline(&p).unwrap_or_else(|e| panic!("decoding the audio of {}: {e}", path.display()));
    let v = store.lock().unwrap();
    let first = v.first().and_then(|(b, _)| b.pts());
    (first, v.iter().flat_map(|(b, _)| b.map_readable().unwrap().to_vec()).collect())
}

fn assert_same_frames(got: &[Frame], want: &[Frame], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: frame count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!((g.0, g.1), (w.0, w.1), "{what}: timestamps of frame {i}");
        assert!(g.2 == w.2, "{what}: frame {i} differs");
    }
}

/// The source's video caps name in a file (`video/x-ffv`, `video/x-h264`…), through discoverer.
fn video_codec(path: &Path) -> String {
    let out = Command::new("gst-discoverer-1.0").arg("-v").arg(path).output().expect("gst-discoverer-1.0");
    let text = String::from_utf8_lossy(&out.stdout);
    // "    video #1: video/x-ffv, ffvversion=(int)1, …"
    text.lines()
        .find_map(|l| l.trim().strip_prefix("video #").and_then(|r| r.split_once(": ")))
        .map(|(_, caps)| caps.split(',').next().unwrap().trim().to_string())
        .unwrap_or_default()
}

fn plan_of(work: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(work.join("plan.json")).expect("plan.json")).unwrap()
}

fn count_lines(out: &str, pat: &str) -> usize {
    out.lines().filter(|l| l.contains(pat)).count()
}

/// The running time (when a player shows it) of every decoded video frame of a file.
fn running_times(path: &Path) -> Vec<gst::ClockTime> {
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! video/x-raw ! appsink name=s sync=false",
        path.display()
    ));
    let sink = p.by_name("s").unwrap().downcast::<gst_app::AppSink>().unwrap();
    p.set_state(gst::State::Playing).unwrap();
    let mut times = Vec::new();
    while let Ok(sample) = sink.pull_sample() {
        let seg = sample.segment().unwrap().downcast_ref::<gst::ClockTime>().unwrap().clone();
        times.push(seg.to_running_time(sample.buffer().unwrap().pts().unwrap()).unwrap());
    }
    let failed = p.bus().unwrap().pop_filtered(&[gst::MessageType::Error]);
    p.set_state(gst::State::Null).unwrap();
    assert!(failed.is_none(), "decoding {}: {failed:?}", path.display());
    times
}

/// PSNR (dB) of each frame of `got` against `want` (RGB pixels), as (min, mean).
fn psnr(got: &[Frame], want: &[Frame]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "frame count");
    let per_frame: Vec<f64> = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            assert_eq!(g.2.len(), w.2.len(), "frame size");
            let se: f64 = g.2.iter().zip(&w.2).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
            let mse = se / g.2.len() as f64;
            if mse == 0.0 { 99.0 } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
        })
        .collect();
    let min = per_frame.iter().cloned().fold(f64::INFINITY, f64::min);
    (min, per_frame.iter().sum::<f64>() / per_frame.len() as f64)
}

/// The node (id prefix) each finished chunk ran on, from the driver's lines
/// `chunk 2/4 done: … (pid 123 on HOST, node 1a2b3c4d)`: (chunk number, node).
fn chunk_nodes(out: &str) -> Vec<(usize, String)> {
    out.lines()
        .filter(|l| l.starts_with("chunk ") && l.contains(" done: frames "))
        .map(|l| {
            let n = l["chunk ".len()..].split('/').next().unwrap().parse().unwrap();
            let node = l.rsplit("node ").next().unwrap().trim_end_matches(')').to_string();
            (n, node)
        })
        .collect()
}

/// From the driver's line `model loads: L (W workers…`: (L, W).
fn model_loads(out: &str) -> (usize, usize) {
    let l = out.lines().find(|l| l.starts_with("model loads: ")).expect("a `model loads:` line");
    let mut words = l["model loads: ".len()..].split([' ', '(']);
    let loads = words.next().unwrap().parse().unwrap();
    let workers = words.find(|w| !w.is_empty()).unwrap().parse().unwrap();
    (loads, workers)
}

/// No OUT, and no temporary file of it, in `dir`.
fn assert_no_output(dir: &Path, out_name: &str) {
    assert!(!dir.join(out_name).exists(), "{out_name} was written");
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(&format!(".{out_name}.part")), "a half-written {n} was left in {}", dir.display());
        }
    }
}

// ---- tests ---------------------------------------------------------------------------------

#[test]
fn chunks_of_the_1906_film_sought_in_theora_join_into_the_frames_of_one_run() {
    let _g = serial();
    check_ray_venv();
    let dir = scratch("film");
    let input = film_excerpt();
    // A 20-frame shot after the cut: clip-max-frames=10 splits it, in both scripts alike.
    let props = ["clip-max-frames=10"];
    let single = restore_film(input, &dir.join("single.mkv"), &props);
    let work = dir.join("parts");
    let mut c = distributed(input, &dir.join("dist.mkv"), &props);
    c.args(["--chunk-frames", "10", "--keep-parts", "--work-dir"]).arg(&work);
    let dist = run(c);
    assert!(dist.status.success(), "restore-distributed.sh failed:\n{}", dist.stderr);
    eprintln!(
        "wall time, 30 frames of 214x160: restore-film.sh {:.1} s, restore-distributed.sh (2 workers) {:.1} s",
        single.seconds, dist.seconds
    );

    // Scene-aligned: the camera change (frame 10 of the excerpt) and the clip-max-frames split
    // (20) are where chunks start.
    let plan = plan_of(&work);
    let clips: Vec<(u64, String)> = plan["clips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["frame"].as_u64().unwrap(), c["reason"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(clips, [(0, "start".into()), (10, "scene-cut".into()), (20, "max-frames".into())]);
    let starts: Vec<u64> = plan["chunks"].as_array().unwrap().iter().map(|c| c["first"].as_u64().unwrap()).collect();
    assert_eq!(starts, [0, 10, 20]);

    let want = decoded_video(&dir.join("single.mkv"));
    assert_eq!(want.len(), 30);
    assert_same_frames(&decoded_video(&dir.join("dist.mkv")), &want, "distributed vs restore-film.sh");
    assert_eq!(video_codec(&dir.join("dist.mkv")), "video/x-ffv");
    // Progress: a line per finished chunk and the whole film's bar at the end.
    assert_eq!(count_lines(&dist.stdout, " done: frames "), 3, "one line per finished chunk");
    assert!(dist.stdout.contains("30/30 frames 100.0%"), "the film's progress bar");
    // Stateful workers: each loads the model once, whatever the number of chunks.
    assert_eq!(model_loads(&dist.stdout), (2, 2), "one model load per worker, not per chunk");
    assert_eq!(chunk_nodes(&dist.stdout).len(), 3, "each finished chunk names its node");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_film_joined_with_bikes_keeps_its_audio_and_equals_one_run_in_mkv_and_mp4() {
    let _g = serial();
    check_ray_venv();
    let dir = scratch("joined");
    let input = joined();
    let work = dir.join("parts");
    let mut c = distributed(input, &dir.join("dist.mkv"), &[]);
    c.args(["--chunk-frames", JOINED_CHUNK_FRAMES, "--keep-parts", "--work-dir"]).arg(&work);
    let dist = run(c);
    assert!(dist.status.success(), "restore-distributed.sh failed:\n{}", dist.stderr);
    let t0 = Instant::now();
    let reference = joined_reference();
    eprintln!(
        "wall time, 52 frames of 108x80: restore-film.sh {:.1} s (or less: made once), restore-distributed.sh {:.1} s",
        t0.elapsed().as_secs_f64(),
        dist.seconds
    );

    // Every scene cut, the join included, starts a chunk.
    let plan = plan_of(&work);
    let cuts: Vec<u64> = plan["clips"].as_array().unwrap().iter().map(|c| c["frame"].as_u64().unwrap()).collect();
    assert_eq!(cuts, JOINED_CUTS);
    let starts: Vec<u64> = plan["chunks"].as_array().unwrap().iter().map(|c| c["first"].as_u64().unwrap()).collect();
    assert_eq!(starts, JOINED_CUTS);

    let want = decoded_video(reference);
    assert_eq!(want.len(), JOINED_FRAMES);
    assert_same_frames(&decoded_video(&dir.join("dist.mkv")), &want, "distributed .mkv vs restore-film.sh .mkv");
    let audio_in = decoded_audio(input);
    assert!(audio_in.1.len() > 100_000, "the input has audio");
    assert_eq!(decoded_audio(&dir.join("dist.mkv")), audio_in, "the source's audio, losslessly, same start");
    assert_eq!(decoded_audio(reference), audio_in);

    // .mp4 after the .mkv, in the same work directory: nothing is rendered again; the film is
    // encoded once from the lossless segments with restore-film.sh's encoder chain, so it decodes
    // to exactly what restore-film.sh's .mp4 decodes to.
    let mut c = distributed(input, &dir.join("from-mkv.mp4"), &[]);
    c.args(["--chunk-frames", JOINED_CHUNK_FRAMES, "--work-dir"]).arg(&work);
    let mp4 = run(c);
    assert!(mp4.status.success(), "restore-distributed.sh .mp4 after .mkv failed:\n{}", mp4.stderr);
    assert!(mp4.stdout.contains("resuming: 4 chunks already done, 0 to render"), "the .mkv run's chunks are reused");
    assert_eq!(video_codec(&dir.join("from-mkv.mp4")), "video/x-h264");
    assert_same_frames(
        &decoded_video(&dir.join("from-mkv.mp4")),
        &decoded_video(joined_single_mp4()),
        ".mp4 from the lossless segments vs restore-film.sh .mp4",
    );
    assert!(!work.exists(), "the work directory is removed after a run without --keep-parts");

    // .mp4 rendered as such: H.264 segments, each chunk encoded by its worker at constant quality and starting with
    // a key frame, joined without decoding: every frame with restore-film.sh's timestamps, at its
    // quality (both x264 at the same CRF), and the source's audio.
    let (dist_mp4, records) = joined_local_mp4();
    assert_eq!(video_codec(dist_mp4), "video/x-h264");
    let single_mp4 = decoded_video(joined_single_mp4());
    let got = decoded_video(dist_mp4);
    assert_eq!(got.len(), JOINED_FRAMES);
    // Every frame at restore-film.sh's .mp4 running time, and so at the source's: MP4's time scale
    // (from the frame rate) moves some frames by up to a third of a millisecond against Matroska's
    // millisecond times, in both alike.
    let dist_times = running_times(dist_mp4);
    assert_eq!(dist_times, running_times(joined_single_mp4()), "every frame at restore-film.sh's .mp4 time");
    let source_times = running_times(input);
    assert_eq!(dist_times.len(), source_times.len());
    for (i, (a, b)) in dist_times.iter().zip(&source_times).enumerate() {
        assert!(a.nseconds().abs_diff(b.nseconds()) <= 1_000_000, "frame {i} at {a}, in the source at {b}");
    }
    let (dist_q, single_q) = (psnr(&got, &want), psnr(&single_mp4, &want));
    eprintln!(
        "PSNR against the lossless single run (min/mean dB): restore-distributed.sh .mp4 {:.2}/{:.2}, \
         restore-film.sh .mp4 {:.2}/{:.2}",
        dist_q.0, dist_q.1, single_q.0, single_q.1
    );
    assert!(
        dist_q.0 >= single_q.0 - 0.5 && dist_q.1 >= single_q.1 - 0.5,
        "the chunked .mp4 ({dist_q:?}) is more than 0.5 dB below restore-film.sh's ({single_q:?})"
    );
    let audio = decoded_audio(dist_mp4);
    assert!(!audio.1.is_empty(), "the .mp4 keeps the audio");
    assert_eq!(audio, decoded_audio(joined_single_mp4()), "the audio of restore-film.sh's .mp4, same start");
    let firsts: Vec<u64> = records.iter().map(|r| r["first"].as_u64().unwrap()).collect();
    assert_eq!(firsts, JOINED_CUTS, "one H.264 segment per chunk");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_worker_killed_mid_chunk_is_retried_and_the_frames_are_unchanged() {
    let _g = serial();
    check_ray_venv();
    let dir = scratch("kill");
    let want = decoded_video(joined_reference());
    let out = dir.join("dist.mkv");
    // Two chunks of 26 frames (clips of 11 + 15 and 10 + 16 frames): several seconds each.
    let mut live = Live::spawn(distributed(joined(), &out, &["--chunk-frames", "26"]));
    let line = live.wait_for(Duration::from_secs(120), |l| l.starts_with("chunk 2/2: started"));
    let pid: u32 = line.rsplit("(pid ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
    // Its model is loaded and it is restoring frames by now.
    std::thread::sleep(Duration::from_millis(800));
    signal(pid, "KILL");
    let (status, stdout, stderr) = live.finish();
    assert!(status.success(), "the run did not survive a killed worker:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let restart = lines.iter().position(|l| l.starts_with("chunk 2/2: restarted (attempt 2"));
    let done = lines.iter().position(|l| l.starts_with("chunk 2/2 done: "));
    assert!(
        matches!((restart, done), (Some(r), Some(d)) if r < d),
        "chunk 2 was not rendered again after its worker (pid {pid}) was killed mid-chunk"
    );
    assert_eq!(count_lines(&stdout, " done: frames "), 2);
    // The lost worker was replaced: one model load per worker that started, never one per chunk.
    let (loads, workers) = model_loads(&stdout);
    assert!(loads == workers && (2..=3).contains(&workers), "{loads} model loads for {workers} workers");
    assert_same_frames(&decoded_video(&out), &want, "after a killed worker");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_interrupted_driver_resumes_rendering_only_missing_or_corrupt_chunks() {
    let _g = serial();
    check_ray_venv();
    let dir = scratch("resume");
    let want = decoded_video(joined_reference());
    let out = dir.join("dist.mkv");
    let work = dir.join("parts");
    let cmd = || {
        let mut c = distributed(joined(), &out, &["--chunk-frames", JOINED_CHUNK_FRAMES]);
        c.arg("--work-dir").arg(&work);
        c
    };
    // Interrupt (SIGINT, as Ctrl-C) once two of the four chunks are done.
    let mut live = Live::spawn(cmd());
    live.wait_for(Duration::from_secs(120), |l| l.contains(" done: frames "));
    live.wait_for(Duration::from_secs(120), |l| l.contains(" done: frames "));
    signal(live.child.id(), "INT");
    let t0 = Instant::now();
    let (status, _, stderr) = live.finish();
    eprintln!("the driver stopped {:.1} s after SIGINT", t0.elapsed().as_secs_f64());
    assert!(!status.success(), "an interrupted run must not report success");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_no_output(&dir, "dist.mkv");
    let mut kept: Vec<PathBuf> = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json") && p.file_name().unwrap() != "plan.json")
        .collect();
    kept.sort();
    let k = kept.len();
    assert!((2..4).contains(&k), "{k} of 4 chunks recorded at the interruption");

    // Corrupt one kept segment: it must be found out (checksum) and rendered again.
    let seg = kept[0].with_extension("mkv");
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&seg, bytes).unwrap();

    let rerun = run(cmd());
    assert!(rerun.status.success(), "the re-run failed:\n{}", rerun.stderr);
    assert!(rerun.stdout.contains("segment corrupt (checksum), rendering it again"));
    assert!(rerun.stdout.contains(&format!("resuming: {} chunks already done, {} to render", k - 1, 4 - (k - 1))));
    assert_eq!(
        count_lines(&rerun.stdout, " done: frames "),
        4 - (k - 1),
        "only the missing and the corrupt chunks are rendered"
    );
    assert_same_frames(&decoded_video(&out), &want, "resumed");
    assert!(!work.exists(), "the work directory is removed after a run without --keep-parts");
    std::fs::remove_dir_all(&dir).ok();
}

/// A tmpfs mounted on `dir` for the test's lifetime (root: `tests/run` runs as root).
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, opts: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir).status().unwrap().success();
        assert!(ok, "mount -t tmpfs -o {opts} {} failed (the test needs root)", dir.display());
        Self(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn bad_input_fails_clearly_and_leaves_no_output() {
    let _g = serial();
    check_ray_venv();
    let dir = scratch("bad");
    // A tiny real input: 6 frames of the film, lossless.
    let tiny = dir.join("tiny.mkv");
    write_video(&tiny, &decode_rgb(FILM, 108, 80)[..6], 108, 80, Container::Ffv1WithAudio);
    let junk = dir.join("junk.mkv");
    std::fs::write(&junk, (0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect::<Vec<_>>())
        .unwrap();
    let audio_only = dir.join("audio.mkv");
    let p = launch(&format!(
        "audiotestsrc num-buffers=20 ! flacenc ! matroskamux ! filesink location=\"{}\"",
        audio_only.display()
    ));
    run_pipeline(&p).unwrap();

    let fails = |r: &Run, what: &str, expect: &str| {
        assert!(!r.status.success(), "{what}: succeeded");
        assert!(r.stderr.contains(expect), "{what}: the error does not say {expect:?}:\n{}", r.stderr);
    };
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("o.mkv");
    for (input, expect) in [
        (dir.join("missing.mkv"), "cannot read the input file"),
        (junk.clone(), "is not a media file GStreamer can read"),
        (audio_only.clone(), "has no video stream"),
    ] {
        let r = run(distributed(&input, &out, &[]));
        fails(&r, &format!("restore-distributed.sh {}", input.display()), expect);
        let mut c = script("restore-film.sh");
        c.arg(&input).arg(&out);
        fails(&run(c), &format!("restore-film.sh {}", input.display()), expect);
        assert_no_output(&out_dir, "o.mkv");
        assert!(!out_dir.join("o.mkv.parts").exists(), "an empty work directory was left");
    }

    // RAY_ADDRESS naming a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = distributed(&tiny, &out, &[]);
    c.env("RAY_ADDRESS", format!("127.0.0.1:{port}"));
    let r = run(c);
    fails(&r, "unreachable RAY_ADDRESS", &format!("cannot reach the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}"));
    assert!(r.seconds < 30.0, "an unreachable cluster must be reported at once, not after {:.0} s", r.seconds);
    assert_no_output(&out_dir, "o.mkv");

    // A read-only output directory.
    let ro = Mount::tmpfs(&dir.join("ro"), "ro,size=1m");
    let r = run(distributed(&tiny, &ro.0.join("o.mkv"), &[]));
    fails(&r, "read-only output directory", "Read-only file system");
    let mut c = script("restore-film.sh");
    c.arg(&tiny).arg(ro.0.join("o.mkv"));
    fails(&run(c), "restore-film.sh, read-only output directory", "cannot write in the output directory");
    assert_no_output(&ro.0, "o.mkv");

    // A full disk: a 16 KiB tmpfs holds the plan but not a segment (or, for restore-film.sh, the
    // film).
    let full = Mount::tmpfs(&dir.join("full"), "size=16k");
    let r = run(distributed(&tiny, &full.0.join("o.mkv"), &["--chunk-frames", "3"]));
    fails(&r, "full disk", "No space left");
    assert_no_output(&full.0, "o.mkv");
    let mut c = script("restore-film.sh");
    c.arg(&tiny).arg(full.0.join("o.mkv"));
    let r = run(c);
    assert!(!r.status.success(), "restore-film.sh on a full disk succeeded");
    assert!(format!("{}{}", r.stdout, r.stderr).contains("No space left"), "{}", r.stderr);
    assert_no_output(&full.0, "o.mkv");
    drop((ro, full));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn restore_film_sh_mkv_holds_exactly_the_element_s_frames_and_mp4_is_h264() {
    let _g = serial();
    let dir = scratch("containers");
    let tiny = dir.join("tiny.mkv");
    write_video(&tiny, &decode_rgb(FILM, 108, 80)[100..106], 108, 80, Container::Ffv1WithAudio);
    restore_film(&tiny, &dir.join("o.mkv"), &["seed=7"]);
    restore_film(&tiny, &dir.join("o.mp4"), &["seed=7"]);
    // The element's own output, in this process (the statically registered plugin).
    let p = launch(&format!(
        "filesrc location=\"{}\" ! decodebin ! video/x-raw ! queue ! videoconvert ! dpirrestore seed=7 ! \
         videoconvert ! video/x-raw,format=RGB ! fakesink name=s sync=false",
        tiny.display()
    ));
    let store = capture(&p, "s", 100);
    run_pipeline(&p).unwrap();
    let element: Vec<Vec<u8>> = store.lock().unwrap().iter().map(|(b, caps)| pixels(b, caps)).collect();
    let mkv = decoded_video(&dir.join("o.mkv"));
    assert_eq!(mkv.len(), 6);
    assert!(mkv.iter().map(|f| &f.2).eq(element.iter()), ".mkv is not lossless");
    assert_eq!(video_codec(&dir.join("o.mkv")), "video/x-ffv");
    assert_eq!(video_codec(&dir.join("o.mp4")), "video/x-h264");
    assert_eq!(decoded_video(&dir.join("o.mp4")).len(), 6);
    assert!(!decoded_audio(&dir.join("o.mp4")).1.is_empty(), "the .mp4 keeps the audio");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn planning_resume_and_the_join_timeline_pass_their_plain_python_unit_tests() {
    // Debian's python3 (no Ray, no need of GStreamer): the pure modules must import there.
    let python = std::env::var_os("DPIR_PYTHON").unwrap_or_else(|| "/usr/bin/python3".into());
    let out = Command::new(&python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(repo().join("tests/python"))
        .arg("-t")
        .arg(repo().join("tests/python"))
        .env("PYTHONPATH", repo().join("pipelines"))
        .output()
        .expect("running python3 -m unittest");
    let text = String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "the plain-Python unit tests failed:\n{text}");
    assert!(text.contains("\nOK"), "no unittest summary:\n{text}");
}

/// A Ray cluster of a head (no CPU for tasks) and worker nodes with 1 CPU each, all on this
/// machine (`tests/python/ray_test_cluster.py`); shut down when dropped.
struct TestCluster {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    address: String,
    nodes: Vec<String>,
}

impl TestCluster {
    fn start(worker_nodes: usize) -> Self {
        let mut child = Command::new(ray_venv().join("bin/python"))
            .arg(repo().join("tests/python/ray_test_cluster.py"))
            .args(["--nodes", &worker_nodes.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the test cluster");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stdin = child.stdin.take();
        let mut c = Self { child, stdin, lines: rx, address: String::new(), nodes: Vec::new() };
        loop {
            let l = c.next_line();
            if let Some(a) = l.strip_prefix("ADDRESS ") {
                c.address = a.to_string();
            } else if let Some(n) = l.strip_prefix("NODE ") {
                c.nodes.push(n.to_string());
            } else if l == "READY" {
                break;
            }
        }
        assert_eq!(c.nodes.len(), worker_nodes);
        c
    }

    fn next_line(&self) -> String {
        let l = self.lines.recv_timeout(Duration::from_secs(120)).expect("the test cluster stopped answering");
        eprintln!("   cluster | {l}");
        l
    }

    fn command(&mut self, cmd: &str, answer: &str) -> String {
        use std::io::Write;
        writeln!(self.stdin.as_mut().unwrap(), "{cmd}").unwrap();
        loop {
            let l = self.next_line();
            assert!(!l.starts_with("ERROR"), "{cmd}: {l}");
            if let Some(rest) = l.strip_prefix(answer) {
                return rest.trim().to_string();
            }
        }
    }

    /// The worker node whose id starts with `prefix`.
    fn node(&self, prefix: &str) -> String {
        self.nodes.iter().find(|n| n.starts_with(prefix)).unwrap_or_else(|| panic!("no node {prefix}")).clone()
    }

    fn remove(&mut self, node: &str) {
        self.command(&format!("remove {node}"), "REMOVED");
        self.nodes.retain(|n| n != node);
    }

    fn add(&mut self) -> String {
        let n = self.command("add", "NODE ");
        self.nodes.push(n.clone());
        n
    }

    fn driver(&self, mut cmd: Command) -> Command {
        cmd.env("RAY_ADDRESS", &self.address);
        cmd
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        drop(self.stdin.take()); // end of input: the helper shuts the cluster down
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn on_a_three_node_cluster_chunks_use_both_workers_a_lost_node_s_chunk_reruns_elsewhere_and_a_stopped_run_resumes() {
    let _g = serial();
    check_ray_venv();
    let dir = scratch("cluster");
    let want = decoded_video(joined_reference());
    let audio_in = decoded_audio(joined());
    let (local_mp4, local_records) = joined_local_mp4();
    let mut cluster = TestCluster::start(2);
    let chunks = ["--chunk-frames", JOINED_CHUNK_FRAMES];

    // 1. Four chunks on two worker nodes: both render, each loading the model once; the .mkv is
    // the single run's, frame for frame, with its audio.
    let out = dir.join("cluster.mkv");
    let r = run(cluster.driver(distributed(joined(), &out, &chunks)));
    assert!(r.status.success(), "restore-distributed.sh on the cluster failed:\n{}", r.stderr);
    assert!(r.stdout.contains("Ray cluster at "), "the driver joined the cluster");
    let ran_on: std::collections::BTreeSet<String> = chunk_nodes(&r.stdout).into_iter().map(|(_, n)| n).collect();
    let workers: std::collections::BTreeSet<String> = cluster.nodes.iter().map(|n| n[..8].to_string()).collect();
    assert_eq!(ran_on, workers, "chunks ran on both worker nodes (and on no other)");
    assert_eq!(model_loads(&r.stdout), (2, 2), "one model load per worker");
    assert_same_frames(&decoded_video(&out), &want, "cluster .mkv vs restore-film.sh .mkv");
    assert_eq!(decoded_audio(&out), audio_in, "the source's audio");

    // 2. .mp4, and a worker node removed while it renders a chunk: that chunk is rendered again on
    // the other node; OUT has every frame, and each chunk's H.264 bytes are those the local run wrote.
    let out = dir.join("cluster.mp4");
    let work = dir.join("parts-mp4");
    let mut c = distributed(joined(), &out, &chunks);
    c.args(["--keep-parts", "--work-dir"]).arg(&work);
    let mut live = Live::spawn(cluster.driver(c));
    let line = live.wait_for(Duration::from_secs(120), |l| l.starts_with("chunk ") && l.contains(": started,"));
    let chunk: usize = line["chunk ".len()..].split('/').next().unwrap().parse().unwrap();
    let lost = cluster.node(line.rsplit("node ").next().unwrap().trim_end_matches(')'));
    cluster.remove(&lost);
    let (status, stdout, stderr) = live.finish();
    assert!(status.success(), "the run did not survive a lost node:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let restart = lines.iter().position(|l| l.starts_with(&format!("chunk {chunk}/4: restarted (attempt 2")));
    let done = lines.iter().position(|l| l.starts_with(&format!("chunk {chunk}/4 done: ")));
    assert!(
        matches!((restart, done), (Some(r), Some(d)) if r < d),
        "chunk {chunk} was not rendered again after its node {lost} was removed"
    );
    let nodes = chunk_nodes(&stdout);
    assert_eq!(nodes.len(), 4);
    let survivor = cluster.nodes[0][..8].to_string();
    assert!(
        nodes.iter().any(|(n, node)| *n == chunk && *node == survivor),
        "chunk {chunk} was finished on the other node"
    );
    let records = mp4_records(&work);
    let sums = |rs: &[serde_json::Value]| rs.iter().map(|r| r["stream_sha256"].clone()).collect::<Vec<_>>();
    assert_eq!(sums(&records), sums(local_records), "each chunk's H.264 bytes are the same on another node");
    assert_same_frames(&decoded_video(&out), &decoded_video(local_mp4), "cluster .mp4 vs local .mp4");

    // 3. A node joins again; a run interrupted after its first finished chunk resumes from there.
    cluster.add();
    let out = dir.join("resumed.mkv");
    let work = dir.join("parts-resume");
    let cmd = || {
        let mut c = cluster.driver(distributed(joined(), &out, &chunks));
        c.arg("--work-dir").arg(&work);
        c
    };
    let mut live = Live::spawn(cmd());
    live.wait_for(Duration::from_secs(120), |l| l.contains(" done: frames "));
    signal(live.child.id(), "INT");
    let (status, _, stderr) = live.finish();
    assert!(!status.success() && stderr.contains("interrupted"), "{stderr}");
    assert_no_output(&dir, "resumed.mkv");
    let rerun = run(cmd());
    assert!(rerun.status.success(), "the re-run failed:\n{}", rerun.stderr);
    let resumed = rerun.stdout.lines().find(|l| l.contains("resuming: ")).expect("a resuming line");
    let kept: usize = resumed.split("resuming: ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!((1..4).contains(&kept), "{resumed}");
    assert_eq!(count_lines(&rerun.stdout, " done: frames "), 4 - kept, "only the missing chunks are rendered");
    assert_same_frames(&decoded_video(&out), &want, "resumed on the cluster");
    drop(cluster);
    std::fs::remove_dir_all(&dir).ok();
}
