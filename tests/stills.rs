//! `pipelines/restore-stills.sh` on stills an archive holds: every format and mode (made at run
//! time by `tests/stills_files.py`, never committed), EXIF orientation, ICC profiles and
//! captions, multi-page TIFFs, and the real 1927 scan from `$DPIR_MEDIA`. The outputs are read
//! back with tools other than the script's own writers (libpng, libtiff + tifffile, exiftool).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

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

fn python() -> String {
    std::env::var("DPIR_PYTHON").unwrap_or("/usr/bin/python3".into())
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A fresh folder for one test, with `in/` made by `stills_files.py make SET`.
fn setup(name: &str, set: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpir-stills-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("in")).unwrap();
    if let Some(set) = set {
        let out = files_py(&["make", set, dir.join("in").to_str().unwrap()]);
        assert!(out.status.success(), "making the {set} stills: {}", String::from_utf8_lossy(&out.stderr));
    }
    dir
}

fn files_py(args: &[&str]) -> Output {
    Command::new(python())
        .arg(repo("tests/stills_files.py"))
        .args(args)
        .output()
        .expect("tests/stills_files.py (Debian python3-numpy, python3-pil, python3-tifffile)")
}

/// `restore-stills.sh ARGS… lq-latent=mode` (the deterministic latent: reproducible outputs).
fn restore(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("bash")
        .arg(repo("pipelines/restore-stills.sh"))
        .args(args)
        .arg("lq-latent=mode")
        .env("GST_PLUGIN_PATH", plugin_dir())
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    (out.status.code(), stdout, stderr)
}

