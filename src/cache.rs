//! The per-clip tensor cache, on the engine side: what is computed once per clip (the global
//! visual prompt of its key frame, its noise field, the warm-start latents) or once per prompt
//! string (the T5 embedding), and reused for every frame of the clip.

/// How often each encoder ran, and where the time went: what the clip cache saves is visible
/// here (`DpirEngine::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
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
    /// Time spent in each encoder, and in whole frames (`restore_rgb8`).
    pub text_time: std::time::Duration,
    pub global_time: std::time::Duration,
    pub local_time: std::time::Duration,
    pub frame_time: std::time::Duration,
}

impl CacheStats {
    /// Share of the frame time spent in the prompt encoders (text, global, local), in [0, 1].
    pub fn encoder_share(&self) -> f64 {
        let enc = (self.text_time + self.global_time + self.local_time).as_secs_f64();
        enc / self.frame_time.as_secs_f64().max(1e-12)
    }
}

/// What is computed once per clip and reused for each of its frames.
#[derive(Debug, Default)]
pub struct ClipCache {
    pub clip_index: Option<u64>,
    /// Stream frame index of the clip's first frame: noise drawn per frame is keyed by the
    /// position inside the clip, so that a clip rendered alone draws the same noise.
    pub start_frame: u64,
    /// Global visual prompt of the clip's key frame (its first frame).
    pub global: Option<crate::model::prompt::GlobalPrompt>,
    /// The clip's initial noise field (`noise=per-clip`).
    pub noise: Option<candle_core::Tensor>,
    /// Final latents of the clip's previous frame (`warm-start`); never carried across clips.
    pub previous: Option<candle_core::Tensor>,
    /// Text embeddings by prompt string: a prompt seen before costs nothing, across clips too.
    text: std::collections::HashMap<String, candle_core::Tensor>,
    pub stats: CacheStats,
}

impl ClipCache {
    /// Forget the per-clip state (the text embeddings stay: they depend on the prompt only).
    pub fn start_clip(&mut self, index: u64, start_frame: u64) {
        self.clip_index = Some(index);
        self.start_frame = start_frame;
        self.global = None;
        self.noise = None;
        self.previous = None;
        self.stats.clips += 1;
    }

    /// The text embedding of `prompt`, computed with `f` the first time it is seen (every time
    /// when `reuse` is false).
    pub fn text<E>(
        &mut self,
        prompt: &str,
        reuse: bool,
        f: impl FnOnce(&str) -> Result<candle_core::Tensor, E>,
    ) -> Result<candle_core::Tensor, E> {
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
