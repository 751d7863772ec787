//! Plugin version info, and the embedded default model: every file under `weights/dpir-nano/`
//! is compiled into the library so that the element works with no `model` property and no
//! files beside the plugin.

use std::io::Write;
use std::path::Path;

fn main() {
    gst_plugin_version_helper::info();

    // The manifest directory of THIS run, not `env!` (baked in when the script was compiled): a
    // target directory shared by several clones reuses the compiled script, and with `env!` a clone
    // would embed (or, once that clone is gone, silently miss) another clone's model.
    let dir = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("weights/dpir-nano");
    println!("cargo:rerun-if-changed={}", dir.display());
    // Named on its own too: a run that found no model.json must rerun once it appears (a directory
    // alone is not watched for files changing inside it).
    println!("cargo:rerun-if-changed={}", dir.join("model.json").display());
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded_model.rs");
    let mut f = std::fs::File::create(&out).unwrap();
    let mut files = Vec::new();
    if dir.join("model.json").exists() {
        collect(&dir, &dir, &mut files);
    }
    files.sort();
    writeln!(f, "pub static EMBEDDED_MODEL: &[(&str, &[u8])] = &[").unwrap();
    for rel in &files {
        let abs = dir.join(rel);
        println!("cargo:rerun-if-changed={}", abs.display());
        writeln!(f, "    ({rel:?}, include_bytes!({:?})),", abs.display().to_string()).unwrap();
    }
    writeln!(f, "];").unwrap();
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            println!("cargo:rerun-if-changed={}", p.display());
            collect(root, &p, files);
        } else if p.extension().is_some_and(|e| e == "json" || e == "safetensors") {
            files.push(p.strip_prefix(root).unwrap().to_string_lossy().replace('\\', "/"));
        }
    }
}
