//! `dpir_transformer_*`: the DPIR transformer forward (contract: `sample`; the `debug_*`
//! intermediates are compared too and reported with DPIR_PARITY_VERBOSE, not enforced).
use anyhow::{Result, ensure};
use candle_core::DType;
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
    // Same weights in f64 (any float dtype must work) and the odd-latent error.
    let model64 = DpirTransformer::new(&cfg, case.var_builder("transformer")?.set_dtype(DType::F64))?;
    let args64 = ["hidden_states", "controlnet_cond", "encoder_hidden_states", "pooled_projections", "timestep"]
        .map(|n| case.io(n).and_then(|t| Ok(t.to_dtype(DType::F64)?)));
    let [h, c, e, p, t] = args64;
    let (h, c, e, p, t) = (h?, c?, e?, p?, t?);
    let s64 = model64.forward(&h, &c, &e, &p, &t)?;
    let (d64, _) = diff_stats(&s64, &case.io("sample")?)?;
    if std::env::var_os("DPIR_PARITY_VERBOSE").is_some() {
        eprintln!("{}::sample (f64 weights): max |diff| = {d64:.3e}", case.name);
    }
    ensure!(s64.dtype() == DType::F64 && d64 <= 1e-4, "f64 forward differs by {d64}");
    let (_, _, lh, lw) = h.dims4()?;
    let odd = model.forward(
        &h.narrow(3, 0, lw - 1)?.to_dtype(DType::F32)?,
        &c.narrow(3, 0, lw - 1)?.to_dtype(DType::F32)?,
        &e.to_dtype(DType::F32)?,
        &p.to_dtype(DType::F32)?,
        &t.to_dtype(DType::F32)?,
    );
    ensure!(
        odd.as_ref().is_err_and(|e| e.to_string().contains("must be even")),
        "odd latent width {lh}x{} must be refused clearly",
        lw - 1
    );

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
