//! Parity with the official DPIR code: every case folder under `$DPIR_FIXTURES` (required;
//! `tests/run` sets it to `../shared/fixtures`) becomes one test per output tensor, named
//! `<case>::<tensor>`. A case folder with no runner, an expected case that is missing, or an
//! unset `DPIR_FIXTURES` is a failing test, never a skip.
//!
//! Each case's runner (in `tests/parity/`) is picked by the folder name's prefix, runs once,
//! and returns the tensors it produced; every `output` listed in the case's `config.json`
//! must be among them and within its tolerance.

#[path = "parity/common.rs"]
mod common;

#[path = "parity/clip.rs"]
mod clip;
#[path = "parity/color_fix.rs"]
mod color_fix;
#[path = "parity/pipeline.rs"]
mod pipeline;
#[path = "parity/preprocess.rs"]
mod preprocess;
#[path = "parity/prompt.rs"]
mod prompt;
#[path = "parity/scheduler.rs"]
mod scheduler;
#[path = "parity/t5.rs"]
mod t5;
#[path = "parity/taesd.rs"]
mod taesd;
#[path = "parity/transformer.rs"]
mod transformer;
#[path = "parity/vae.rs"]
mod vae;

use common::Runner;

/// Folder-name prefix → runner. Longest prefix wins.
const RUNNERS: &[(&str, Runner)] = &[
    ("dpir_transformer_", transformer::run),
    ("sd3_vae", vae::run),
    ("taesd3", taesd::run),
    ("scheduler", scheduler::run),
    ("wavelet_color_fix", color_fix::run),
    ("pipeline_e2e", pipeline::run),
    ("clip_vision_", clip::run),
    ("clip_preprocess", preprocess::run),
    ("t5_encoder", t5::run),
    ("prompt_assembly_", prompt::run),
];

/// The cases of `../shared/fixtures` (its README §3): each must be present, so that a deleted or
/// unreadable case folder fails the suite instead of silently running fewer tests.
const EXPECTED_CASES: &[&str] = &[
    "clip_preprocess",
    "clip_vision_b32",
    "clip_vision_bigg",
    "dpir_transformer_nonsquare",
    "dpir_transformer_square",
    "pipeline_e2e",
    "prompt_assembly_multitile",
    "prompt_assembly_quirk",
    "scheduler",
    "sd3_vae",
    "t5_encoder",
    "taesd3",
    "wavelet_color_fix",
];

fn main() {
    common::main(RUNNERS, EXPECTED_CASES)
}
