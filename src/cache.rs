//! Per-clip state between the element and the model: where clips start (scene cuts, length
//! cap, application requests, prompt changes), so that the engine can compute the text and
//! global visual prompts once per clip and reuse them for every frame of it.

use crate::engine::{ClipReason, Image};

/// Settings of the clip segmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipTrackerSettings {
    /// Frame difference in [0, 1] above which a scene cut is declared.
    pub scene_threshold: f64,
    /// Start a new clip after this many frames; 0: no limit.
    pub clip_max_frames: u32,
}

impl Default for ClipTrackerSettings {
    fn default() -> Self {
        Self { scene_threshold: 0.3, clip_max_frames: 0 }
    }
}

/// An application's request to start a new clip (`dpir-clip` event), optionally with a prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipRequest {
    pub prompt: Option<String>,
}

const THUMB: usize = 32;
const BINS: usize = 16;

/// Cheap frame signature: a 32×32 luma thumbnail and a 16-bin histogram per channel.
#[derive(Debug, Clone)]
struct Signature {
    thumb: Vec<f32>,
    hist: Vec<f32>,
}

impl Signature {
    fn of(img: &Image) -> Self {
        let mut thumb = vec![0f32; THUMB * THUMB];
        let mut hist = vec![0f32; 3 * BINS];
        // Point-sample a grid: the cost is independent of the frame size.
        let n = 64usize;
        for gy in 0..n {
            let y = (gy * img.height) / n;
            for gx in 0..n {
                let x = (gx * img.width) / n;
                let [r, g, b] = img.pixel(x, y);
                let luma = 0.299 * r + 0.587 * g + 0.114 * b;
                thumb[(gy * THUMB / n) * THUMB + gx * THUMB / n] += luma / ((n / THUMB) * (n / THUMB)) as f32;
                for (c, v) in [r, g, b].into_iter().enumerate() {
                    let bin = ((v.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1);
                    hist[c * BINS + bin] += 1.0 / (n * n) as f32;
                }
            }
        }
        Self { thumb, hist }
    }

    /// Difference in [0, 1]: mean of the histogram distance (half L1, averaged over channels)
    /// and the mean absolute thumbnail difference scaled up (a cut between similar palettes
    /// still moves structure).
    fn distance(&self, other: &Self) -> f64 {
        let h: f32 = self.hist.iter().zip(&other.hist).map(|(a, b)| (a - b).abs()).sum::<f32>() / 6.0;
        let t: f32 =
            self.thumb.iter().zip(&other.thumb).map(|(a, b)| (a - b).abs()).sum::<f32>() / self.thumb.len() as f32;
        (0.5 * h + 0.5 * (4.0 * t).min(1.0)) as f64
    }
}

/// Decides, frame by frame, which clip a frame belongs to.
#[derive(Debug)]
pub struct ClipTracker {
    settings: ClipTrackerSettings,
    clip_index: u64,
    frames_in_clip: u64,
    started: bool,
    last: Option<Signature>,
    last_prompt: Option<String>,
    pending: Option<ClipRequest>,
    /// Prompt set by the last `dpir-clip` event, overriding the element's prompt.
    event_prompt: Option<String>,
    /// Last measured frame difference (for logs and tests).
    pub last_distance: f64,
}

impl ClipTracker {
    pub fn new(settings: ClipTrackerSettings) -> Self {
        Self {
            settings,
            clip_index: 0,
            frames_in_clip: 0,
            started: false,
            last: None,
            last_prompt: None,
            pending: None,
            event_prompt: None,
            last_distance: 0.0,
        }
    }

    /// After a flush/seek: the next frame starts a clip (its index continues, so clip indices
    /// stay unique within a stream).
    pub fn reset(&mut self) {
        self.started = false;
        self.last = None;
        self.frames_in_clip = 0;
    }

    /// An application asked for a new clip at the next frame.
    pub fn request(&mut self, req: ClipRequest) {
        self.pending = Some(req);
    }

    /// The prompt in force: the last clip event's, else `prompt`.
    pub fn effective_prompt(&self, prompt: &str) -> String {
        self.event_prompt.clone().unwrap_or_else(|| prompt.to_string())
    }

