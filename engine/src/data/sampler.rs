//! Which windows of the token stream each optimizer step trains on.
//!
//! The stream is cut into non-overlapping windows of `seq_len + 1` tokens (starting every
//! `seq_len` tokens, so each target is predicted once per epoch). Each epoch visits every window
//! once in an order drawn from `(seed, epoch)`; sequence `j` of step `s` is window number
//! `s · global_batch + j` of that sequence. The data a step sees therefore depends only on the seed
//! and the global batch, never on how the batch is split into micro-batches or ranks, and resuming
//! needs nothing but the step number.

use super::Tokens;
use crate::rng::Rng;

#[derive(Debug)]
pub struct Sampler {
    seq_len: usize,
    windows: u64,
    seed: u64,
    epoch: Option<u64>,
    order: Vec<u64>,
}

impl Sampler {
    /// `None` if the stream holds no full window.
    pub fn new(tokens: usize, seq_len: usize, seed: u64) -> Option<Sampler> {
        let windows = (tokens.saturating_sub(1) / seq_len) as u64;
        (windows > 0).then_some(Sampler { seq_len, windows, seed, epoch: None, order: Vec::new() })
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }

    /// Token offset of sequence `index` of the global batch of step `step` (0-based).
    pub fn offset(&mut self, step: u64, global_batch: usize, index: usize) -> usize {
        let g = step * global_batch as u64 + index as u64;
        let (epoch, pos) = (g / self.windows, g % self.windows);
        if self.epoch != Some(epoch) {
            // Fisher-Yates with a stream per epoch.
            let mut rng = Rng::new(self.seed, 0xDA7A_0000 + epoch);
            self.order = (0..self.windows).collect();
            for i in (1..self.order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                self.order.swap(i, j);
            }
            self.epoch = Some(epoch);
        }
        self.order[pos as usize] as usize * self.seq_len
    }

    /// Copies the windows `range` of step `step`'s global batch into `out` (`seq_len + 1` tokens
    /// each).
    pub fn fill(&mut self, tokens: &Tokens, step: u64, global_batch: usize, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        out.clear();
        for j in range {
            let o = self.offset(step, global_batch, j);
            tokens.extend_window(o..o + self.seq_len + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_visits_every_window_once_and_splits_agree() {
        let mut s = Sampler::new(1001, 10, 3).unwrap();
        assert_eq!(s.windows(), 100);
        let mut seen: Vec<usize> = (0..25).flat_map(|step| (0..4).map(move |j| (step, j))).map(|(st, j)| s.offset(st, 4, j)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).map(|w| w * 10).collect::<Vec<_>>());
        // One global batch of 8 filled whole, or as two micro-batches of 4: the same windows.
        let tokens: Tokens = (0..1001).collect::<Vec<u32>>().into();
        let (mut whole, mut a, mut b) = (vec![], vec![], vec![]);
        s.fill(&tokens, 30, 8, 0..8, &mut whole);
        s.fill(&tokens, 30, 8, 0..4, &mut a);
        s.fill(&tokens, 30, 8, 4..8, &mut b);
        a.extend(b);
        assert_eq!(whole, a);
    }
}
