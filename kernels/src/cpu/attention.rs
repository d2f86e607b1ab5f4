//! Causal self-attention with grouped key/value heads, without materialising the `B·H·T×T`
//! probabilities: the forward computes a tile of query rows against the keys they can see,
//! saves only each row's log-sum-exp, and the backward recomputes the tile's probabilities from
//! it (the flash-attention recipe; on CPU the tile, `64 × T` floats, stays in L2 and every product
//! runs as a small single-threaded GEMM inside the parallel loop over the batch).
//!
//! Layout: one fused buffer `qkv` of `[batch*seq, (heads + 2*kv_heads) * dim]` holding, per row,
//! the query heads, then the key heads, then the value heads (GPT-2's `c_attn` output as it is;
//! LLaMA's three projections write into it). Work is split by batch element so that every thread
//! owns a contiguous block of rows of every output.

use rayon::prelude::*;

use super::matmul::{matmul, Accumulate, MatMut, MatRef, Threads};
use super::vec::{dot, exp, exp_shifted_sum, max};

/// The attention problem's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

impl AttnShape {
    /// Width of a row of the fused qkv buffer.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.dim
    }

    /// Column of the key head that query head `h` reads.
    fn k_offset(&self, h: usize) -> usize {
        (self.heads + h / (self.heads / self.kv_heads)) * self.dim
    }

    /// Column of the value head that query head `h` reads.
    fn v_offset(&self, h: usize) -> usize {
        self.k_offset(h) + self.kv_heads * self.dim
    }

    /// Width of a row of the output.
    pub fn out_width(&self) -> usize {
        self.heads * self.dim
    }

    fn check(&self, qkv: usize, out: usize, lse: usize) {
        let rows = self.batch * self.seq;
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads), "heads must be a multiple of kv_heads");
        assert_eq!(qkv, rows * self.qkv_width(), "attention: qkv buffer size");
        assert_eq!(out, rows * self.out_width(), "attention: output buffer size");
        assert_eq!(lse, rows * self.heads, "attention: lse buffer size");
    }
}

/// Query rows per tile. The tile's scores against every key it can see (`QBLOCK × seq` floats,
/// 64 KiB at seq 256) stay in L2, and its products run as small GEMMs.
const QBLOCK: usize = 64;

/// `out = softmax(q kᵀ / √dim + causal mask) v` per head; `lse` (`[batch*seq, heads]`) receives
/// each row's log-sum-exp of the scaled scores for the backward pass.
pub fn attention_forward(s: AttnShape, qkv: &[f32], out: &mut [f32], lse: &mut [f32]) {
    s.check(qkv.len(), out.len(), lse.len());
    let (t, d, w, ow) = (s.seq, s.dim, s.qkv_width(), s.out_width());
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(t * ow).zip(lse.par_chunks_mut(t * s.heads)).zip(qkv.par_chunks(t * w)).for_each(|((out_b, lse_b), qkv_b)| {
        let mut scores = vec![0.0f32; QBLOCK.min(t) * t];
        for h in 0..s.heads {
            let (k_off, v_off) = (s.k_offset(h), s.v_offset(h));
            for i0 in (0..t).step_by(QBLOCK) {
                let (rows, keys) = (QBLOCK.min(t - i0), (i0 + QBLOCK).min(t));
                let q = MatRef::strided(&qkv_b[i0 * w + h * d..], rows, d, w, 1);
                let k = MatRef::strided(&qkv_b[k_off..], keys, d, w, 1);
                let sc = &mut scores[..rows * keys];
                matmul(MatMut::new(sc, rows, keys), q, k.t(), Accumulate::Overwrite, Threads::Single);
                for (r, row) in sc.chunks_exact_mut(keys).enumerate() {
                    let visible = i0 + r + 1;
                    let row = &mut row[..visible];
                    let m = max(row) * scale;
                    let z = exp_shifted_sum(row, scale, m);
                    let inv = 1.0 / z;
                    row.iter_mut().for_each(|x| *x *= inv);
                    lse_b[(i0 + r) * s.heads + h] = m + z.ln();
                }
                // Masked keys get probability zero.
                for (r, row) in sc.chunks_exact_mut(keys).enumerate() {
                    row[i0 + r + 1..].fill(0.0);
                }
                let v = MatRef::strided(&qkv_b[v_off..], keys, d, w, 1);
                let o = MatMut::strided(&mut out_b[i0 * ow + h * d..], rows, d, ow, 1);
                matmul(o, MatRef::new(sc, rows, keys), v, Accumulate::Overwrite, Threads::Single);
            }
        }
    });
}