    /// Classify a frame: returns its clip index, and the reason if it starts a new clip.
    pub fn observe(&mut self, img: &Image, prompt: &str) -> (u64, Option<ClipReason>) {
        let sig = Signature::of(img);
        let mut reason = None;
        if let Some(req) = self.pending.take() {
            if req.prompt.is_some() {
                self.event_prompt = req.prompt;
            }
            reason = Some(ClipReason::Event);
        }
        let prompt = self.effective_prompt(prompt);
        self.last_distance = self.last.as_ref().map(|l| l.distance(&sig)).unwrap_or(0.0);
        if !self.started {
            reason = Some(ClipReason::Start);
        } else if reason.is_none() {
            if self.last_prompt.as_deref() != Some(prompt.as_str()) {
                reason = Some(ClipReason::Prompt);
            } else if self.last_distance > self.settings.scene_threshold {
                reason = Some(ClipReason::SceneCut);
            } else if self.settings.clip_max_frames > 0 && self.frames_in_clip >= self.settings.clip_max_frames as u64 {
                reason = Some(ClipReason::MaxFrames);
            }
        }
        if reason.is_some() {
            if self.started {
                self.clip_index += 1;
            }
            self.started = true;
            self.frames_in_clip = 0;
        }
        self.frames_in_clip += 1;
        self.last = Some(sig);
        self.last_prompt = Some(prompt);
        (self.clip_index, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(w: usize, h: usize, rgb: [f32; 3]) -> Image {
        let mut img = Image::new(w, h);
        for p in img.data.chunks_mut(3) {
            p.copy_from_slice(&rgb);
        }
        img
    }

    #[test]
    fn identical_frames_stay_in_one_clip_and_a_cut_starts_the_next() {
        let mut t = ClipTracker::new(ClipTrackerSettings::default());
        let a = flat(64, 48, [0.2, 0.3, 0.4]);
        let b = flat(64, 48, [0.9, 0.1, 0.1]);
        assert_eq!(t.observe(&a, ""), (0, Some(ClipReason::Start)));
        assert_eq!(t.observe(&a, ""), (0, None));
        assert_eq!(t.observe(&b, ""), (1, Some(ClipReason::SceneCut)));
        assert_eq!(t.observe(&b, ""), (1, None));
    }

    #[test]
    fn max_frames_event_and_prompt_change_start_clips() {
        let mut t = ClipTracker::new(ClipTrackerSettings { scene_threshold: 0.3, clip_max_frames: 2 });
        let a = flat(16, 16, [0.5; 3]);
        assert_eq!(t.observe(&a, "x").1, Some(ClipReason::Start));
        assert_eq!(t.observe(&a, "x").1, None);
        assert_eq!(t.observe(&a, "x").1, Some(ClipReason::MaxFrames));
        t.request(ClipRequest { prompt: Some("film".into()) });
        assert_eq!(t.observe(&a, "x"), (2, Some(ClipReason::Event)));
        assert_eq!(t.effective_prompt("x"), "film");
        assert_eq!(t.observe(&a, "x").1, None);
    }
}

/// How often each encoder ran: what the clip cache saves is visible here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub text_encodes: u64,
    pub global_encodes: u64,
    pub local_encodes: u64,
    pub clips: u64,
}

/// What is computed once per clip and reused for each of its frames.
#[derive(Debug, Default)]
pub struct ClipCache {
    pub clip_index: Option<u64>,
    /// Global visual prompt of the clip's key frame (its first frame).
    pub global: Option<crate::model::prompt::GlobalPrompt>,
    /// The clip's initial noise field (`noise=per-clip`).
    pub noise: Option<candle_core::Tensor>,
    /// Text embeddings by prompt string: a prompt seen before costs nothing, across clips too.
    text: std::collections::HashMap<String, candle_core::Tensor>,
    pub stats: CacheStats,
}

impl ClipCache {
    /// Forget the per-clip state (the text embeddings stay: they depend on the prompt only).
    pub fn start_clip(&mut self, index: u64) {
        self.clip_index = Some(index);
        self.global = None;
        self.noise = None;
        self.stats.clips += 1;
    }

    /// The text embedding of `prompt`, computed with `f` the first time it is seen.
    pub fn text<E>(
        &mut self,
        prompt: &str,
        f: impl FnOnce(&str) -> Result<candle_core::Tensor, E>,
    ) -> Result<candle_core::Tensor, E> {
        if let Some(t) = self.text.get(prompt) {
            return Ok(t.clone());
        }
        let t = f(prompt)?;
        self.stats.text_encodes += 1;
        self.text.insert(prompt.to_string(), t.clone());
        Ok(t)
    }
}
