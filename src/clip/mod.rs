//! The clip policy, in one place: where clips start (scene cuts found from the frames
//! themselves, the length cap, application requests, prompt changes), each frame's position in
//! its clip, and which prompt is in force ([`PromptSource`]: the `prompt` property, the
//! stream's tags, an application's `dpir-clip` event). The engine follows it: it computes the
//! text and global visual prompts once per clip ([`crate::engine::clip_state`]) and draws noise
//! by clip and position. The same segmentation runs alone in the element's `analyse-only` mode
//! (a fast pre-pass for splitting a film into chunks on clip boundaries).
//!
//! # Scene cuts
//!
//! Each frame is reduced to a cheap signature — a 32×32 luma thumbnail (box average of an 8×8
//! sample grid per cell: a 256×256-sample downscaled copy, whatever the frame size) and a 16-bin
//! histogram per colour channel, both of the picture inside any black letterbox or pillarbox
//! bars — and compared with the previous frame's. The difference, in
//! [0, 1], mixes three statistics:
//!
//! - *structure* (weight ½): `1 − r`, clipped to [0, 1], where `r` is the Pearson correlation of
//!   the two thumbnails. It ignores global exposure changes, so the flicker of archival film
//!   (frame-to-frame brightness jumps of 10 % and more) does not look like a cut;
//! - *colour* (¼): half the L1 distance of the histograms, averaged over channels;
//! - *luma* (¼): mean absolute thumbnail difference × 4, clipped to 1.
//!
//! Measured on the real footage in `../shared/media` (hand-checked cuts): the 1906 film's one
//! cut scores 0.63 and its flickery, dusty frames at most 0.37; `bikes.mp4`'s five cuts score
//! 0.66–0.93 and its fast pans at most 0.31 (the same once letterboxed into 4:3: bars are
//! ignored); the hard cut from the film to bikes.mp4 scores 0.69. Hence the
//! default `scene-threshold` of 0.45. Frames without structure (a flat colour) have no
//! correlation: two flat frames compare by colour alone, a flat frame and a structured one are
//! a full structure change.

use crate::engine::{ClipReason, Frame};

/// Default frame difference above which a scene cut is declared (see the module notes).
pub const DEFAULT_SCENE_THRESHOLD: f64 = 0.45;

/// Settings of the clip segmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipTrackerSettings {
    /// Frame difference in [0, 1] above which a scene cut is declared.
    pub scene_threshold: f64,
    /// Start a new clip after this many frames; 0: no limit.
    pub clip_max_frames: u32,
    /// Index of the stream's first clip. Clip indices (with the seed) choose each clip's noise,
    /// so a clip rendered alone — a chunk of a long film, a resumed job — gives the frames it
    /// gave inside the whole stream when it gets the index it had there.
    pub first_clip_index: u64,
}

impl Default for ClipTrackerSettings {
    fn default() -> Self {
        Self { scene_threshold: DEFAULT_SCENE_THRESHOLD, clip_max_frames: 0, first_clip_index: 0 }
    }
}

/// An application's request to start a new clip (`dpir-clip` event), optionally with a prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipRequest {
    pub prompt: Option<String>,
}

const THUMB: usize = 32;
/// Samples per thumbnail cell along each axis (box average of SUB × SUB samples).
const SUB: usize = 8;
const BINS: usize = 16;
/// Luma below which a row or column at the frame's edge is a letterbox bar.
const BLACK: f32 = 0.1;
/// Thumbnails whose luma standard deviation is below this have no structure to correlate.
const FLAT_STD: f32 = 2.0 / 255.0;

/// Cheap frame signature: a 32×32 luma thumbnail and a 16-bin histogram per channel.
#[derive(Debug, Clone)]
struct Signature {
    thumb: Vec<f32>,
    /// Mean and standard deviation of `thumb`.
    mean: f32,
    std: f32,
    hist: Vec<f32>,
}

