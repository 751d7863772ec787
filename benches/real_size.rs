//! DPIR at its real size on this machine's CPU: the Solvay 1927 still (1024×705, ×1) and 4 frames
//! of the 1906 film at ×4 (856×640), through the element (`gst-launch-1.0`, `model=` a real-size
//! directory with random weights), `steps=2`; per stage its time and peak resident memory, the
//! model's load time, the process's peak, and the 28-step extrapolation per frame; then one
//! transformer step at 4096 + 333 tokens against diffusers `SD3Transformer2DModel` on the same
//! weights (f32, 2 threads, one after the other: `benches/compare_pytorch.sh --real`).
//!
//!   cargo build --release && cargo bench --bench real_size
//!
//! Environment: `DPIR_REAL_SIZE_DIR` (the model directory; default `~/.cache/gst-dpir-real-size`,
//! made when missing: about 18 GB of disk, a few minutes), `DPIR_REAL_PRECISION` (default f16:
//! the published files' half precision), `DPIR_REAL_RUNS` (any of `still,film,pytorch`, the
//! default), `DPIR_REAL_SKIP_PYTORCH=1`, `DPIR_MEDIA` (default
//! `../shared/media`), `DPIR_FIXTURES` (the T5 tokenizer; default `../shared/fixtures`). Run it
//! on a quiet machine: one real-size process at a time (two would not fit in 24 GB).

#[path = "real_size/weights.rs"]
mod weights;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shared(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| repo().join("..").join("shared").join(default))
}

/// The plugin built beside this bench (`cargo build --release` puts it in target/release).
fn plugin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(|d| d.parent()).context("bench path")?.to_path_buf();
    if !dir.join("libgstdpir.so").exists() {
        bail!("{} has no libgstdpir.so: run `cargo build --release` first", dir.display());
    }
    Ok(dir)
}

