//! `dpir_transformer_*`: the DPIR transformer forward (contract: `sample`; the `debug_*`
//! intermediates are compared too and reported with DPIR_PARITY_VERBOSE, not enforced).
use anyhow::Result;
use gstdpir::model::transformer::{DpirTransformer, DpirTransformerConfig};

use crate::common::{Case, FLOAT, Produced, diff_stats, produced};

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let cfg: DpirTransformerConfig = serde_json::from_value(case.library_config("transformer")?.clone())?;
    let model = DpirTransformer::new(&cfg, case.var_builder("transformer")?)?;
    let (sample, dbg) = model.forward_with_debug(
        &case.io_f32("hidden_states")?,
        &case.io_f32("controlnet_cond")?,
        &case.io_f32("encoder_hidden_states")?,
        &case.io_f32("pooled_projections")?,
        &case.io_f32("timestep")?,
    )?;
    let debug = [
        ("debug_patch_embed", &dbg.patch_embed),
        ("debug_temb", &dbg.temb),
        ("debug_context_embedded", &dbg.context_embedded),
        ("debug_control_conv_out", &dbg.control_conv_out),
        ("debug_block0_out_hidden", &dbg.block0_out_hidden),
        ("debug_block0_out_context", &dbg.block0_out_context),
        ("debug_after_block0_plus_control", &dbg.after_block0_plus_control),
    ];
    let mut out = vec![produced("sample", sample, FLOAT)];
    for (name, t) in debug {
        if let Ok(expected) = case.io(name) {
            if std::env::var_os("DPIR_PARITY_VERBOSE").is_some() {
                let (max, _) = diff_stats(t, &expected)?;
                eprintln!("{}::{name} (debug): max |diff| = {max:.3e}", case.name);
            }
            out.push(produced(name, t.clone(), FLOAT));
        }
    }
    Ok(out)
}
