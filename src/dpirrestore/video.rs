//! Conversions between GStreamer video frames and the engine's [`Image`].

use gst_video::VideoFormat;

use crate::engine::Image;

/// The raw formats the element accepts, in caps order.
pub const FORMATS: &[VideoFormat] = &[
    VideoFormat::Rgb,
    VideoFormat::Rgba,
    VideoFormat::Rgbx,
    VideoFormat::Bgrx,
    VideoFormat::Bgra,
    VideoFormat::Rgba64Le,
];

/// Byte layout of one pixel: component indices (in units of samples) and sample width.
#[derive(Debug, Clone, Copy)]
struct Layout {
    pixel_stride: usize,
    rgb: [usize; 3],
    alpha: Option<usize>,
    sixteen_bit: bool,
}

fn layout(format: VideoFormat) -> Option<Layout> {
    let l = |pixel_stride, rgb, alpha, sixteen_bit| Some(Layout { pixel_stride, rgb, alpha, sixteen_bit });
    match format {
        VideoFormat::Rgb => l(3, [0, 1, 2], None, false),
        VideoFormat::Rgba => l(4, [0, 1, 2], Some(3), false),
        VideoFormat::Rgbx => l(4, [0, 1, 2], None, false),
        VideoFormat::Bgrx => l(4, [2, 1, 0], None, false),
        VideoFormat::Bgra => l(4, [2, 1, 0], Some(3), false),
        VideoFormat::Rgba64Le => l(4, [0, 1, 2], Some(3), true),
        _ => None,
    }
}

/// Alpha plane kept aside while the colour goes through the model; `None` for opaque formats.
pub type Alpha = Option<Vec<f32>>;

/// Read a mapped frame (`data` with `stride` bytes per row) into an [`Image`], plus alpha.
pub fn read(format: VideoFormat, width: usize, height: usize, stride: usize, data: &[u8]) -> (Image, Alpha) {
    let lay = layout(format).expect("format checked at caps time");
    let mut img = Image::new(width, height);
    let mut alpha = lay.alpha.map(|_| vec![0f32; width * height]);
    for y in 0..height {
        let row = &data[y * stride..];
        for x in 0..width {
            let sample = |c: usize| -> f32 {
                if lay.sixteen_bit {
                    let o = (x * lay.pixel_stride + c) * 2;
                    u16::from_le_bytes([row[o], row[o + 1]]) as f32 / 65535.0
                } else {
                    row[x * lay.pixel_stride + c] as f32 / 255.0
                }
            };
            let i = (y * width + x) * 3;
            for k in 0..3 {
                img.data[i + k] = sample(lay.rgb[k]);
            }
            if let (Some(a), Some(ai)) = (alpha.as_mut(), lay.alpha) {
                a[y * width + x] = sample(ai);
            }
        }
    }
    (img, alpha)
}

/// Write an [`Image`] into a mapped output frame; alpha (input size) is upscaled by
/// nearest neighbour, padding bytes of `x` formats are set to opaque.
pub fn write(format: VideoFormat, img: &Image, alpha: &Alpha, alpha_width: usize, stride: usize, data: &mut [u8]) {
    let lay = layout(format).expect("format checked at caps time");
    let scale = (img.width / alpha_width.max(1)).max(1);
    for y in 0..img.height {
        let row = &mut data[y * stride..];
        for x in 0..img.width {
            let i = (y * img.width + x) * 3;
            let mut put = |c: usize, v: f32| {
                let v = v.clamp(0.0, 1.0);
                if lay.sixteen_bit {
                    let o = (x * lay.pixel_stride + c) * 2;
                    row[o..o + 2].copy_from_slice(&((v * 65535.0).round() as u16).to_le_bytes());
                } else {
                    row[x * lay.pixel_stride + c] = (v * 255.0).round() as u8;
                }
            };
            for k in 0..3 {
                put(lay.rgb[k], img.data[i + k]);
            }
            match (alpha, lay.alpha) {
                (Some(a), Some(ai)) => put(ai, a[(y / scale) * alpha_width + x / scale]),
                (None, Some(ai)) => put(ai, 1.0),
                _ if lay.pixel_stride == 4 && !lay.sixteen_bit => {
                    // RGBx/BGRx: the padding byte is the 4th.
                    row[x * 4 + 3] = 255;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb_and_bgrx_round_trip_through_image_with_padded_rows() {
        for format in [VideoFormat::Rgb, VideoFormat::Bgrx, VideoFormat::Rgba, VideoFormat::Rgba64Le] {
            let (w, h) = (5usize, 3usize);
            let bpp = if format == VideoFormat::Rgba64Le {
                8
            } else if format == VideoFormat::Rgb {
                3
            } else {
                4
            };
            let stride = (w * bpp).div_ceil(4) * 4 + 4; // padded rows
            let data: Vec<u8> = (0..stride * h).map(|i| (i * 37 % 251) as u8).collect();
            let (img, alpha) = read(format, w, h, stride, &data);
            let mut out = vec![0u8; stride * h];
            write(format, &img, &alpha, w, stride, &mut out);
            for y in 0..h {
                assert_eq!(
                    &out[y * stride..y * stride + w * bpp],
                    &data[y * stride..y * stride + w * bpp]
                        .iter()
                        .enumerate()
                        .map(|(i, &b)| if format == VideoFormat::Bgrx && i % 4 == 3 { 255 } else { b })
                        .collect::<Vec<u8>>()[..],
                    "{format:?} row {y}"
                );
            }
        }
    }
}
