//! `t5_encoder`: T5 v1.1 encoder without attention mask, plus the tokenizer.
use anyhow::{Result, ensure};
use candle_core::DType;
use gstdpir::model::t5::{T5Config, T5Encoder, T5Tokenizer};

use crate::common::{Case, Produced, T5_FLOAT, produced};

/// Tokenizing the case's prompts must reproduce the stored ids exactly.
pub fn check_tokenizer(case: &Case, prompts: &[String], ids_name: &str) -> Result<()> {
    let expected = case.io(ids_name)?.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let rel = case.cfg("/tokenizer_files/tokenizer_json")?.as_str().unwrap_or_default();
    let tok = T5Tokenizer::from_file(case.dir.join(rel), expected[0].len())?;
    for (p, e) in prompts.iter().zip(&expected) {
        let got: Vec<i64> = tok.encode(p)?.into_iter().map(i64::from).collect();
        ensure!(&got == e, "{}: tokenizer ids for {p:?}\n got {got:?}\nwant {e:?}", case.name);
    }
    Ok(())
}

pub fn run(case: &Case) -> Result<Vec<Produced>> {
    let prompts: Vec<String> = serde_json::from_value(case.cfg("/prompts")?.clone())?;
    check_tokenizer(case, &prompts, "input_ids")?;
    let cfg: T5Config = serde_json::from_value(case.library_config("text_encoder_three")?.clone())?;
    let model = T5Encoder::new(&cfg, case.var_builder("text_encoder_three")?)?;
    let ids = case.io("input_ids")?.to_dtype(DType::U32)?;
    let out = model.forward(&ids)?;
    Ok(vec![produced("last_hidden_state", out, T5_FLOAT)])
}
