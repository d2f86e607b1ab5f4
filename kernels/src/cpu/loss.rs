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

/// Per-row statistics of one rank's part of a vocabulary-parallel cross-entropy: its logits'
/// max, the sum of `exp(logit − max)` over them, and the target's logit when this rank holds the
/// target (0 otherwise).
pub const XENT_STATS: usize = 3;

/// Vocabulary-parallel cross-entropy, first half: `logits` (`[rows, vocab]`) are this rank's
/// vocabulary rows `first..first + vocab`. Writes each row's statistics into `stats`
/// (`[rows, XENT_STATS]`) and turns the row into `exp(logit − max)`, which `xent_finish` scales
/// into the gradient once the group's statistics are combined (`xent_combine`).
pub fn xent_stats(logits: &mut [f32], targets: &[u32], vocab: usize, first: usize, stats: &mut [f32]) {
    debug_assert_eq!(logits.len(), targets.len() * vocab);
    logits.par_chunks_mut(vocab).zip(targets.par_iter()).zip(stats.par_chunks_mut(XENT_STATS)).for_each(|((row, &t), st)| {
        let target = (t as usize).checked_sub(first).filter(|t| *t < vocab).map_or(0.0, |t| row[t]);
        let m = max(row);
        st[0] = m;
        st[1] = exp_shifted_sum(row, 1.0, m);
        st[2] = target;
    });
}

/// The whole vocabulary's statistics per row from every rank's (`parts`, in rank order): the
/// global max, the sum of `exp(logit − global max)` and the target's logit. Every rank combines
/// the same parts in the same order, so all get the same bits.
pub fn xent_combine(parts: &[&[f32]], out: &mut [f32]) {
    for (r, o) in out.chunks_mut(XENT_STATS).enumerate() {
        let at = r * XENT_STATS;
        let m = parts.iter().map(|p| p[at]).fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = parts.iter().map(|p| p[at + 1] as f64 * ((p[at] - m) as f64).exp()).sum();
        o[0] = m;
        o[1] = s as f32;
        o[2] = parts.iter().map(|p| p[at + 2]).sum();
    }
}

/// Vocabulary-parallel cross-entropy, second half: `rows` as `xent_stats` left them, `local` its
/// statistics and `global` the group's (`xent_combine`). Returns the summed loss of the rows
/// (the same on every rank); with `grad_scale = Some(s)`, the rows become this rank's part of
/// `s · (softmax − onehot)`.
pub fn xent_finish(
    rows: &mut [f32],
    targets: &[u32],
    vocab: usize,
    first: usize,
    local: &[f32],
    global: &[f32],
    grad_scale: Option<f32>,
) -> f64 {
    let losses: Vec<f64> = rows
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .zip(local.par_chunks(XENT_STATS).zip(global.par_chunks(XENT_STATS)))
        .map(|((row, &t), (l, g))| {
            let z = g[1] as f64;
            if let Some(s) = grad_scale {
                let k = (s as f64 * ((l[0] - g[0]) as f64).exp() / z) as f32;
                for v in row.iter_mut() {
                    *v *= k;
                }
                if let Some(t) = (t as usize).checked_sub(first).filter(|t| *t < vocab) {
                    row[t] -= s;
                }
            }
            z.ln() + g[0] as f64 - g[2] as f64
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

    /// The vocabulary split over three ranks unevenly (13 + 12 + 12 of 37): the combined loss
    /// and each rank's part of the gradient are the whole vocabulary's.
    #[test]
    fn vocabulary_parallel_halves_match_the_whole_vocabulary() {
        let (rows, vocab) = (6, 37);
        let logits = seeded(rows * vocab, 1, 8.0);
        let targets: Vec<u32> = (0..rows).map(|r| (r * 5 % vocab) as u32).collect();
        let scale = 1.0 / rows as f32;
        let mut whole = logits.clone();
        let want = softmax_xent(&mut whole, &targets, vocab, Some(scale));
        let parts = [0..13, 13..25, 25..37];
        let mut slices: Vec<Vec<f32>> = Vec::new();
        let mut stats: Vec<Vec<f32>> = Vec::new();
        for p in &parts {
            let mut s: Vec<f32> = (0..rows).flat_map(|r| logits[r * vocab + p.start..r * vocab + p.end].to_vec()).collect();
            let mut st = vec![0.0; rows * XENT_STATS];
            xent_stats(&mut s, &targets, p.len(), p.start, &mut st);
            slices.push(s);
            stats.push(st);
        }
        let mut global = vec![0.0; rows * XENT_STATS];
        xent_combine(&stats.iter().map(|s| &s[..]).collect::<Vec<_>>(), &mut global);
        for (i, p) in parts.iter().enumerate() {
            let got = xent_finish(&mut slices[i], &targets, p.len(), p.start, &stats[i], &global, Some(scale));
            assert!((got - want).abs() < 1e-5 * want, "rank {i}: {got} vs {want}");
            let expect: Vec<f32> = (0..rows).flat_map(|r| whole[r * vocab + p.start..r * vocab + p.end].to_vec()).collect();
            assert_close(&slices[i], &expect, 1e-6);
        }
    }
}
