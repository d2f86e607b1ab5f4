//! `gantry eval`'s loss: the mean next-token cross-entropy over every full window of a token
//! stream, window `i` being tokens `[i·T, i·T + T]` for `i = 0 .. ⌊(N−1)/T⌋ − 1`.

use serde::Serialize;

use crate::data::Tokens;
use crate::models::Model;
use crate::Result;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    /// Tokens predicted.
    pub tokens: u64,
    pub windows: u64,
}

pub fn evaluate(
    model: &Model,
    params: &[f32],
    tokens: &Tokens,
    seq: usize,
    batch: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<EvalResult> {
    let windows = tokens.len().saturating_sub(1) / seq;
    let mut acts = model.activations(batch.min(windows.max(1)), seq)?;
    let mut total = 0.0;
    let batch = acts.batch();
    let mut buf = Vec::with_capacity(batch * (seq + 1));
    let mut i = 0;
    while i < windows {
        let b = batch.min(windows - i);
        buf.clear();
        for w in i..i + b {
            tokens.extend_window(w * seq..w * seq + seq + 1, &mut buf);
        }
        total += model.loss(params, &mut acts, &buf)?;
        i += b;
        progress(i as u64, windows as u64);
    }
    let predicted = (windows * seq) as u64;
    Ok(EvalResult { loss: if predicted > 0 { total / predicted as f64 } else { f64::NAN }, tokens: predicted, windows: windows as u64 })
}
