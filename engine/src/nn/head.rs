//! The language-model head fused with the loss.
//!
//! Logits are computed a block of rows at a time; each block is turned into loss and logit
//! gradient in place, and immediately folded into the head's weight gradient and the hidden
//! states' gradient. The `[rows, vocab]` logits never exist whole (200 MB for GPT-2 at B4 T256),
//! except when the head runs one vocabulary slice at a time (`loss_in_slices`, for a head split
//! across chunks under data parallelism).

use std::ops::Range;

use gantry_kernels::cpu::loss::XENT_STATS;

use crate::backend::{Accumulate, Backend, Cpu, Ids, Mat, MatMut, Span, SpanMut, Weights};
use crate::models::hooks::{group_of, Params};
use crate::models::TpRank;
use crate::params::ParamRef;
use crate::Result;

/// Rows per block at least: the weight gradient's GEMM has the block's rows as its inner
/// dimension and slows down below a few hundred.
const MIN_BLOCK_ROWS: usize = 256;

#[derive(Clone, Copy, Debug)]
pub struct LmHead {
    /// `[vocab, hidden]` (`lm_head.weight`, or the tied token embedding).
    pub weight: ParamRef,
    /// The vocabulary rows this head holds: `first..first + vocab` of `total` (all of them, or
    /// a tensor-parallel rank's part).
    pub vocab: usize,
    pub hidden: usize,
    pub first: usize,
    pub total: usize,
}

impl LmHead {
    /// A head over the whole vocabulary.
    pub fn whole(weight: ParamRef, vocab: usize, hidden: usize) -> LmHead {
        LmHead { weight, vocab, hidden, first: 0, total: vocab }
    }

    /// Whether the head holds a tensor-parallel rank's part of the vocabulary.
    pub fn is_vocab_parallel(&self) -> bool {
        self.vocab != self.total
    }

    /// The most rows one block may hold (whatever the batch), for blocks of `block_floats`
    /// (`Backend::HEAD_BLOCK_FLOATS`). From the whole vocabulary, so that every rank of a
    /// vocabulary-parallel head cuts the rows alike (their collectives pair up).
    fn max_block_rows(&self, block_floats: usize) -> usize {
        (block_floats / self.total).max(MIN_BLOCK_ROWS)
    }

    /// Rows per logits block for `rows` rows on the CPU (see `block_rows_in`).
    pub fn block_rows(&self, rows: usize) -> usize {
        self.block_rows_in(rows, Cpu::HEAD_BLOCK_FLOATS)
    }

    /// Rows per logits block for `rows` rows: never more than `min(rows, max_block_rows)`, so
    /// scratch sized for a larger batch always fits a smaller one.
    pub fn block_rows_in(&self, rows: usize, block_floats: usize) -> usize {
        let rows = rows.max(1);
        // Equal blocks: a short last block would run its weight-gradient product (whose inner
        // dimension is the block's row count) at a fraction of the GEMM's speed.
        let blocks = rows.div_ceil(self.max_block_rows(block_floats));
        rows.div_ceil(blocks)
    }

    /// Scratch floats the head needs on the CPU for up to `rows` rows (see `scratch_len_in`).
    pub fn scratch_len(&self, rows: usize) -> usize {
        self.scratch_len_in(rows, Cpu::HEAD_BLOCK_FLOATS)
    }

    /// Scratch elements the head needs for up to `rows` rows: one logits block.
    pub fn scratch_len_in(&self, rows: usize, block_floats: usize) -> usize {
        rows.max(1).min(self.max_block_rows(block_floats)) * self.vocab
    }

