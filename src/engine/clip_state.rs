//! What the engine computes once per clip (the global visual prompt of its key frame, its noise
//! field, the warm-start latents) or once per prompt string (the T5 embedding), and reuses for
//! every frame of the clip. Where clips start is decided by the clip policy ([`crate::clip`]);
//! this state only follows it: a frame with `new_clip` set (or another clip index) resets it.

use std::collections::HashMap;
use std::time::Duration;

use candle_core::Tensor;

use crate::engine::FrameContext;
use crate::model::prompt::GlobalPrompt;

/// How often each encoder ran, and where the time went: what the reuse saves is visible here
/// ([`super::dpir::DpirEngine::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseStats {
    /// T5 runs (once per distinct prompt string with reuse; every frame without).
    pub text_encodes: u64,
    /// Global visual prompts (once per clip with reuse; every frame without).
    pub global_encodes: u64,
    /// Local visual prompts (every frame).
    pub local_encodes: u64,
    /// Clips started.
    pub clips: u64,
    /// Frames restored.
    pub frames: u64,
    /// Frames sampled from the previous output (`warm-start`) instead of from noise.
    pub warm_starts: u64,
    /// Time spent in each encoder, and in whole frames.
    pub text_time: Duration,
    pub global_time: Duration,
    pub local_time: Duration,
    pub frame_time: Duration,
}

impl ReuseStats {
    /// Share of the frame time spent in the prompt encoders (text, global, local), in [0, 1].
    pub fn encoder_share(&self) -> f64 {
        let enc = (self.text_time + self.global_time + self.local_time).as_secs_f64();
        enc / self.frame_time.as_secs_f64().max(1e-12)
    }
}

/// The current clip's reusable tensors.
#[derive(Debug, Default)]
pub struct ClipState {
    clip_index: Option<u64>,
    /// Global visual prompt of the clip's key frame (its first frame).
    pub global: Option<GlobalPrompt>,
    /// The clip's initial noise field (`noise=per-clip`).
    pub noise: Option<Tensor>,
    /// Final latents of the clip's previous frame (`warm-start`); never carried across clips.
    pub previous: Option<Tensor>,
    /// Text embeddings by prompt string: a prompt seen before costs nothing, across clips too.
    text: HashMap<String, Tensor>,
    pub stats: ReuseStats,
}

impl ClipState {
    /// Follow the clip policy: forget the previous clip's tensors when `ctx` starts a clip (the
    /// text embeddings stay: they depend on the prompt only).
    pub fn enter(&mut self, ctx: &FrameContext) {
        if ctx.new_clip.is_some() || self.clip_index != Some(ctx.clip_index) {
            self.clip_index = Some(ctx.clip_index);
            self.global = None;
            self.noise = None;
            self.previous = None;
            self.stats.clips += 1;
        }
    }

    /// Forget everything but the statistics (a new model dtype after a precision fallback).
    pub fn clear(&mut self) {
        let stats = self.stats;
        *self = Self { stats, ..Default::default() };
    }

    /// The text embedding of `prompt`, computed with `f` the first time it is seen (every time
    /// when `reuse` is false).
    pub fn text<E>(
        &mut self,
        prompt: &str,
        reuse: bool,
        f: impl FnOnce(&str) -> Result<Tensor, E>,
    ) -> Result<Tensor, E> {
        if reuse && let Some(t) = self.text.get(prompt) {
            return Ok(t.clone());
        }
        let t0 = std::time::Instant::now();
        let t = f(prompt)?;
        self.stats.text_encodes += 1;
        self.stats.text_time += t0.elapsed();
        if reuse {
            self.text.insert(prompt.to_string(), t.clone());
        }
        Ok(t)
    }
}