impl Signature {
    fn of(img: &Frame) -> Self {
        let n = THUMB * SUB;
        let mut thumb = vec![0f32; THUMB * THUMB];
        let mut hist = vec![0f32; 3 * BINS];
        if img.width == 0 || img.height == 0 {
            return Self { thumb, mean: 0.0, std: 0.0, hist };
        }
        // Sample a regular grid (cell centres) of the picture area: the cost is independent of
        // the frame size.
        let (x0, x1, y0, y1) = active_area(img);
        let (w, h) = (x1 - x0, y1 - y0);
        let per_cell = 1.0 / (SUB * SUB) as f32;
        let per_sample = 1.0 / (n * n) as f32;
        for gy in 0..n {
            let y = y0 + ((2 * gy + 1) * h) / (2 * n);
            for gx in 0..n {
                let x = x0 + ((2 * gx + 1) * w) / (2 * n);
                let [r, g, b] = img.pixel(x, y);
                let luma = 0.299 * r + 0.587 * g + 0.114 * b;
                thumb[(gy / SUB) * THUMB + gx / SUB] += luma * per_cell;
                for (c, v) in [r, g, b].into_iter().enumerate() {
                    let bin = ((v.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1);
                    hist[c * BINS + bin] += per_sample;
                }
            }
        }
        let mean = thumb.iter().sum::<f32>() / thumb.len() as f32;
        let var = thumb.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / thumb.len() as f32;
        Self { thumb, mean, std: var.sqrt(), hist }
    }

    /// Difference in [0, 1]; see the module notes.
    fn distance(&self, other: &Self) -> f64 {
        let colour: f32 = self.hist.iter().zip(&other.hist).map(|(a, b)| (a - b).abs()).sum::<f32>() / 6.0;
        let luma: f32 =
            self.thumb.iter().zip(&other.thumb).map(|(a, b)| (a - b).abs()).sum::<f32>() / self.thumb.len() as f32;
        let structure = match (self.std < FLAT_STD, other.std < FLAT_STD) {
            (true, true) => colour,
            (true, false) | (false, true) => 1.0,
            (false, false) => {
                let cov =
                    self.thumb.iter().zip(&other.thumb).map(|(a, b)| (a - self.mean) * (b - other.mean)).sum::<f32>()
                        / self.thumb.len() as f32;
                (1.0 - cov / (self.std * other.std)).clamp(0.0, 1.0)
            }
        };
        (0.5 * structure + 0.25 * colour + 0.25 * (4.0 * luma).min(1.0)) as f64
    }
}

/// The picture inside black letterbox / pillarbox bars, `(x0, x1, y0, y1)`: rows and columns
/// (up to a third of the frame on each side) whose sampled luma stays below [`BLACK`] are bars.
/// Bars are identical in every frame: left in, they would dominate the statistics (a cut
/// between two letterboxed shots would keep half its correlation).
fn active_area(img: &Frame) -> (usize, usize, usize, usize) {
    let (w, h) = (img.width, img.height);
    let luma = |x: usize, y: usize| {
        let [r, g, b] = img.pixel(x, y);
        0.299 * r + 0.587 * g + 0.114 * b
    };
    let k = 64;
    let dark_row = |y: usize| (0..k).all(|i| luma(((2 * i + 1) * w) / (2 * k), y) < BLACK);
    let dark_col = |x: usize| (0..k).all(|i| luma(x, ((2 * i + 1) * h) / (2 * k)) < BLACK);
    let (mut y0, mut y1, mut x0, mut x1) = (0, h, 0, w);
    while y0 < h / 3 && dark_row(y0) {
        y0 += 1;
    }
    while y1 > h - h / 3 && dark_row(y1 - 1) {
        y1 -= 1;
    }
    while x0 < w / 3 && dark_col(x0) {
        x0 += 1;
    }
    while x1 > w - w / 3 && dark_col(x1 - 1) {
        x1 -= 1;
    }
    (x0, x1, y0, y1)
}

/// Which prompt is in force: an application's `dpir-clip` event prompt (until another event
/// sets one), else the `prompt` property, else the stream's description/title tag
/// (`tags-as-prompt`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptSource {
    event: Option<String>,
    tag: Option<String>,
}

impl PromptSource {
    /// The stream's description/title tag (the element passes it only with `tags-as-prompt`).
    pub fn set_tag(&mut self, tag: Option<String>) {
        self.tag = tag;
    }

    /// The prompt in force, given the `prompt` property's value.
    pub fn resolve(&self, property: &str) -> String {
        if let Some(e) = &self.event {
            return e.clone();
        }
        if property.is_empty() { self.tag.clone().unwrap_or_default() } else { property.to_string() }
    }
}

