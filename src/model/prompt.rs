//! DPIR's dual prompt (official `encode_multi_modal_prompt` → `_encode_prompt_with_clip_vit`,
//! `tiling_image`, `sliding_windows`, `_encode_prompt_with_t5`).
//!
//! ```text
//! local  = enc_one(px_patch).last_hidden_state            [1, 50, c1]   (raw, before post-LN)
//! pooled = [local[:, 0] ‖ enc_two(px_patch).image_embeds]   [1, c1 + c2]
//! global = per tile [enc_one(px_tile) CLS ‖ enc_two(px_tile).image_embeds]   [1, N, c1 + c2]
//! tokens = [pad_channels(local, c1 + c2) ‖ global] → pad/truncate to 77 tokens
//!          → pad channels to the T5 width → ‖ T5(ids, no mask)   [1, 77 + 256, d_t5]
//! ```
//!
//! The three parts are separate calls so that a clip cache can keep the text embedding (per
//! prompt string) and the global tokens (per key frame) and recompute only the local part
//! (per frame or tile): [`super::t5::TextEncoder::embed`], [`ImagePromptEncoder::global_prompt`],
//! [`ImagePromptEncoder::local_prompt`], then [`assemble`].

use candle_core::{Device, Result, Tensor, bail};

use super::clip::{ClipVisionModel, raw_cls};
use super::preprocess::{ClipPreprocessConfig, RgbImage};

/// How the global image is cut into 1024-px CLIP tiles.
///
/// [`TilingMode::Reference`] reproduces the official `sliding_windows`: per axis, starts
/// `0, stride, 2·stride, …` while `start <= side − tile`, plus `side − tile` when
/// `(side − tile) mod stride != 0` (Python's modulo, never negative). For a side shorter than
/// the tile the only start is negative, and Python slicing `[side − tile : side]` then keeps
/// just the **last `tile − side` rows/columns** when `tile/2 <= side < tile` (the bottom 336 rows
/// of a 688-row image: the rest of the picture never reaches the global prompt), and the whole
/// side when `side <= tile/2`. The official code appends nothing for a side of exactly
/// `tile − stride` (64 px) and then crashes on an empty concatenation; here that axis gets the
/// same one negative-start window any other short side gets, whose slice is the whole side.
/// [`TilingMode::Corrected`] covers every pixel: a side no longer than the tile is one
/// whole-side window `[0, side)`; longer sides use the official windows (which already end
/// flush with the border). The two modes differ only for sides in `(tile/2, tile)`, i.e. for
/// every non-square DPIR inference frame (long side 1024): choose `Reference` for parity with
/// the published model's behaviour, `Corrected` for a global prompt that sees the whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TilingMode {
    #[default]
    Reference,
    Corrected,
}

/// A tile window `(h0, h1, w0, w1)`, half-open; raw boxes may have negative starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileBox {
    pub h0: i64,
    pub h1: i64,
    pub w0: i64,
    pub w1: i64,
}

/// One global tile: the window as computed (`raw`) and the pixels really taken (`effective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile {
    pub raw: TileBox,
    pub effective: TileBox,
}

/// Tile geometry and prompt lengths (DPIR: 1024, 960, 77).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptConfig {
    pub tile_size: usize,
    pub tile_stride: usize,
    /// Number of CLIP tokens (local + global) before the T5 tokens.
    pub clip_tokens: usize,
    pub tiling: TilingMode,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self { tile_size: 1024, tile_stride: 960, clip_tokens: 77, tiling: TilingMode::Reference }
    }
}

/// Official per-axis window starts (may be empty for `side == tile − stride`).
fn reference_starts(side: i64, tile: i64, stride: i64) -> Vec<i64> {
    let last = side - tile;
    let mut v: Vec<i64> = (0..).map(|i| i * stride).take_while(|&s| s <= last).collect();
    if last.rem_euclid(stride) != 0 {
        v.push(last);
    }
    v
}

/// Python slice `[start : start + tile]` of an axis of length `side`, as `[a, b)`.
fn effective(start: i64, tile: i64, side: i64) -> (i64, i64) {
    let norm = |i: i64| {
        if i < 0 { (side + i).max(0) } else { i.min(side) }
    };
    (norm(start), norm(start + tile))
}

/// Windows along one axis: `(raw_start, raw_end, eff_start, eff_end)`.
fn axis_windows(side: usize, cfg: &PromptConfig) -> Vec<(i64, i64, i64, i64)> {
    let (s, t, st) = (side as i64, cfg.tile_size as i64, cfg.tile_stride as i64);
    match cfg.tiling {
        TilingMode::Corrected if s <= t => vec![(0, s, 0, s)],
        _ => {
            let mut starts = reference_starts(s, t, st);
            if starts.is_empty() {
                starts.push(s - t); // the official code crashes here (side == tile − stride)
            }
            starts
                .into_iter()
                .map(|a| {
                    let (e0, e1) = effective(a, t, s);
                    (a, a + t, e0, e1)
                })
                .collect()
        }
    }
}