fn inspect(paths: &[PathBuf]) -> Vec<Value> {
    let mut args = vec!["inspect".to_string()];
    args.extend(paths.iter().map(|p| p.to_str().unwrap().to_string()));
    let out = files_py(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "inspect: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

fn inspect1(p: &Path) -> Value {
    inspect(&[p.to_path_buf()]).remove(0)
}

/// Mean absolute differences (colour, alpha) of each (input, output) pair.
fn compare(pairs: &[(PathBuf, PathBuf)]) -> Vec<Value> {
    let mut args = vec!["compare".to_string()];
    for (a, b) in pairs {
        args.extend([a.to_str().unwrap().to_string(), b.to_str().unwrap().to_string()]);
    }
    let out = files_py(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "compare: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// Every entry of a folder, hidden ones included, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// (width, height, channels, bits) of each page.
fn pages(info: &Value) -> Vec<(u64, u64, u64, u64)> {
    info["pages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["width"].as_u64().unwrap(),
                p["height"].as_u64().unwrap(),
                p["channels"].as_u64().unwrap(),
                p["bits"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The real grayscale 1927 scan (which GStreamer 1.22's jpegdec cannot decode: it warns and ends
/// with no frame, and libav's MJPEG decoder takes over), a photo and a broken file: two complete
/// PNGs (the scan still gray), an error naming the broken file, exit status 1, nothing half-written.
#[test]
fn stills_script_restores_every_still_completely_or_names_the_one_it_cannot() {
    let dir = setup("real", None);
    let (src, dst) = (dir.join("in"), dir.join("out"));
    std::fs::copy(media("solvay_1927_1024x705.jpg"), src.join("solvay.jpg")).unwrap();
    std::fs::copy(media("chelsea.png"), src.join("chelsea.png")).unwrap();
    std::fs::write(src.join("broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let (code, _, stderr) = restore(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(code, Some(1), "one still cannot be restored: {stderr}");
    assert!(stderr.contains("broken.jpg"), "the error names the file: {stderr}");
    assert_eq!(listing(&dst), ["chelsea.png", "solvay.png"], "no partial or empty output");
    let out = inspect(&[dst.join("solvay.png"), dst.join("chelsea.png")]);
    assert_eq!(pages(&out[0]), [(1024, 705, 1, 8)], "the gray scan stays gray");
    assert_eq!(pages(&out[1]), [(451, 300, 3, 8)]);
    std::fs::remove_dir_all(&dir).ok();
}

/// PNG (every colour type, 8 and 16 bits, palette), JPEG (colour, gray), WebP (with and without
/// alpha) and TIFF (gray/RGB, with and without alpha, 8/16 bits, uncompressed/LZW/Deflate, planar,
/// 1-bit): each comes out complete, in its own format (JPEG/WebP as PNG), mode and depth, TIFFs
/// with their compression; 16-bit ones with 16-bit precision (not 8-bit values times 257), the
/// picture kept (small difference to the input) and alpha passed through. A CMYK, a floating-point
/// and a truncated TIFF are refused, each with its reason; nothing else is left in the folder.
#[test]
fn every_still_format_comes_out_complete_in_its_own_format_mode_and_depth() {
    let dir = setup("formats", Some("formats"));
    let (src, dst) = (dir.join("in"), dir.join("out"));
    let (code, stdout, stderr) = restore(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(code, Some(1), "three stills are refused: {stdout}\n{stderr}");
    for (bad, why) in [
        ("bad_cmyk.tif", "SEPARATED TIFFs are not supported"),
        ("bad_float.tif", "32-bit ieeefp samples are not supported"),
        ("bad_truncated.tif", "libtiff cannot read it"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains("ERROR") && l.contains(bad) && l.contains(why)),
            "{bad}: no error saying '{why}': {stderr}"
        );
    }
    // (input, output, channels, bits, TIFF compression)
    let want: &[(&str, &str, u64, u64, Option<&str>)] = &[
        ("png_gray8.png", "png_gray8.png", 1, 8, None),
        ("png_graya8.png", "png_graya8.png", 2, 8, None),
        ("png_rgb8.png", "png_rgb8.png", 3, 8, None),
        ("png_rgba8.png", "png_rgba8.png", 4, 8, None),
        ("png_gray16.png", "png_gray16.png", 1, 16, None),
        ("png_rgb16.png", "png_rgb16.png", 3, 16, None),
        ("png_rgba16.png", "png_rgba16.png", 4, 16, None),
        ("png_palette.png", "png_palette.png", 4, 8, None),
        ("jpg_rgb.jpg", "jpg_rgb.png", 3, 8, None),
        ("jpg_gray.jpg", "jpg_gray.png", 1, 8, None),
        ("webp_rgb.webp", "webp_rgb.png", 3, 8, None),
        ("webp_rgba.webp", "webp_rgba.png", 4, 8, None),
        ("tif_gray8_none.tif", "tif_gray8_none.tif", 1, 8, Some("NONE")),
        ("tif_graya8_lzw.tif", "tif_graya8_lzw.tif", 2, 8, Some("LZW")),
        ("tif_rgb8_deflate.tif", "tif_rgb8_deflate.tif", 3, 8, Some("ADOBE_DEFLATE")),
        ("tif_rgba8_lzw.tif", "tif_rgba8_lzw.tif", 4, 8, Some("LZW")),
        ("tif_gray16_deflate.tif", "tif_gray16_deflate.tif", 1, 16, Some("ADOBE_DEFLATE")),
        ("tif_graya16_none.tif", "tif_graya16_none.tif", 2, 16, Some("NONE")),
        ("tif_rgb16_lzw.tif", "tif_rgb16_lzw.tif", 3, 16, Some("LZW")),
        ("tif_rgba16_deflate.tif", "tif_rgba16_deflate.tif", 4, 16, Some("ADOBE_DEFLATE")),
        ("tif_rgb16_planar_lzw.tif", "tif_rgb16_planar_lzw.tif", 3, 16, Some("LZW")),
        ("tif_bilevel.tif", "tif_bilevel.tif", 1, 8, Some("NONE")),
    ];
    let mut names: Vec<&str> = want.iter().map(|w| w.1).collect();
    names.sort();
    assert_eq!(listing(&dst), names, "one complete output per readable still, nothing else: {stdout}");
    let infos = inspect(&want.iter().map(|w| dst.join(w.1)).collect::<Vec<_>>());
    let diffs = compare(&want.iter().map(|w| (src.join(w.0), dst.join(w.1))).collect::<Vec<_>>());
    for ((&(input, output, channels, bits, compression), info), d) in want.iter().zip(&infos).zip(&diffs) {
        let want_type = if compression.is_some() { "TIFF" } else { "PNG" };
        assert_eq!(info["type"], want_type, "{output}");
        assert_eq!(pages(info), [(64, 48, channels, bits)], "{input} -> {output}: size, channels, bits");
        if let Some(c) = compression {
            assert_eq!(info["pages"][0]["compression"], c, "{output}: the input's compression");
        }
        if bits == 16 {
            let m = info["multiples_of_257"].as_f64().unwrap();
            assert!(m < 0.05, "{output}: {m:.3} of the samples are 8-bit values times 257: not 16-bit precision");
        }
        let diff = d["mean_abs_diff"].as_f64().unwrap_or_else(|| panic!("{output}: {d}"));
        assert!(diff > 0.0 && diff < 0.08, "{input} -> {output}: mean difference {diff:.4} (restored, same picture)");
        if let Some(a) = d["alpha_abs_diff"].as_f64() {
            assert!(a < 0.5 / 255.0, "{output}: alpha changed by {a:.5}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// EXIF orientation is applied before restoration: the issue's 200x150 JPEG tagged "rotate 90
/// CW" comes out as a 150x200 portrait, and every other orientation (JPEG, a PNG's eXIf, a
/// 16-bit TIFF's own tag) comes out as viewers show the input (a bright block top left, a grey
/// one top right); outputs say orientation 1.
#[test]
fn exif_orientation_is_applied_so_the_output_looks_as_the_original_is_displayed() {
    let dir = setup("orientation", Some("orientation"));
    let (src, dst) = (dir.join("in"), dir.join("out"));
    let (code, stdout, stderr) = restore(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("orientation 6 applied"), "{stdout}");
    let want = [
        ("o6.png", (150, 200), 8),
        ("o2.png", (40, 48), 8),
        ("o3.png", (40, 48), 8),
        ("o4.png", (40, 48), 8),
        ("o5.png", (40, 48), 8),
        ("o7.png", (40, 48), 8),
        ("o8.png", (40, 48), 8),
        ("o3png.png", (40, 48), 8),
        ("o8tif.tif", (40, 48), 16),
    ];
    let infos = inspect(&want.iter().map(|w| dst.join(w.0)).collect::<Vec<_>>());
    for ((output, size, bits), info) in want.into_iter().zip(&infos) {
        assert_eq!(pages(info), [(size.0, size.1, 3, bits)], "{output} (o6: 200x150 landscape in, portrait out)");
        let q: Vec<f64> = info["quadrants"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!(
            q[0] > 0.7 && (0.35..0.65).contains(&q[1]) && q[2] < 0.25 && q[3] < 0.25,
            "{output}: top-left, top-right, bottom-left, bottom-right means {q:?}, not the picture as displayed"
        );
        assert_eq!(info["tags"]["IFD0:Orientation"], 1, "{output}: orientation reset to 1");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The ICC profile (Adobe RGB primaries on a JPEG, a PNG, a WebP and a 16-bit RGB TIFF; a gray
/// gamma profile on a 16-bit gray TIFF) comes out byte-identical, and the EXIF, XMP and IPTC
/// captions equal, into PNG and into TIFF (`--format`), at scale 2 with the EXIF dimensions and
/// the resolution updated; 16-bit stays 16-bit either way.
#[test]
fn icc_profile_comes_out_byte_identical_and_captions_equal_in_png_and_tiff() {
    let dir = setup("metadata", Some("metadata"));
    let src = dir.join("in");
    let inputs = ["meta_jpg.jpg", "meta_png.png", "meta_webp.webp", "meta_tif16.tif", "meta_gray16.tif"];
    let originals = inspect(&inputs.iter().map(|f| src.join(f)).collect::<Vec<_>>());
    for (format, ext) in [("png", "png"), ("tiff", "tif")] {
        let dst = dir.join(format!("out-{format}"));
        let (code, stdout, stderr) =
            restore(&["--format", format, src.to_str().unwrap(), dst.to_str().unwrap(), "scale=2"]);
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        let outputs: Vec<String> = inputs.iter().map(|i| format!("{}.{ext}", i.split('.').next().unwrap())).collect();
        let infos = inspect(&outputs.iter().map(|o| dst.join(o)).collect::<Vec<_>>());
        for ((input, orig), (output, info)) in inputs.iter().zip(&originals).zip(outputs.iter().zip(&infos)) {
            let (channels, bits) =
                (orig["pages"][0]["channels"].as_u64().unwrap(), orig["pages"][0]["bits"].as_u64().unwrap());
            assert_eq!(pages(info), [(96, 64, channels, bits)], "{input} -> {output}");
            assert!(orig["icc_sha256"].is_string(), "{input} has no ICC profile");
            assert_eq!(info["icc_sha256"], orig["icc_sha256"], "{input} -> {output}: ICC profile not byte-identical");
            for tag in [
                "IFD0:ImageDescription",
                "IFD0:Artist",
                "IFD0:Copyright",
                "XMP-dc:Description",
                "XMP-dc:Creator",
                "XMP-dc:Rights",
                "IPTC:Caption-Abstract",
                "IPTC:By-line",
                "IPTC:Keywords",
            ] {
                if !orig["tags"][tag].is_null() {
                    assert_eq!(info["tags"][tag], orig["tags"][tag], "{input} -> {output}: {tag}");
                }
            }
            assert!(!orig["tags"]["XMP-dc:Description"].is_null() && !orig["tags"]["IFD0:ImageDescription"].is_null());
            assert_eq!(info["tags"]["ExifIFD:ExifImageWidth"], 96, "{output}: EXIF width updated");
            assert_eq!(info["tags"]["ExifIFD:ExifImageHeight"], 64, "{output}: EXIF height updated");
            assert_eq!(info["tags"]["IFD0:XResolution"], 600, "{output}: 300 dpi at twice the pixels is 600 dpi");
            let line =
                stdout.lines().find(|l| l.contains(output.as_str())).unwrap_or_else(|| panic!("{output}: {stdout}"));
            if *input == "meta_jpg.jpg" && format == "tiff" {
                // The JPEG's COM segment has no place in a TIFF: the line says so.
                assert!(line.contains("NOT carried: comment (TIFF has no place for it)"), "{line}");
            } else {
                assert!(!line.contains("NOT carried"), "{line}");
            }
            if *input == "meta_jpg.jpg" && format == "png" {
                assert_eq!(info["tags"]["PNG:Comment"], orig["tags"]["File:Comment"], "{output}: the JPEG comment");
                assert!(orig["tags"]["File:Comment"].is_string());
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A multi-page TIFF: every full-resolution page is restored, in order, each in its own mode and
/// with its own ICC profile, into one multi-page TIFF (or one PNG per page with `--format png`);
/// the reduced-resolution preview is left out, and the summary line says so.
#[test]
fn multipage_tiff_gives_every_full_resolution_page_with_its_own_profile() {
    let dir = setup("multipage", Some("multipage"));
    let src = dir.join("in");
    let orig = inspect1(&src.join("pages.tif"));
    assert_eq!(pages(&orig), [(64, 48, 3, 16), (40, 32, 1, 8)], "the fixture: two pages and a preview");
    let dst = dir.join("out");
    let (code, stdout, stderr) = restore(&[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("2 pages") && stdout.contains("1 reduced-resolution subfile left out"), "{stdout}");
    assert_eq!(listing(&dst), ["pages.tif"]);
    let info = inspect1(&dst.join("pages.tif"));
    assert_eq!(pages(&info), pages(&orig));
    for p in 0..2 {
        assert_eq!(info["pages"][p]["icc_sha256"], orig["pages"][p]["icc_sha256"], "page {}: its ICC profile", p + 1);
        assert_eq!(info["pages"][p]["compression"], "ADOBE_DEFLATE");
    }
    assert_ne!(orig["pages"][0]["icc_sha256"], orig["pages"][1]["icc_sha256"]);
    assert_eq!(info["tags"]["IFD0:ImageDescription"], orig["tags"]["IFD0:ImageDescription"]);
    assert_eq!(info["tags"]["XMP-dc:Description"], orig["tags"]["XMP-dc:Description"]);

    let dst = dir.join("out-png");
    let (code, stdout, stderr) = restore(&["--format", "png", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert_eq!(listing(&dst), ["pages-page1.png", "pages-page2.png"]);
    let out = inspect(&[dst.join("pages-page1.png"), dst.join("pages-page2.png")]);
    for p in 0..2 {
        assert_eq!(pages(&out[p]), [pages(&orig)[p]], "page {}", p + 1);
        assert_eq!(out[p]["icc_sha256"], orig["pages"][p]["icc_sha256"], "page {}: its ICC profile", p + 1);
        assert_eq!(out[p]["tags"]["XMP-dc:Description"], orig["tags"]["XMP-dc:Description"]);
    }
    std::fs::remove_dir_all(&dir).ok();
}