/// Writes `dqkv` (same layout as `qkv`) from the output gradient `dout`. Probabilities are
/// recomputed tile by tile from the saved log-sum-exp.
pub fn attention_backward(s: AttnShape, qkv: &[f32], out: &[f32], lse: &[f32], dout: &[f32], dqkv: &mut [f32]) {
    s.check(qkv.len(), out.len(), lse.len());
    assert_eq!(dout.len(), out.len(), "attention: dout size");
    assert_eq!(dqkv.len(), qkv.len(), "attention: dqkv size");
    let (t, d, w, ow) = (s.seq, s.dim, s.qkv_width(), s.out_width());
    let scale = 1.0 / (d as f32).sqrt();
    dqkv.par_chunks_mut(t * w)
        .zip(qkv.par_chunks(t * w))
        .zip(out.par_chunks(t * ow).zip(dout.par_chunks(t * ow)))
        .zip(lse.par_chunks(t * s.heads))
        .for_each(|(((dqkv_b, qkv_b), (out_b, dout_b)), lse_b)| {
            dqkv_b.fill(0.0);
            let tile = QBLOCK.min(t) * t;
            let (mut p, mut dp) = (vec![0.0f32; tile], vec![0.0f32; tile]);
            let mut delta = vec![0.0f32; QBLOCK];
            for h in 0..s.heads {
                let (k_off, v_off) = (s.k_offset(h), s.v_offset(h));
                for i0 in (0..t).step_by(QBLOCK) {
                    let (rows, keys) = (QBLOCK.min(t - i0), (i0 + QBLOCK).min(t));
                    let q = MatRef::strided(&qkv_b[i0 * w + h * d..], rows, d, w, 1);
                    let k = MatRef::strided(&qkv_b[k_off..], keys, d, w, 1);
                    let v = MatRef::strided(&qkv_b[v_off..], keys, d, w, 1);
                    let o_grad = MatRef::strided(&dout_b[i0 * ow + h * d..], rows, d, ow, 1);
                    let (p, dp) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
                    matmul(MatMut::new(p, rows, keys), q, k.t(), Accumulate::Overwrite, Threads::Single);
                    matmul(MatMut::new(dp, rows, keys), o_grad, v.t(), Accumulate::Overwrite, Threads::Single);
                    for (r, dl) in delta[..rows].iter_mut().enumerate() {
                        let i = i0 + r;
                        *dl = dot(&dout_b[i * ow + h * d..][..d], &out_b[i * ow + h * d..][..d]);
                    }
                    // p ← probabilities, dp ← dS = p ∘ (dp − δ) · scale; masked entries zero.
                    for (r, (pr, dpr)) in p.chunks_exact_mut(keys).zip(dp.chunks_exact_mut(keys)).enumerate() {
                        let visible = i0 + r + 1;
                        let l = lse_b[(i0 + r) * s.heads + h];
                        let dl = delta[r];
                        for j in 0..visible {
                            let pj = exp(pr[j] * scale - l);
                            pr[j] = pj;
                            dpr[j] = pj * (dpr[j] - dl) * scale;
                        }
                        pr[visible..].fill(0.0);
                        dpr[visible..].fill(0.0);
                    }
                    let (pv, dsv) = (MatRef::new(p, rows, keys), MatRef::new(dp, rows, keys));
                    // dV += Pᵀ dO, dK += dSᵀ Q, dQ = dS K.
                    matmul(MatMut::strided(&mut dqkv_b[v_off..], keys, d, w, 1), pv.t(), o_grad, Accumulate::Add, Threads::Single);
                    matmul(MatMut::strided(&mut dqkv_b[k_off..], keys, d, w, 1), dsv.t(), q, Accumulate::Add, Threads::Single);
                    matmul(MatMut::strided(&mut dqkv_b[i0 * w + h * d..], rows, d, w, 1), dsv, k, Accumulate::Add, Threads::Single);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::{assert_close, finite_diff, seeded};

    fn split(s: AttnShape, qkv: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (w, d) = (s.qkv_width(), s.dim);
        let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
        for row in qkv.chunks(w) {
            q.extend_from_slice(&row[..s.heads * d]);
            k.extend_from_slice(&row[s.heads * d..(s.heads + s.kv_heads) * d]);
            v.extend_from_slice(&row[(s.heads + s.kv_heads) * d..]);
        }
        (q, k, v)
    }

    fn oracle(s: AttnShape, qkv: &[f32]) -> Vec<f32> {
        let (q, k, v) = split(s, qkv);
        reference::attention(&q, &k, &v, s.batch, s.seq, s.heads, s.kv_heads, s.dim)
    }

    #[test]
    fn forward_matches_oracle_with_gqa() {
        let s = AttnShape { batch: 3, seq: 9, heads: 4, kv_heads: 2, dim: 12 };
        let qkv = seeded(s.batch * s.seq * s.qkv_width(), 1, 2.0);
        let mut out = vec![0.0; s.batch * s.seq * s.out_width()];
        let mut lse = vec![0.0; s.batch * s.seq * s.heads];
        attention_forward(s, &qkv, &mut out, &mut lse);
        assert_close(&out, &oracle(s, &qkv), 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        for kv_heads in [1, 2] {
            let s = AttnShape { batch: 2, seq: 5, heads: 2, kv_heads, dim: 4 };
            let qkv = seeded(s.batch * s.seq * s.qkv_width(), 2, 1.0);
            let probe = seeded(s.batch * s.seq * s.out_width(), 3, 1.0);
            let mut out = vec![0.0; probe.len()];
            let mut lse = vec![0.0; s.batch * s.seq * s.heads];
            attention_forward(s, &qkv, &mut out, &mut lse);
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward(s, &qkv, &out, &lse, &probe, &mut dqkv);
            let fd = finite_diff(&qkv, |x| oracle(s, x).iter().zip(&probe).map(|(o, p)| *o as f64 * *p as f64).sum());
            assert_close(&dqkv, &fd, 2e-3);
        }
    }

    #[test]
    fn several_tiles_match_the_oracle_forward_and_backward() {
        let s = AttnShape { batch: 2, seq: 150, heads: 4, kv_heads: 2, dim: 8 };
        let qkv = seeded(s.batch * s.seq * s.qkv_width(), 4, 1.5);
        let dout = seeded(s.batch * s.seq * s.out_width(), 5, 1.0);
        let mut out = vec![0.0; dout.len()];
        let mut lse = vec![0.0; s.batch * s.seq * s.heads];
        attention_forward(s, &qkv, &mut out, &mut lse);
        assert_close(&out, &oracle(s, &qkv), 1e-5);
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(s, &qkv, &out, &lse, &dout, &mut dqkv);
        let (q, k, v) = split(s, &qkv);
        let (dq, dk, dv) = reference::attention_backward(&q, &k, &v, &dout, s.batch, s.seq, s.heads, s.kv_heads, s.dim);
        let (gq, gk, gv) = split(s, &dqkv);
        assert_close(&gq, &dq, 1e-4);
        assert_close(&gk, &dk, 1e-4);
        assert_close(&gv, &dv, 1e-4);
    }
}