/// Global tiles of a `width × height` image, rows outer, columns inner.
pub fn global_tiles(width: usize, height: usize, cfg: &PromptConfig) -> Result<Vec<Tile>> {
    if width == 0 || height == 0 {
        bail!("global image is empty");
    }
    if cfg.tile_size == 0 || cfg.tile_stride == 0 {
        bail!("tile size and stride must be positive");
    }
    let rows = axis_windows(height, cfg);
    let cols = axis_windows(width, cfg);
    let mut v = Vec::with_capacity(rows.len() * cols.len());
    for &(h0, h1, eh0, eh1) in &rows {
        for &(w0, w1, ew0, ew1) in &cols {
            v.push(Tile { raw: TileBox { h0, h1, w0, w1 }, effective: TileBox { h0: eh0, h1: eh1, w0: ew0, w1: ew1 } });
        }
    }
    Ok(v)
}

/// Local prompt of one patch (per frame / tile): recomputed every frame.
#[derive(Debug, Clone)]
pub struct LocalPrompt {
    /// Encoder-one `last_hidden_state`, raw, `[1, tokens, c1]`.
    pub tokens: Tensor,
    /// Encoder-two `image_embeds` of the same pixels, `[1, c2]`.
    pub image_embeds_two: Tensor,
    /// `[raw CLS ‖ image_embeds_two]`, `[1, c1 + c2]`.
    pub pooled: Tensor,
}

/// Global prompt of one key frame: cacheable for the whole clip.
#[derive(Debug, Clone)]
pub struct GlobalPrompt {
    /// One token per tile, `[1, N, c1 + c2]`.
    pub tokens: Tensor,
    /// Encoder-one raw CLS per tile, `[N, c1]`.
    pub cls_one: Tensor,
    /// Encoder-two `image_embeds` per tile, `[N, c2]`.
    pub image_embeds_two: Tensor,
    pub tiles: Vec<Tile>,
}

/// The transformer's conditioning.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[1, clip_tokens + t5_len, d_t5]`.
    pub prompt_embeds: Tensor,
    /// `[1, c1 + c2]`.
    pub pooled: Tensor,
}

/// The two CLIP vision towers and the shared pre-processing.
pub struct ImagePromptEncoder {
    pub one: ClipVisionModel,
    pub two: ClipVisionModel,
    pub preprocess: ClipPreprocessConfig,
    pub config: PromptConfig,
}

impl ImagePromptEncoder {
    pub fn new(one: ClipVisionModel, two: ClipVisionModel, config: PromptConfig) -> Result<Self> {
        let preprocess = ClipPreprocessConfig::default();
        for (name, m) in [("one", &one), ("two", &two)] {
            let s = m.config().image_size;
            if s != preprocess.crop_height || s != preprocess.crop_width {
                bail!("image encoder {name}: image_size {s} != CLIP crop {}", preprocess.crop_height);
            }
        }
        Ok(Self { one, two, preprocess, config })
    }

    fn device(&self) -> &Device {
        self.one.device()
    }

    /// Pooled width `c1 + c2` (SD3: 768 + 1280 = 2048).
    pub fn pooled_width(&self) -> usize {
        self.one.config().hidden_size + self.two.config().projection_dim
    }

    /// Local tokens + pooled vector of the patch being restored (one pixel tensor for both
    /// towers, as the official code does).
    pub fn local_prompt(&self, patch: &RgbImage) -> Result<LocalPrompt> {
        let px = self.preprocess.pixel_values(&[patch], self.device())?;
        let o1 = self.one.forward(&px)?;
        let o2 = self.two.forward(&px)?;
        let cls = raw_cls(&o1)?;
        let e2 = o2.image_embeds.to_device(cls.device())?.to_dtype(cls.dtype())?;
        let pooled = Tensor::cat(&[&cls, &e2], 1)?;
        Ok(LocalPrompt { tokens: o1.last_hidden_state, image_embeds_two: e2, pooled })
    }

    /// One token per global tile of `image` (the clip's key frame).
    pub fn global_prompt(&self, image: &RgbImage) -> Result<GlobalPrompt> {
        let (tiles, px) = self.global_pixel_values(image)?;
        let cls_one = raw_cls(&self.one.forward(&px)?)?;
        let e2 = self.two.forward(&px)?.image_embeds.to_device(cls_one.device())?.to_dtype(cls_one.dtype())?;
        let tokens = Tensor::cat(&[&cls_one, &e2], 1)?.unsqueeze(0)?;
        Ok(GlobalPrompt { tokens, cls_one, image_embeds_two: e2, tiles })
    }

