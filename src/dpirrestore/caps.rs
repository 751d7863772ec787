//! Caps negotiation: the output is the input × `scale`, same format and rate.

use gst::prelude::*;

use super::video;

/// Caps on the other side of the element: `towards_src` multiplies sizes by `scale`, otherwise
/// divides (dropping sizes that aren't multiples of it).
pub fn transform(caps: &gst::Caps, scale: u32, towards_src: bool) -> gst::Caps {
    if caps.is_any() {
        return caps.clone();
    }
    let scale = scale as i32;
    let mut out = gst::Caps::new_empty();
    {
        let out = out.get_mut().unwrap();
        for (s, features) in caps.iter_with_features() {
            let mut s = s.to_owned();
            let mut ok = true;
            for field in ["width", "height"] {
                let Ok(v) = s.value(field) else { continue };
                let v = v.clone();
                if let Ok(n) = v.get::<i32>() {
                    if towards_src {
                        s.set(field, n.saturating_mul(scale));
                    } else if n % scale == 0 {
                        s.set(field, n / scale);
                    } else {
                        ok = false;
                    }
                } else if let Ok(r) = v.get::<gst::IntRange<i32>>() {
                    let (lo, hi) = if towards_src {
                        (r.min().saturating_mul(scale), r.max().saturating_mul(scale))
                    } else {
                        ((r.min() + scale - 1) / scale, r.max() / scale)
                    };
                    if lo > hi {
                        ok = false;
                    } else if lo == hi {
                        s.set(field, lo);
                    } else {
                        s.set(field, gst::IntRange::new(lo.max(1), hi.max(1)));
                    }
                } else {
                    // Lists and other forms: let the template decide.
                    s.remove_field(field);
                }
            }
            if ok {
                out.append_structure_full(s, Some(features.to_owned()));
            }
        }
    }
    out
}

/// The CAPS query on `pad`: the peer's caps on the other side, transformed, within the template.
pub fn query(
    pad: &gst::Pad,
    other: &gst::Pad,
    towards_src: bool,
    scale: u32,
    filter: Option<&gst::CapsRef>,
) -> gst::Caps {
    let filter = filter.map(|f| f.to_owned());
    let peer_filter = filter.as_ref().map(|f| transform(f, scale, !towards_src));
    let peer = other.peer_query_caps(peer_filter.as_ref());
    let mut caps = transform(&peer, scale, towards_src).intersect(&pad.pad_template_caps());
    if let Some(f) = &filter {
        caps = f.intersect_with_mode(&caps, gst::CapsIntersectMode::First);
    }
    caps
}

/// Validate input caps and derive the output caps (fixed); the error says what to put before
/// the element.
pub fn output(caps: &gst::Caps, scale: u32) -> Result<(gst_video::VideoInfo, gst_video::VideoInfo), String> {
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|_| format!("unusable caps {caps}"))?;
    if info.is_interlaced() {
        return Err(format!(
            "interlaced video ({:?}) is not supported: put `deinterlace` before dpirrestore",
            info.interlace_mode()
        ));
    }
    if !video::FORMATS.contains(&info.format()) {
        return Err(format!("format {:?} is not supported: put `videoconvert` before dpirrestore", info.format()));
    }
    let out = gst_video::VideoInfo::builder(info.format(), info.width() * scale, info.height() * scale)
        .fps(info.fps())
        .par(info.par())
        .colorimetry(&info.colorimetry())
        .chroma_site(info.chroma_site())
        .build()
        .map_err(|e| format!("cannot build output caps: {e}"))?;
    Ok((info, out))
}
