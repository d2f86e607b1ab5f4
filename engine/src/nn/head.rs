//! The language-model head fused with the loss.
//!
//! Logits are computed a block of rows at a time; each block is turned into loss and logit
//! gradient in place, and immediately folded into the head's weight gradient and the hidden
//! states' gradient. The `[rows, vocab]` logits never exist whole (200 MB for GPT-2 at B4 T256).

use gantry_kernels::cpu::loss::softmax_xent;
use gantry_kernels::cpu::matmul::{matmul, transpose, Accumulate, MatMut, MatRef, Threads};

use crate::params::ParamRef;

/// Floats in one block of logits (64 MiB, held twice: the block and its transpose): large enough that the weight gradient, which every
/// block reads and writes whole, is swept only a few times per step.
const BLOCK_FLOATS: usize = 1 << 24;

#[derive(Clone, Copy, Debug)]
pub struct LmHead {
    /// `[vocab, hidden]` (`lm_head.weight`, or the tied token embedding).
    pub weight: ParamRef,
    pub vocab: usize,
    pub hidden: usize,
}

impl LmHead {
    /// Rows per logits block for `rows` rows.
    pub fn block_rows(&self, rows: usize) -> usize {
        let cap = (BLOCK_FLOATS / self.vocab).clamp(1, rows.max(1));
        // Equal blocks: a short last block would run its weight-gradient product (whose inner
        // dimension is the block's row count) at a fraction of the GEMM's speed.
        let blocks = rows.max(1).div_ceil(cap);
        rows.max(1).div_ceil(blocks)
    }

    /// Scratch floats the head needs for `rows` rows: a logits block and its transpose.
    pub fn scratch_len(&self, rows: usize) -> usize {
        2 * self.block_rows(rows) * self.vocab
    }

    fn w<'a>(&self, params: &'a [f32]) -> MatRef<'a> {
        MatRef::new(self.weight.get(params), self.vocab, self.hidden)
    }

    /// Summed cross-entropy of `h` (`[rows, hidden]`) against `targets`. With `backward =
    /// Some((grads, dh, scale))`, the loss gradient (times `scale`) is accumulated into the weight's
    /// gradient and written into `dh`.
    pub fn loss(
        &self,
        params: &[f32],
        h: &[f32],
        targets: &[u32],
        scratch: &mut [f32],
        mut backward: Option<(&mut [f32], &mut [f32], f32)>,
    ) -> f64 {
        let rows = targets.len();
        let (c, v) = (self.hidden, self.vocab);
        let block = self.block_rows(rows);
        let (scratch, transposed) = scratch.split_at_mut(block * v);
        let mut total = 0.0;
        let mut r0 = 0;
        while r0 < rows {
            let r = block.min(rows - r0);
            let hb = MatRef::new(&h[r0 * c..(r0 + r) * c], r, c);
            let logits = &mut scratch[..r * v];
            matmul(MatMut::new(logits, r, v), hb, self.w(params).t(), Accumulate::Overwrite, Threads::Pool);
            let scale = backward.as_ref().map(|b| b.2);
            total += softmax_xent(logits, &targets[r0..r0 + r], v, scale);
            if let Some((grads, dh, _)) = backward.as_mut() {
                let dl = MatRef::new(logits, r, v);
                matmul(MatMut::new(&mut dh[r0 * c..(r0 + r) * c], r, c), dl, self.w(params), Accumulate::Overwrite, Threads::Pool);
                // The weight gradient reads the block transposed; the GEMM runs about 1.5× faster
                // from a row-major copy than from the strided view (`kernels/examples/gemm_shapes.rs`),
                // and the copy is one pass over the block.
                let dl_t = &mut transposed[..r * v];
                transpose(logits, r, v, dl_t);
                matmul(MatMut::new(self.weight.get_mut(grads), v, c), MatRef::new(dl_t, v, r), hb, Accumulate::Add, Threads::Pool);
            }
            r0 += r;
        }
        total
    }

    /// Full logits `[rows, vocab]` (for inference and tests).
    pub fn logits(&self, params: &[f32], h: &[f32], rows: usize, out: &mut [f32]) {
        matmul(
            MatMut::new(out, rows, self.vocab),
            MatRef::new(h, rows, self.hidden),
            self.w(params).t(),
            Accumulate::Overwrite,
            Threads::Pool,
        );
    }
}