fn ensure_model(dir: &Path) -> Result<()> {
    if dir.join("model.json").exists() {
        return Ok(());
    }
    let readme = std::fs::read_to_string(repo().join("weights/README.md"))?;
    let template = weights::readme_template(&readme)?;
    let tokenizer = shared("DPIR_FIXTURES", "fixtures").join("t5_encoder/tokenizer/tokenizer.json");
    println!("== writing the real-size model directory {} (random weights, seed 2026)", dir.display());
    let t0 = std::time::Instant::now();
    let tmp = dir.with_extension("part");
    let _ = std::fs::remove_dir_all(&tmp);
    let w = weights::write_model_dir(&tmp, weights::Layers::full(), 2026, &template, &tokenizer)?;
    std::fs::rename(&tmp, dir)?;
    for (name, params, bytes) in &w.components {
        println!("   {name:<44} {:>6.3} G parameters {:>7.2} GB", *params as f64 / 1e9, *bytes as f64 / 1e9);
    }
    println!(
        "   {:<44} {:>6.3} G parameters {:>7.2} GB on disk, written in {:.0} s",
        "all",
        w.params() as f64 / 1e9,
        w.bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What one gst-launch run reported.
#[derive(Debug, Default)]
struct Report {
    wall_s: f64,
    max_rss_kib: u64,
    load_s: Option<f64>,
    /// Resident memory right after the model loaded.
    loaded_rss: Option<String>,
    estimate: Option<String>,
    /// Per frame: the element's timing line (`frame N: …`).
    frames: Vec<String>,
}

fn run(name: &str, pipeline: &str, env: &[(&str, String)]) -> Result<Report> {
    println!("== {name}: gst-launch-1.0 {pipeline}");
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-v").arg("gst-launch-1.0").arg("-q").args(shell_words(pipeline));
    cmd.env("GST_PLUGIN_PATH", plugin_dir()?)
        .env("GST_DEBUG", "dpirrestore:5")
        .env("GST_DEBUG_NO_COLOR", "1")
        .env("DPIR_PROFILE_MEMORY", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = std::time::Instant::now();
    let out = cmd.output()?;
    let wall_s = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = err.lines().filter(|l| !l.contains(" DEBUG ") && !l.contains(" LOG ")).collect();
        bail!("{name} failed ({}): {}", out.status, tail[tail.len().saturating_sub(15)..].join("\n"));
    }
    let mut r = Report { wall_s, ..Default::default() };
    for line in err.lines() {
        if let Some(i) = line.find("engine ready in ") {
            r.load_s = line[i + 16..].split_whitespace().next().and_then(|v| v.parse().ok());
            r.loaded_rss = line.split("process resident ").nth(1).and_then(|v| v.split(':').next()).map(str::to_string);
        }
        if let Some(i) = line.find("memory for ") {
            r.estimate = Some(line[i..].to_string());
        }
        if let Some(i) = line.find(" frame ")
            && line[i..].contains(": upsample")
        {
            r.frames.push(line[i + 1..].to_string());
        }
        if let Some(v) = line.trim().strip_prefix("Maximum resident set size (kbytes): ") {
            r.max_rss_kib = v.trim().parse().unwrap_or(0);
        }
    }
    if r.frames.is_empty() {
        bail!("{name}: the element restored no frame (is the decoder giving frames?)");
    }
    Ok(r)
}

/// A gst-launch description split into arguments (quotes kept together).
fn shell_words(s: &str) -> Vec<String> {
    let mut v = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    v.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        v.push(cur);
    }
    v
}

/// `name 12.3 ms` pairs of a timing line.
fn ms_of(line: &str, stage: &str) -> Option<f64> {
    // ", sample " and not "upsample ": stages follow a comma or the colon.
    let i = [format!(", {stage} "), format!(": {stage} ")]
        .iter()
        .find_map(|k| line.find(k.as_str()).map(|i| i + k.len()))?;
    line[i..].split_whitespace().next()?.parse().ok()
}

/// The largest of a timing line's per-stage peaks (`peak RSS MiB: T5 17241, …`), in MiB.
fn stage_peak_mib(line: &str) -> Option<f64> {
    let tail = line.split("peak RSS MiB:").nth(1)?;
    tail.split(',').filter_map(|kv| kv.split_whitespace().last()?.parse::<f64>().ok()).reduce(f64::max)
}

fn summarise(name: &str, r: &Report) {
    // The per-stage peaks restart the kernel's high-water mark (clear_refs), which also lowers what
    // the parent's rusage sees at exit: the process peak is the larger of the two.
    let stages = r.frames.iter().filter_map(|f| stage_peak_mib(f)).fold(0f64, f64::max) / 1024.0;
    println!(
        "-- {name}: wall {:.1} s, model load {:.1} s (resident after it {}), process peak RSS {:.2} GiB",
        r.wall_s,
        r.load_s.unwrap_or(f64::NAN),
        r.loaded_rss.as_deref().unwrap_or("?"),
        (r.max_rss_kib as f64 / (1 << 20) as f64).max(stages)
    );
    if let Some(e) = &r.estimate {
        println!("   estimate: {e}");
    }
    for f in &r.frames {
        println!("   {f}");
    }
    let Some(last) = r.frames.last() else { return };
    let steps: f64 = last.split("ms (").nth(1).and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(2.0);
    let (sample, total) = (ms_of(last, "sample").unwrap_or(0.0), ms_of(last, "total").unwrap_or(0.0));
    let per_step = sample / steps.max(1.0);
    println!(
        "   last frame: one transformer step {:.1} s; at 28 steps a frame would take {:.0} s ({:.1} min)",
        per_step / 1e3,
        (total - sample + 28.0 * per_step) / 1e3,
        (total - sample + 28.0 * per_step) / 6e4
    );
}

fn main() -> Result<()> {
    let dir = std::env::var_os("DPIR_REAL_SIZE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/gst-dpir-real-size"));
    ensure_model(&dir)?;
    let media = shared("DPIR_MEDIA", "media");
    let precision = std::env::var("DPIR_REAL_PRECISION").unwrap_or_else(|_| "f16".into());
    println!(
        "== machine: {}; load average {}",
        std::fs::read_to_string("/proc/cpuinfo")?
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim(),
        std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    // DPIR_REAL_RUNS: which of still, film, pytorch to run (default all).
    let runs = std::env::var("DPIR_REAL_RUNS").unwrap_or_else(|_| "still,film,pytorch".into());
    let wanted = |r: &str| runs.split(',').any(|x| x.trim() == r);
    let props = format!("model=\"{}\" device=cpu precision={precision} steps=2 lq-latent=mode", dir.display());
    if wanted("still") {
        // GStreamer 1.22's jpegdec gives no frame for this grayscale scan (it only warns).
        let still = run(
            "Solvay 1927 still, 1024x705, x1",
            &format!(
                "filesrc location=\"{}\" ! jpegparse ! avdec_mjpeg ! videoconvert ! video/x-raw,format=RGB ! dpirrestore {props} ! fakesink",
                media.join("solvay_1927_1024x705.jpg").display()
            ),
            &[],
        )?;
        summarise("still", &still);
    }
    if wanted("film") {
        let film = run(
            "1906 film, 4 frames 214x160 -> 856x640 (x4)",
            &format!(
                "filesrc location=\"{}\" ! decodebin ! videoconvert ! video/x-raw,format=RGB ! identity eos-after=4 ! \
             dpirrestore {props} scale=4 ! fakesink",
                media.join("Shepard_Calais_1906_FrenchGP.ogv").display()
            ),
            &[],
        )?;
        summarise("film", &film);
    }
    println!(
        "== load average after the element runs: {}",
        std::fs::read_to_string("/proc/loadavg")?.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    if wanted("pytorch") && std::env::var_os("DPIR_REAL_SKIP_PYTORCH").is_none() {
        println!("== one transformer step at 4096 + 333 tokens, Rust vs PyTorch (benches/compare_pytorch.sh --real)");
        let status = Command::new("bash")
            .arg(repo().join("benches/compare_pytorch.sh"))
            .args(["--real", &dir.display().to_string()])
            .env("DPIR_CMP_ROUNDS", "1")
            .status()?;
        if !status.success() {
            bail!("compare_pytorch.sh --real failed ({status})");
        }
    }
    Ok(())
}
