//! Fused softmax cross-entropy over a block of logit rows, in place: the block becomes the
//! gradient of the loss with respect to those logits, so the vocabulary-wide buffer is written
//! once and never copied.

use rayon::prelude::*;

use super::vec::{exp_shifted_sum, max};

/// Returns the summed loss (nats) of the rows of `logits` (`[rows, vocab]`) against `targets`.
/// With `grad_scale = Some(s)`, overwrites `logits` with `s * (softmax - onehot)`; otherwise the
/// block is left as scratch.
pub fn softmax_xent(logits: &mut [f32], targets: &[u32], vocab: usize, grad_scale: Option<f32>) -> f64 {
    debug_assert_eq!(logits.len(), targets.len() * vocab);
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let t = t as usize;
            let target_logit = row[t];
            let m = max(row);
            let z = exp_shifted_sum(row, 1.0, m) as f64;
            if let Some(s) = grad_scale {
                let k = (s as f64 / z) as f32;
                for v in row.iter_mut() {
                    *v *= k;
                }
                row[t] -= s;
            }
            z.ln() + m as f64 - target_logit as f64
        })
        .collect();
    losses.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::{assert_close, finite_diff, seeded};

    #[test]
    fn loss_and_gradient_match_oracle() {
        let (rows, vocab) = (6, 37);
        let logits = seeded(rows * vocab, 1, 8.0);
        let targets: Vec<u32> = (0..rows).map(|r| (r * 5 % vocab) as u32).collect();
        let mut block = logits.clone();
        let scale = 1.0 / rows as f32;
        let sum = softmax_xent(&mut block, &targets, vocab, Some(scale));
        let want = reference::cross_entropy(&logits, &targets, vocab);
        assert!((sum / rows as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        let fd = finite_diff(&logits, |l| reference::cross_entropy(l, &targets, vocab));
        assert_close(&block, &fd, 2e-3);
    }
}