    /// The global tiles of `image` and their CLIP pixel values `[N, 3, 224, 224]` (the CPU
    /// pre-processing part of [`Self::global_prompt`]).
    pub fn global_pixel_values(&self, image: &RgbImage) -> Result<(Vec<Tile>, Tensor)> {
        let tiles = global_tiles(image.width, image.height, &self.config)?;
        let crops = tiles
            .iter()
            .map(|t| {
                let e = t.effective;
                image.crop(e.w0 as usize, e.h0 as usize, e.w1 as usize, e.h1 as usize)
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&RgbImage> = crops.iter().collect();
        let px = self.preprocess.pixel_values(&refs, self.device())?;
        Ok((tiles, px))
    }
}

/// Zero-pad the last dimension of `[1, n, c]` to `width`.
fn pad_channels(t: &Tensor, width: usize) -> Result<Tensor> {
    let c = t.dim(2)?;
    if c > width {
        bail!("cannot pad {c} channels to {width}");
    }
    Ok(if c == width { t.clone() } else { t.pad_with_zeros(2, 0, width - c)? })
}

/// `[local ‖ global]` tokens padded/truncated to `clip_tokens`, padded to the T5 width,
/// followed by the T5 tokens. `text` is `[1, L, d_t5]` from [`super::t5::TextEncoder::embed`].
pub fn assemble(local: &LocalPrompt, global: &GlobalPrompt, text: &Tensor, clip_tokens: usize) -> Result<PromptEmbeds> {
    let width = local.pooled.dim(1)?;
    let d_t5 = text.dim(2)?;
    let dev = text.device();
    let dt = text.dtype();
    let loc = pad_channels(&local.tokens.to_device(dev)?.to_dtype(dt)?, width)?;
    let glob = global.tokens.to_device(dev)?.to_dtype(dt)?;
    if glob.dim(2)? != width {
        bail!("global tokens have {} channels, local pooled {width}", glob.dim(2)?);
    }
    let mut toks = Tensor::cat(&[&loc, &glob], 1)?;
    let n = toks.dim(1)?;
    toks = if n >= clip_tokens { toks.narrow(1, 0, clip_tokens)? } else { toks.pad_with_zeros(1, 0, clip_tokens - n)? };
    let toks = pad_channels(&toks, d_t5)?;
    let prompt_embeds = Tensor::cat(&[&toks, text], 1)?;
    Ok(PromptEmbeds { prompt_embeds, pooled: local.pooled.to_device(dev)?.to_dtype(dt)? })
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<ImagePromptEncoder>();
    send_sync::<LocalPrompt>();
    send_sync::<GlobalPrompt>();
    send_sync::<PromptEmbeds>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(w: usize, h: usize, mode: TilingMode) -> Vec<([i64; 4], [i64; 4])> {
        let cfg = PromptConfig { tiling: mode, ..Default::default() };
        global_tiles(w, h, &cfg)
            .unwrap()
            .into_iter()
            .map(|t| {
                let (r, e) = (t.raw, t.effective);
                ([r.h0, r.h1, r.w0, r.w1], [e.h0, e.h1, e.w0, e.w1])
            })
            .collect()
    }

    #[test]
    fn reference_tiling_matches_fixtures() {
        let b = boxes(1100, 1040, TilingMode::Reference);
        assert_eq!(
            b.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![[0, 1024, 0, 1024], [0, 1024, 76, 1100], [16, 1040, 0, 1024], [16, 1040, 76, 1100]]
        );
        assert_eq!(boxes(1024, 688, TilingMode::Reference), vec![([-336, 688, 0, 1024], [352, 688, 0, 1024])]);
        assert_eq!(boxes(96, 80, TilingMode::Reference), vec![([-944, 80, -928, 96], [0, 80, 0, 96])]);
    }

    #[test]
    fn side_64_does_not_crash() {
        for mode in [TilingMode::Reference, TilingMode::Corrected] {
            let b = boxes(96, 64, mode);
            assert_eq!(b.len(), 1);
            assert_eq!(b[0].1, [0, 64, 0, 96]);
        }
    }

    #[test]
    fn corrected_covers_everything() {
        assert_eq!(boxes(1024, 688, TilingMode::Corrected), vec![([0, 688, 0, 1024], [0, 688, 0, 1024])]);
        assert_eq!(boxes(1100, 1040, TilingMode::Corrected), boxes(1100, 1040, TilingMode::Reference));
        for (w, h) in [(1, 1), (5000, 333), (1983, 2900)] {
            let b = boxes(w, h, TilingMode::Corrected);
            let mut cov = vec![false; w * h];
            for (_, e) in b {
                for y in e[0]..e[1] {
                    for x in e[2]..e[3] {
                        cov[y as usize * w + x as usize] = true;
                    }
                }
            }
            assert!(cov.iter().all(|&c| c));
        }
    }
}
