//! `pipelines/restore-distributed.sh` on a local Ray with 2 workers, against
//! `pipelines/restore-film.sh` with the same arguments, on real footage with scene cuts: an
//! excerpt of the 1906 film (Theora in Ogg, so chunks start by seeking into inter-coded video)
//! and the film joined with `bikes.mp4` (lossless, with an audio track). Decoded, the outputs
//! must hold the same frames bit for bit, as many, with the same timestamps, and the same audio;
//! a worker killed mid-chunk and an interrupted driver must not change that; bad input must fail
//! with a clear message and leave no OUT behind.
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

/// The Ray virtual environment must be there: without it these tests fail, never skip.
fn check_ray_venv() {
    let venv = std::env::var_os("DPIR_RAY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/gst-dpir-ray-venv"));
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

    // .mp4: the same chunks (kept in the work directory: nothing is rendered again), encoded once
    // to H.264 at the end, decode to exactly what restore-film.sh's .mp4 decodes to. (Both encode in
    // a thread of their own: x264 in dpirrestore's streaming thread gave other bits from run to run.)
    let mut c = distributed(input, &dir.join("dist.mp4"), &[]);
    c.args(["--chunk-frames", JOINED_CHUNK_FRAMES, "--work-dir"]).arg(&work);
    let mp4 = run(c);
    assert!(mp4.status.success(), "restore-distributed.sh .mp4 failed:\n{}", mp4.stderr);
    assert!(mp4.stdout.contains("resuming: 4 chunks already done, 0 to render"), "the .mkv run's chunks are reused");
    restore_film(input, &dir.join("single.mp4"), &[]);
    assert_eq!(video_codec(&dir.join("dist.mp4")), "video/x-h264");
    let single_mp4 = decoded_video(&dir.join("single.mp4"));
    assert_eq!(single_mp4.len(), JOINED_FRAMES);
    assert_same_frames(&decoded_video(&dir.join("dist.mp4")), &single_mp4, "distributed .mp4 vs restore-film.sh .mp4");
    assert!(!work.exists(), "the work directory is removed after a run without --keep-parts");
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
        fails(&r, &format!("restore-distributed.sh {}", input.display()), &expect);
        let mut c = script("restore-film.sh");
        c.arg(&input).arg(&out);
        fails(&run(c), &format!("restore-film.sh {}", input.display()), &expect);
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