/// Where a frame is: its clip, its position in it, why the clip started (on its first frame),
/// the prompt in force and the frame difference measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPosition {
    pub clip_index: u64,
    pub position: u64,
    pub reason: Option<ClipReason>,
    pub prompt: String,
    /// The scene-cut statistic against the previous frame (0 for the first).
    pub difference: f64,
}

/// Decides, frame by frame, which clip a frame belongs to and which prompt it gets.
#[derive(Debug)]
pub struct ClipTracker {
    settings: ClipTrackerSettings,
    clip_index: u64,
    frames_in_clip: u64,
    /// A clip is open (false before the first frame and after a flush).
    started: bool,
    /// Some clip was ever started (its index is taken).
    any_clip: bool,
    last: Option<Signature>,
    last_prompt: Option<String>,
    pending: Option<ClipRequest>,
    pub prompts: PromptSource,
}

impl ClipTracker {
    pub fn new(settings: ClipTrackerSettings) -> Self {
        Self {
            settings,
            clip_index: settings.first_clip_index,
            frames_in_clip: 0,
            started: false,
            any_clip: false,
            last: None,
            last_prompt: None,
            pending: None,
            prompts: PromptSource::default(),
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

    /// Place a frame: its clip, position and prompt, given the `prompt` property's value now.
    pub fn observe(&mut self, frame: &Frame, property_prompt: &str) -> ClipPosition {
        let sig = Signature::of(frame);
        let mut reason = None;
        if let Some(req) = self.pending.take() {
            if req.prompt.is_some() {
                self.prompts.event = req.prompt;
            }
            reason = Some(ClipReason::Event);
        }
        let prompt = self.prompts.resolve(property_prompt);
        let difference = self.last.as_ref().map(|l| l.distance(&sig)).unwrap_or(0.0);
        if !self.started {
            reason = Some(ClipReason::Start);
        } else if reason.is_none() {
            if self.last_prompt.as_deref() != Some(prompt.as_str()) {
                reason = Some(ClipReason::Prompt);
            } else if difference > self.settings.scene_threshold {
                reason = Some(ClipReason::SceneCut);
            } else if self.settings.clip_max_frames > 0 && self.frames_in_clip >= self.settings.clip_max_frames as u64 {
                reason = Some(ClipReason::MaxFrames);
            }
        }
        if reason.is_some() {
            if self.any_clip {
                self.clip_index += 1;
            }
            self.started = true;
            self.any_clip = true;
            self.frames_in_clip = 0;
        }
        let position = self.frames_in_clip;
        self.frames_in_clip += 1;
        self.last = Some(sig);
        self.last_prompt = Some(prompt.clone());
        ClipPosition { clip_index: self.clip_index, position, reason, prompt, difference }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Pixels;

    fn flat(w: usize, h: usize, rgb: [f32; 3]) -> Frame {
        Frame { width: w, height: h, pixels: Pixels::RgbF32(rgb.repeat(w * h)) }
    }

    /// `(clip, reason)` of a frame.
    fn see(t: &mut ClipTracker, f: &Frame, prompt: &str) -> (u64, Option<ClipReason>) {
        let p = t.observe(f, prompt);
        (p.clip_index, p.reason)
    }

    #[test]
    fn identical_frames_stay_in_one_clip_and_a_cut_starts_the_next() {
        let mut t = ClipTracker::new(ClipTrackerSettings::default());
        let a = flat(64, 48, [0.2, 0.3, 0.4]);
        let b = flat(64, 48, [0.9, 0.1, 0.1]);
        assert_eq!(see(&mut t, &a, ""), (0, Some(ClipReason::Start)));
        assert_eq!(see(&mut t, &a, ""), (0, None));
        assert_eq!(see(&mut t, &b, ""), (1, Some(ClipReason::SceneCut)));
        assert_eq!(see(&mut t, &b, ""), (1, None));
    }

    #[test]
    fn max_frames_and_an_event_start_clips() {
        let mut t = ClipTracker::new(ClipTrackerSettings { clip_max_frames: 2, ..Default::default() });
        let a = flat(16, 16, [0.5; 3]);
        assert_eq!(see(&mut t, &a, "x").1, Some(ClipReason::Start));
        assert_eq!(see(&mut t, &a, "x").1, None);
        assert_eq!(see(&mut t, &a, "x").1, Some(ClipReason::MaxFrames));
        t.request(ClipRequest { prompt: Some("film".into()) });
        let p = t.observe(&a, "x");
        assert_eq!((p.clip_index, p.reason, p.prompt.as_str()), (2, Some(ClipReason::Event), "film"));
        assert_eq!(see(&mut t, &a, "x").1, None);
    }

    #[test]
    fn a_prompt_change_starts_a_clip_and_an_unchanged_prompt_does_not() {
        let mut t = ClipTracker::new(ClipTrackerSettings::default());
        let a = flat(16, 16, [0.5; 3]);
        assert_eq!(see(&mut t, &a, "a street"), (0, Some(ClipReason::Start)));
        assert_eq!(see(&mut t, &a, "a street"), (0, None));
        assert_eq!(see(&mut t, &a, "a racing car"), (1, Some(ClipReason::Prompt)));
        assert_eq!(see(&mut t, &a, "a racing car"), (1, None));
        // An event's prompt overrides the element's: switching to it is an event, not a prompt
        // change; then the element's prompt changing underneath it changes nothing.
        t.request(ClipRequest { prompt: Some("a crowd".into()) });
        assert_eq!(see(&mut t, &a, "a racing car"), (2, Some(ClipReason::Event)));
        assert_eq!(see(&mut t, &a, "something else"), (2, None));
    }

    /// A frame with structure: diagonal stripes and a bright square at `(ox, oy)`.
    fn textured(w: usize, h: usize, ox: usize, oy: usize, gain: f32) -> Frame {
        let mut data = vec![0f32; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let mut v = 0.3 + 0.2 * (((x + 2 * y) / 6) % 2) as f32;
                if (ox..ox + w / 4).contains(&x) && (oy..oy + h / 4).contains(&y) {
                    v = 0.9;
                }
                let i = (y * w + x) * 3;
                data[i..i + 3].copy_from_slice(&[v * gain, v * gain * 0.9, v * gain * 0.8]);
            }
        }
        Frame { width: w, height: h, pixels: Pixels::RgbF32(data) }
    }

    #[test]
    fn exposure_flicker_is_not_a_cut_but_new_structure_is() {
        let mut t = ClipTracker::new(ClipTrackerSettings::default());
        assert_eq!(see(&mut t, &textured(96, 64, 8, 8, 1.0), "").1, Some(ClipReason::Start));
        // Archival flicker: the same picture 15 % darker, then back.
        let p = t.observe(&textured(96, 64, 8, 8, 0.85), "");
        assert_eq!(p.reason, None);
        assert!(p.difference < 0.3, "flicker scored {}", p.difference);
        assert_eq!(see(&mut t, &textured(96, 64, 8, 8, 1.0), "").1, None);
        // Small motion of the square: same shot.
        assert_eq!(see(&mut t, &textured(96, 64, 11, 9, 1.0), "").1, None);
        // A flat frame (black) after a structured one, and back: two cuts.
        assert_eq!(see(&mut t, &flat(96, 64, [0.0; 3]), ""), (1, Some(ClipReason::SceneCut)));
        assert_eq!(see(&mut t, &textured(96, 64, 60, 40, 1.0), ""), (2, Some(ClipReason::SceneCut)));
    }

    #[test]
    fn positions_count_from_each_clip_start_and_tags_prompt_only_an_empty_property() {
        let mut t = ClipTracker::new(ClipTrackerSettings { clip_max_frames: 2, ..Default::default() });
        let a = flat(16, 16, [0.5; 3]);
        t.prompts.set_tag(Some("a title".into()));
        let ps: Vec<(u64, u64, String)> =
            (0..5).map(|_| t.observe(&a, "")).map(|p| (p.clip_index, p.position, p.prompt)).collect();
        let want = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)];
        for (p, w) in ps.iter().zip(want) {
            assert_eq!((p.0, p.1), w);
            assert_eq!(p.2, "a title");
        }
        assert_eq!(t.observe(&a, "a street").prompt, "a street");
    }

    #[test]
    fn first_clip_index_and_flush_keep_indices_unique() {
        let mut t = ClipTracker::new(ClipTrackerSettings { first_clip_index: 5, ..Default::default() });
        let a = flat(16, 16, [0.5; 3]);
        assert_eq!(see(&mut t, &a, ""), (5, Some(ClipReason::Start)));
        assert_eq!(see(&mut t, &a, ""), (5, None));
        t.reset();
        assert_eq!(see(&mut t, &a, ""), (6, Some(ClipReason::Start)));
    }
}