    fn w<'a, B: Backend>(&self, p: Weights<'a, B>) -> Mat<'a, B::Act> {
        Mat::new(p.w, self.weight.offset, self.vocab, self.hidden)
    }

    /// Cross-entropy of `h` (`[rows, hidden]` from the start of the buffer) against `targets`,
    /// the rows' losses collected in `losses`. With `backward = Some((g, dh, scale))`, the loss
    /// gradient (times `scale`) is accumulated into the weight's gradient in `g` and written into
    /// `dh`.
    #[allow(clippy::too_many_arguments)]
    pub fn loss<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        h: &B::Act,
        targets: Ids<'_, B>,
        scratch: &mut B::Act,
        losses: &mut B::Losses,
        mut backward: Option<(&mut B::F32, &mut B::Act, f32)>,
    ) -> Result<()> {
        let rows = targets.host.len();
        let (c, v) = (self.hidden, self.vocab);
        let block = self.block_rows_in(rows, B::HEAD_BLOCK_FLOATS);
        let mut r0 = 0;
        while r0 < rows {
            let r = block.min(rows - r0);
            let hb = Mat::new(h, r0 * c, r, c);
            be.matmul(MatMut::new(&mut *scratch, 0, r, v), hb, self.w(p).t(), Accumulate::Overwrite)?;
            let scale = backward.as_ref().map(|b| b.2);
            be.softmax_xent(MatMut::new(&mut *scratch, 0, r, v), targets.rows(r0..r0 + r), scale, losses)?;
            if let Some((g, dh, _)) = backward.as_mut() {
                let dl = Mat::new(&*scratch, 0, r, v);
                be.matmul(MatMut::new(&mut **dh, r0 * c, r, c), dl, self.w(p), Accumulate::Overwrite)?;
                // dlᵀ as a strided view: measured faster on CPU than transposing the block first
                // (`kernels/examples/head_parts.rs`: 21 ms against 10 + 17 ms at 1024 × 8192).
                be.matmul_grad(MatMut::new(&mut **g, self.weight.offset, v, c), dl.t(), hb)?;
            }
            r0 += r;
        }
        Ok(())
    }

    /// As `loss`, for one rank's part of a vocabulary-parallel head (rows `first..first + vocab`
    /// of the vocabulary, on each of `tp.size` ranks). A block's logits exist only for this
    /// rank's rows: the softmax's max and sum over the whole vocabulary are combined from every
    /// rank's (`TensorGroup::combine_xent`: a few floats per row). The hidden states' gradient
    /// `dh` is this rank's partial sum, which the caller sums over the group (all-reduced, or
    /// reduce-scattered under split_gather). No rank ever holds the whole vocabulary's logits;
    /// every rank gets the same loss.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_vocab_parallel<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        tp: TpRank,
        h: &B::Act,
        targets: Ids<'_, B>,
        scratch: &mut B::Act,
        losses: &mut B::Losses,
        mut backward: Option<(&mut B::F32, &mut B::Act, f32)>,
    ) -> Result<()> {
        let rows = targets.host.len();
        let (c, v) = (self.hidden, self.vocab);
        let block = self.block_rows_in(rows, B::HEAD_BLOCK_FLOATS);
        // This rank's statistics of a block's rows, then the group's.
        let mut stats = be.alloc_f32(2 * XENT_STATS * block)?;
        let mut r0 = 0;
        while r0 < rows {
            let r = block.min(rows - r0);
            let (hb, t, n) = (Mat::new(h, r0 * c, r, c), targets.rows(r0..r0 + r), r * XENT_STATS);
            be.matmul(MatMut::new(&mut *scratch, 0, r, v), hb, self.w(pa.get()).t(), Accumulate::Overwrite)?;
            let st = B::f32s_mut(&mut stats);
            be.xent_stats(MatMut::new(&mut *scratch, 0, r, v), t, self.first, SpanMut::new(&mut *st, 0..n))?;
            group_of(pa, tp)?.combine_xent(st, r)?;
            let scale = backward.as_ref().map(|b| b.2);
            be.xent_finish(
                MatMut::new(&mut *scratch, 0, r, v),
                t,
                self.first,
                Span::new(st, 0..n),
                Span::new(st, n..2 * n),
                scale,
                losses,
            )?;
            if let Some((g, dh, _)) = backward.as_mut() {
                let dl = Mat::new(&*scratch, 0, r, v);
                be.matmul(MatMut::new(&mut **dh, r0 * c, r, c), dl, self.w(pa.get()), Accumulate::Overwrite)?;
                be.matmul_grad(MatMut::new(&mut **g, self.weight.offset, v, c), dl.t(), hb)?;
            }
            r0 += r;
        }
        Ok(())
    }

    /// As `loss`, one vocabulary slice at a time: `slices` are ranges of the flat buffer holding
    /// whole rows of the weight, in order (`ParamTable::slices`), and each slice's parameters
    /// are asked of `pa` just before it is read, so that ZeRO-3 holds one slice of the head
    /// gathered (and the one prefetched), not the whole. The logits of all rows exist at once
    /// (`logits`: `[rows, vocab]`), since the softmax needs every slice's before any gradient.
    /// With `announce`, each slice's weight gradient is announced final as soon as it is (not
    /// for a head tied to the embedding, to whose gradient the embedding adds later).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_in_slices<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn Params<B>,
        slices: &[Range<usize>],
        h: &B::Act,
        targets: Ids<'_, B>,
        logits: &mut B::Act,
        losses: &mut B::Losses,
        backward: Option<(&mut B::F32, &mut B::Act, f32)>,
        announce: bool,
    ) -> Result<()> {
        let (rows, c, v) = (targets.host.len(), self.hidden, self.vocab);
        let hm = Mat::new(h, 0, rows, c);
        // The slice's first vocabulary row and its row count.
        let rows_of = |s: &Range<usize>| ((s.start - self.weight.offset) / c, s.len() / c);
        for s in slices {
            pa.need(std::slice::from_ref(s))?;
            let (v0, vn) = rows_of(s);
            let w = Mat::new(pa.get().w, s.start, vn, c);
            be.matmul(MatMut::strided(&mut *logits, v0, rows, vn, v), hm, w.t(), Accumulate::Overwrite)?;
        }
        be.softmax_xent(MatMut::new(&mut *logits, 0, rows, v), targets, backward.as_ref().map(|b| b.2), losses)?;
        if let Some((g, dh, _)) = backward {
            // Backward runs the slices in reverse, so that ZeRO-3's prefetch (downwards once
            // gradients flow) has the next one on its way.
            for (i, s) in slices.iter().enumerate().rev() {
                pa.need(std::slice::from_ref(s))?;
                let (v0, vn) = rows_of(s);
                let dl = Mat::strided(&*logits, v0, rows, vn, v);
                let w = Mat::new(pa.get().w, s.start, vn, c);
                let acc = if i + 1 == slices.len() { Accumulate::Overwrite } else { Accumulate::Add };
                be.matmul(MatMut::new(&mut *dh, 0, rows, c), dl, w, acc)?;
                be.matmul_grad(MatMut::new(&mut *g, s.start, vn, c), dl.t(), hm)?;
                if announce {
                    pa.grads_ready(g, s.clone())?;
                }
            }
        }
        Ok(())
    }

    /// Full logits `[rows, vocab]` (for inference and tests).
    pub fn logits<B: Backend>(&self, be: &B, p: Weights<'_, B>, h: &B::Act, rows: usize, out: &mut B::Act) -> Result<()> {
        be.matmul(MatMut::new(out, 0, rows, self.vocab), Mat::new(h, 0, rows, self.hidden), self.w(p).t(), Accumulate::Overwrite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn scratch_for_a_large_batch_fits_every_smaller_one() {
        let head = LmHead::whole(ParamRef { offset: 0, len: 8192 * 4 }, 8192, 4);
        let cap = head.scratch_len(1280);
        for rows in 1..=1280 {
            assert!(head.block_rows(rows) * 8192 <= cap, "{rows} rows");
        }
    }

    /// Several blocks (600 rows of a 40000-word vocabulary: three blocks of 200) give the loss and
    /// gradients of the whole-logits computation.
    #[test]
    fn blocked_loss_and_gradients_match_whole_logits() {
        let (rows, vocab, hidden) = (600, 40000, 4);
        let head = LmHead::whole(ParamRef { offset: 0, len: vocab * hidden }, vocab, hidden);
        assert!(head.block_rows(rows) < rows, "the test must cover several blocks");
        let mut rng = Rng::new(1, 2);
        let params: Vec<f32> = (0..vocab * hidden).map(|_| rng.normal() as f32).collect();
        let h: Vec<f32> = (0..rows * hidden).map(|_| rng.normal() as f32).collect();
        let targets: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
        let scale = 1.0 / rows as f32;
        let mut scratch = vec![0.0; head.scratch_len(rows)];
        let (mut grads, mut dh) = (vec![0.0; params.len()], vec![0.0; h.len()]);
        let targets_ids = Ids::<Cpu> { host: &targets, dev: &(), at: 0 };
        let p = Weights::<Cpu> { w: &params, master: &params };
        let mut losses = 0.0;
        head.loss(&Cpu, p, &h, targets_ids, &mut scratch, &mut losses, Some((&mut grads, &mut dh, scale))).unwrap();
        let loss = Cpu.loss_sum(&mut losses, rows).unwrap();

        // Whole logits in f64.
        let (mut want_loss, mut want_dh, mut want_dw) = (0.0f64, vec![0.0f64; h.len()], vec![0.0f64; params.len()]);
        for r in 0..rows {
            let hr = &h[r * hidden..(r + 1) * hidden];
            let logits: Vec<f64> =
                (0..vocab).map(|v| (0..hidden).map(|c| hr[c] as f64 * params[v * hidden + c] as f64).sum::<f64>()).collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            want_loss += z.ln() + m - logits[targets[r] as usize];
            for v in 0..vocab {
                let g = ((logits[v] - m).exp() / z - if v == targets[r] as usize { 1.0 } else { 0.0 }) * scale as f64;
                for c in 0..hidden {
                    want_dh[r * hidden + c] += g * params[v * hidden + c] as f64;
                    want_dw[v * hidden + c] += g * hr[c] as f64;
                }
            }
        }
        assert!((loss - want_loss).abs() / want_loss < 1e-6, "{loss} vs {want_loss}");
        for (got, want) in [(&dh, &want_dh), (&grads, &want_dw)] {
            let worst = got.iter().zip(want.iter()).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-6, "gradient differs by {worst}");
        }
    }
}
