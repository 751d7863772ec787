//! `wavelet_color_fix`: StableSR wavelet and AdaIN colour fixes on real uint8 pairs,
//! float results (before clamp) and the truncating uint8 conversion.
use anyhow::Result;
use gstdpir::model::color_fix::{ColorFix, WAVELET_LEVELS, apply, from_uint8_hwc, to_uint8_hwc, wavelet_decomposition};

use crate::common::{Case, FLOAT, Produced, UINT8, produced};

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let mut out = Vec::new();
    let mut i = 0;
    while let (Ok(content), Ok(style)) = (case.io(&format!("content_uint8_{i}")), case.io(&format!("style_uint8_{i}")))
    {
        let c = from_uint8_hwc(&content)?;
        let s = from_uint8_hwc(&style)?;
        let wav = apply(ColorFix::Wavelet, &c, &s)?;
        let ada = apply(ColorFix::Adain, &c, &s)?;
        let (high, low) = wavelet_decomposition(&c, WAVELET_LEVELS)?;
        out.push(produced(&format!("wavelet_uint8_{i}"), to_uint8_hwc(&wav)?, UINT8));
        out.push(produced(&format!("adain_uint8_{i}"), to_uint8_hwc(&ada)?, UINT8));
        out.push(produced(&format!("wavelet_float_{i}"), wav, FLOAT));
        out.push(produced(&format!("adain_float_{i}"), ada, FLOAT));
        out.push(produced(&format!("debug_content_high_{i}"), high, FLOAT));
        out.push(produced(&format!("debug_content_low_{i}"), low, FLOAT));
        i += 1;
    }
    anyhow::ensure!(i > 0, "{}: no content_uint8_0/style_uint8_0 pair", case.name);
    Ok(out)
}
