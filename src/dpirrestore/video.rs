//! Conversions between GStreamer video frames and the engine's [`Frame`] (in) and [`Image`]
//! (out), one pass each, padded rows (the plane stride) honoured.

use gst_video::VideoFormat;

use crate::engine::{Frame, Image, Pixels};

/// The raw formats the element accepts, in caps order (deep formats first is not wanted:
/// `videoconvert` picks the first format that keeps the input's depth).
pub const FORMATS: &[VideoFormat] = &[
    VideoFormat::Rgb,
    VideoFormat::Rgba,
    VideoFormat::Rgbx,
    VideoFormat::Bgrx,
    VideoFormat::Bgra,
    VideoFormat::Rgba64Le,
    VideoFormat::Rgb10a2Le,
    VideoFormat::Bgr10a2Le,
];

/// How one pixel is stored.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// One byte per component: byte offsets of R, G, B (and alpha) in a pixel of `bytes`.
    Bytes { bytes: usize, rgb: [usize; 3], alpha: Option<usize> },
    /// Four little-endian u16 per pixel: R, G, B, A.
    Rgba64,
    /// One little-endian u32 per pixel: 10-bit components at bit offsets `rgb`, 2-bit alpha on top.
    Packed10 { rgb: [u32; 3] },
}

fn layout(format: VideoFormat) -> Option<Layout> {
    let b = |bytes, rgb, alpha| Some(Layout::Bytes { bytes, rgb, alpha });
    match format {
        VideoFormat::Rgb => b(3, [0, 1, 2], None),
        VideoFormat::Rgba => b(4, [0, 1, 2], Some(3)),
        VideoFormat::Rgbx => b(4, [0, 1, 2], None),
        VideoFormat::Bgrx => b(4, [2, 1, 0], None),
        VideoFormat::Bgra => b(4, [2, 1, 0], Some(3)),
        VideoFormat::Rgba64Le => Some(Layout::Rgba64),
        // GStreamer's names list components from the least significant bits up.
        VideoFormat::Rgb10a2Le => Some(Layout::Packed10 { rgb: [0, 10, 20] }),
        VideoFormat::Bgr10a2Le => Some(Layout::Packed10 { rgb: [20, 10, 0] }),
        _ => None,
    }
}

/// Bits per colour component of a supported format (what the engine is told as `depth`).
pub fn depth(format: VideoFormat) -> u32 {
    match layout(format) {
        Some(Layout::Rgba64) => 16,
        Some(Layout::Packed10 { .. }) => 10,
        _ => 8,
    }
}

/// Alpha plane kept aside while the colour goes through the model; `None` for opaque formats.
pub type Alpha = Option<Vec<f32>>;

/// Read a mapped frame (`data` with `stride` bytes per row) into a [`Frame`] (8-bit formats as
/// bytes, deeper ones as floats), plus alpha.
pub fn read(format: VideoFormat, width: usize, height: usize, stride: usize, data: &[u8]) -> (Frame, Alpha) {
    let lay = layout(format).expect("format checked at caps time");
    let has_alpha = matches!(lay, Layout::Bytes { alpha: Some(_), .. } | Layout::Rgba64 | Layout::Packed10 { .. });
    let mut alpha = has_alpha.then(|| vec![0f32; width * height]);
    let pixels = match lay {
        Layout::Bytes { bytes, rgb, alpha: a_off } => {
            let mut v = vec![0u8; width * height * 3];
            for y in 0..height {
                let row = &data[y * stride..y * stride + width * bytes];
                for (x, p) in row.chunks_exact(bytes).enumerate() {
                    let i = y * width + x;
                    v[3 * i..3 * i + 3].copy_from_slice(&rgb.map(|c| p[c]));
                    if let (Some(al), Some(c)) = (alpha.as_mut(), a_off) {
                        al[i] = p[c] as f32 / 255.0;
                    }
                }
            }
            Pixels::Rgb8(v)
        }
        Layout::Rgba64 => {
            let mut v = vec![0f32; width * height * 3];
            for y in 0..height {
                let row = &data[y * stride..y * stride + width * 8];
                for (x, p) in row.chunks_exact(8).enumerate() {
                    let i = y * width + x;
                    let s = |c: usize| u16::from_le_bytes([p[2 * c], p[2 * c + 1]]) as f32 / 65535.0;
                    v[3 * i..3 * i + 3].copy_from_slice(&[s(0), s(1), s(2)]);
                    if let Some(al) = alpha.as_mut() {
                        al[i] = s(3);
                    }
                }
            }
            Pixels::RgbF32(v)
        }
        Layout::Packed10 { rgb } => {
            let mut v = vec![0f32; width * height * 3];
            for y in 0..height {
                let row = &data[y * stride..y * stride + width * 4];
                for (x, p) in row.chunks_exact(4).enumerate() {
                    let i = y * width + x;
                    let w = u32::from_le_bytes(p.try_into().unwrap());
                    v[3 * i..3 * i + 3].copy_from_slice(&rgb.map(|o| ((w >> o) & 0x3ff) as f32 / 1023.0));
                    if let Some(al) = alpha.as_mut() {
                        al[i] = (w >> 30) as f32 / 3.0;
                    }
                }
            }
            Pixels::RgbF32(v)
        }
    };
    (Frame { width, height, pixels }, alpha)
}

/// Write an [`Image`] into a mapped output frame; alpha (input size) is upscaled by
/// nearest neighbour, padding bytes of `x` formats are set to opaque.
pub fn write(format: VideoFormat, img: &Image, alpha: &Alpha, alpha_width: usize, stride: usize, data: &mut [u8]) {
    let lay = layout(format).expect("format checked at caps time");
    let scale = (img.width / alpha_width.max(1)).max(1);
    let q = |v: f32, max: f32| (v.clamp(0.0, 1.0) * max).round();
    let n = img.width * img.height;
    let (r, rest) = img.planes.split_at(n);
    let (g, b) = rest.split_at(n);
    for y in 0..img.height {
        let row = &mut data[y * stride..];
        for x in 0..img.width {
            let i = y * img.width + x;
            let rgb = [r[i], g[i], b[i]];
            let a = alpha.as_ref().map_or(1.0, |a| a[(y / scale) * alpha_width + x / scale]);
            match lay {
                Layout::Bytes { bytes, rgb: off, alpha: a_off } => {
                    let p = &mut row[x * bytes..(x + 1) * bytes];
                    for k in 0..3 {
                        p[off[k]] = q(rgb[k], 255.0) as u8;
                    }
                    match a_off {
                        Some(o) => p[o] = q(a, 255.0) as u8,
                        // RGBx/BGRx: the padding byte is the 4th.
                        None if bytes == 4 => p[3] = 255,
                        None => {}
                    }
                }
                Layout::Rgba64 => {
                    for (c, v) in [rgb[0], rgb[1], rgb[2], a].into_iter().enumerate() {
                        row[x * 8 + 2 * c..x * 8 + 2 * c + 2].copy_from_slice(&(q(v, 65535.0) as u16).to_le_bytes());
                    }
                }
                Layout::Packed10 { rgb: off } => {
                    let mut v = (q(a, 3.0) as u32) << 30;
                    for k in 0..3 {
                        v |= (q(rgb[k], 1023.0) as u32) << off[k];
                    }
                    row[x * 4..x * 4 + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gst::prelude::*;

    /// A frame as the planar image an engine returns.
    fn to_image(frame: &Frame) -> Image {
        Image::upscale_nearest(frame, 1)
    }

    fn bytes_per_pixel(format: VideoFormat) -> usize {
        match format {
            VideoFormat::Rgb => 3,
            VideoFormat::Rgba64Le => 8,
            _ => 4,
        }
    }

    /// A frame whose R, G, B and A differ in every pixel (and from pixel to pixel), in `format`,
    /// made by GStreamer's own `videoconvert` from RGBA64_LE: a swapped channel or a wrong bit
    /// offset in [`read`] cannot go unseen.
    fn reference_frame(format: VideoFormat, w: usize, h: usize) -> (Vec<u8>, usize, Vec<[u16; 4]>) {
        gst::init().unwrap();
        let src: Vec<[u16; 4]> = (0..w * h)
            .map(|i| {
                let i = i as u32;
                // Distinct, well apart even at 2-bit alpha, and far from each other per channel.
                [
                    (9000 + i * 3001) % 65536,
                    (60000 + i * 7919) % 65536,
                    (30000 + i * 104_729) % 65536,
                    [0, 21845, 43690, 65535][(i % 4) as usize],
                ]
                .map(|v| v as u16)
            })
            .collect();
        let mut raw = Vec::with_capacity(w * h * 8);
        for p in &src {
            for c in p {
                raw.extend_from_slice(&c.to_le_bytes());
            }
        }
        let in_info = gst_video::VideoInfo::builder(VideoFormat::Rgba64Le, w as u32, h as u32).build().unwrap();
        let out_info = gst_video::VideoInfo::builder(format, w as u32, h as u32).build().unwrap();
        let pipeline = gst::parse::launch(&format!(
            "appsrc name=src caps=\"{}\" ! videoconvert dither=none ! capsfilter caps=\"{}\" ! appsink name=sink",
            in_info.to_caps().unwrap(),
            out_info.to_caps().unwrap()
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let appsrc = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
        let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        appsrc.push_buffer(gst::Buffer::from_mut_slice(raw)).unwrap();
        appsrc.end_of_stream().unwrap();
        let sample = sink.pull_sample().expect("videoconvert output");
        let data = sample.buffer().unwrap().map_readable().unwrap().to_vec();
        pipeline.set_state(gst::State::Null).unwrap();
        (data, out_info.stride()[0] as usize, src)
    }

    /// Every format is read as GStreamer lays it out (checked against `videoconvert`), and
    /// written back byte for byte, padded rows included.
    #[test]
    fn every_format_reads_what_videoconvert_wrote_and_writes_it_back() {
        let (w, h) = (7usize, 3usize);
        for &format in FORMATS {
            let (data, stride, src) = reference_frame(format, w, h);
            let (frame, alpha) = read(format, w, h, stride, &data);
            let bits = depth(format);
            let tol = 1.0 / ((1u32 << bits.min(8)) - 1) as f32 + 1e-6;
            for (i, p) in src.iter().enumerate() {
                let want = p.map(|v| v as f32 / 65535.0);
                for (k, got) in frame.pixel(i % w, i / w).into_iter().enumerate() {
                    assert!((got - want[k]).abs() <= tol, "{format:?} pixel {i} channel {k}: {got} vs {}", want[k]);
                }
                if let Some(a) = &alpha {
                    let has_alpha = !matches!(format, VideoFormat::Rgbx | VideoFormat::Bgrx | VideoFormat::Rgb);
                    if has_alpha {
                        assert!((a[i] - want[3]).abs() <= tol, "{format:?} pixel {i} alpha: {} vs {}", a[i], want[3]);
                    }
                }
            }
            let mut out = vec![0u8; data.len()];
            write(format, &to_image(&frame), &alpha, w, stride, &mut out);
            // The padding byte of RGBx/BGRx carries nothing: compared everywhere else.
            let bpp = bytes_per_pixel(format);
            let pad = matches!(format, VideoFormat::Rgbx | VideoFormat::Bgrx);
            for y in 0..h {
                for i in 0..w * bpp {
                    if !(pad && i % 4 == 3) {
                        assert_eq!(out[y * stride + i], data[y * stride + i], "{format:?} row {y} byte {i}");
                    }
                }
            }
        }
    }

    /// Deep formats keep steps far below one 8-bit level.
    #[test]
    fn sixteen_and_ten_bit_values_survive_a_round_trip_unrounded() {
        let (w, h) = (4usize, 1usize);
        let mut data = Vec::new();
        for v in [30000u16, 30001, 30002, 30003] {
            for c in [v, v, v, 65535] {
                data.extend_from_slice(&c.to_le_bytes());
            }
        }
        let (frame, alpha) = read(VideoFormat::Rgba64Le, w, h, w * 8, &data);
        let reds: Vec<f32> = (0..w).map(|x| frame.pixel(x, 0)[0]).collect();
        assert!(reds.windows(2).all(|p| p[1] > p[0]), "{reds:?}");
        let mut out = vec![0u8; data.len()];
        write(VideoFormat::Rgba64Le, &to_image(&frame), &alpha, w, w * 8, &mut out);
        assert_eq!(out, data);
    }

    /// At ×2 and ×4 each input alpha value covers a `scale × scale` block of the output, in
    /// every format with alpha.
    #[test]
    fn alpha_is_upscaled_with_the_picture() {
        for format in [VideoFormat::Rgba, VideoFormat::Bgra, VideoFormat::Rgba64Le, VideoFormat::Rgb10a2Le] {
            for scale in [2usize, 4] {
                let (w, h) = (3usize, 2usize);
                let alpha: Alpha = Some(vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
                let black = Frame { width: w, height: h, pixels: Pixels::Rgb8(vec![0; w * h * 3]) };
                let img = Image::upscale_nearest(&black, scale);
                let bpp = bytes_per_pixel(format);
                let stride = img.width * bpp;
                let mut out = vec![0u8; stride * img.height];
                write(format, &img, &alpha, w, stride, &mut out);
                let (_, back) = read(format, img.width, img.height, stride, &out);
                let back = back.unwrap();
                for y in 0..img.height {
                    for x in 0..img.width {
                        let want = alpha.as_ref().unwrap()[(y / scale) * w + x / scale];
                        assert_eq!(back[y * img.width + x], want, "{format:?} ×{scale} ({x},{y})");
                    }
                }
            }
        }
    }
}
