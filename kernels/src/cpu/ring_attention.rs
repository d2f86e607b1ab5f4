//! Ring attention's steps (`parallel.sp_mode = "ring_attn"`): causal attention of a rank's
//! queries against one key/value block at a time, merged with an online softmax, so that no rank
//! ever holds the whole sequence's keys.
//!
//! Each sequence of `T` tokens is cut into `2·N` chunks of `C = T / 2N`; rank r holds chunks `r`
//! and `2N−1−r` (zigzag: an early and a late chunk, so every rank has the same causal work).
//! A rank's rows are `2·b` local sequences of `C` tokens: local sequence `2s` is the first of its
//! chunks of sequence `s`, `2s+1` the second. The key/value blocks that travel around the ring
//! hold the same rows for another rank's chunks: `[2b·C, 2·kv_heads·dim]`, each row the key heads
//! then the value heads. Which keys a query sees follows from the chunks' positions: all of an
//! earlier chunk, the causal triangle of its own, none of a later one.
//!
//! The forward keeps, per row and head, the output so far (normalised) and its log-sum-exp, and
//! merges each block's into them. The backward gets the final output's log-sum-exp and
//! `δ = rowsum(dO ∘ O)` and recomputes each block's probabilities from them (the flash-attention
//! recipe), adding to the queries' gradient and to the travelling block's key/value gradient.

use rayon::prelude::*;

use super::attention::AttnShape;
use super::matmul::{matmul, Accumulate, MatMut, MatRef, Threads};
use super::vec::{dot, exp, exp_shifted_sum, max};

/// One rank's part of a step: `s.batch` is the number of whole sequences (`b`), `s.seq` the
/// chunk length `C`; the rank's queries are in `qkv` (`[2b·C, s.qkv_width()]`, the fused layout
/// of `attention`), in chunks `q_chunks` of each sequence; the block's keys and values in `kv`
/// (`[2b·C, 2·kv_heads·dim]`), in chunks `k_chunks`.
#[derive(Clone, Copy, Debug)]
pub struct RingStep<'a> {
    pub s: AttnShape,
    pub qkv: &'a [f32],
    pub q_chunks: [usize; 2],
    pub kv: &'a [f32],
    pub k_chunks: [usize; 2],
}

/// Which keys of a chunk the queries of a chunk see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visible {
    All,
    Causal,
    None,
}

impl RingStep<'_> {
    fn kv_width(&self) -> usize {
        2 * self.s.kv_heads * self.s.dim
    }

    fn visible(&self, qi: usize, ki: usize) -> Visible {
        let (q, k) = (self.q_chunks[qi], self.k_chunks[ki]);
        match k.cmp(&q) {
            std::cmp::Ordering::Less => Visible::All,
            std::cmp::Ordering::Equal => Visible::Causal,
            std::cmp::Ordering::Greater => Visible::None,
        }
    }

    /// Columns of the key and value head query head `h` reads, in a block row.
    fn kv_cols(&self, h: usize) -> (usize, usize) {
        let (s, d) = (self.s, self.s.dim);
        let kvh = h / (s.heads / s.kv_heads);
        (kvh * d, (s.kv_heads + kvh) * d)
    }

    fn check(&self, rows_of: &[(usize, usize)]) {
        let (s, rows) = (self.s, 2 * self.s.batch * self.s.seq);
        assert!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads), "heads must be a multiple of kv_heads");
        assert_eq!(self.qkv.len(), rows * s.qkv_width(), "ring attention: qkv size");
        assert_eq!(self.kv.len(), rows * self.kv_width(), "ring attention: key/value block size");
        for &(len, width) in rows_of {
            assert_eq!(len, rows * width, "ring attention: buffer size");
        }
    }
}

/// The key and value columns of `qkv`'s rows (`[rows, qkv_width]`), packed as a travelling block
/// (`[rows, 2·kv_heads·dim]`).
pub fn pack_kv(s: AttnShape, qkv: &[f32]) -> Vec<f32> {
    let (w, hd) = (s.qkv_width(), s.heads * s.dim);
    qkv.chunks_exact(w).flat_map(|row| row[hd..].iter().copied()).collect()
}

/// Starts a forward: no keys seen yet (output zero, log-sum-exp −∞).
pub fn ring_forward_init(out: &mut [f32], lse: &mut [f32]) {
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
}

/// Merges the attention of the step's queries over its block into `out` (`[2b·C, heads·dim]`,
/// normalised) and `lse` (`[2b·C, heads]`).
pub fn ring_forward_step(st: RingStep<'_>, out: &mut [f32], lse: &mut [f32]) {
    let s = st.s;
    let (c, d, w, kw, ow) = (s.seq, s.dim, s.qkv_width(), st.kv_width(), s.out_width());
    st.check(&[(out.len(), ow), (lse.len(), s.heads)]);
    let scale = 1.0 / (d as f32).sqrt();
    // One task per local sequence (a chunk's queries own their output rows), so even one whole
    // sequence keeps two cores busy.
    out.par_chunks_mut(c * ow).zip(lse.par_chunks_mut(c * s.heads)).enumerate().for_each(|(local, (out_q, lse_q))| {
        let (b, qi) = (local / 2, local % 2);
        let q_rows = local * c;
        let (mut scores, mut block) = (vec![0.0f32; c * c], vec![0.0f32; c * d]);
        for ki in 0..2 {
            let vis = st.visible(qi, ki);
            if vis == Visible::None {
                continue;
            }
            let k_rows = (2 * b + ki) * c;
            for h in 0..s.heads {
                let (kc, vc) = st.kv_cols(h);
                let q = MatRef::strided(&st.qkv[q_rows * w + h * d..], c, d, w, 1);
                let k = MatRef::strided(&st.kv[k_rows * kw + kc..], c, d, kw, 1);
                let v = MatRef::strided(&st.kv[k_rows * kw + vc..], c, d, kw, 1);
                matmul(MatMut::new(&mut scores, c, c), q, k.t(), Accumulate::Overwrite, Threads::Single);
                let mut lses = Vec::with_capacity(c);
                for (i, row) in scores.chunks_exact_mut(c).enumerate() {
                    let seen = if vis == Visible::Causal { i + 1 } else { c };
                    let m = max(&row[..seen]) * scale;
                    let z = exp_shifted_sum(&mut row[..seen], scale, m);
                    let inv = 1.0 / z;
                    row[..seen].iter_mut().for_each(|x| *x *= inv);
                    row[seen..].fill(0.0);
                    lses.push(m + z.ln());
                }
                matmul(MatMut::new(&mut block, c, d), MatRef::new(&scores, c, c), v, Accumulate::Overwrite, Threads::Single);
                // Online softmax: out ← out·e^(lse−new) + block·e^(lse_b−new).
                for (i, &lb) in lses.iter().enumerate() {
                    let old = lse_q[i * s.heads + h];
                    let new = if old == f32::NEG_INFINITY { lb } else { old.max(lb) + (-(old - lb).abs()).exp().ln_1p() };
                    let (a, bw) = (exp(old - new), exp(lb - new));
                    let o = &mut out_q[i * ow + h * d..][..d];
                    for (x, y) in o.iter_mut().zip(&block[i * d..][..d]) {
                        *x = *x * a + y * bw;
                    }
                    lse_q[i * s.heads + h] = new;
                }
            }
        }
    });
}

/// `δ = rowsum(dO ∘ O)` per row and head (`[rows, heads]`), which every backward step needs.
pub fn ring_delta(s: AttnShape, out: &[f32], dout: &[f32]) -> Vec<f32> {
    let (d, ow) = (s.dim, s.out_width());
    out.chunks_exact(ow)
        .zip(dout.chunks_exact(ow))
        .flat_map(|(o, g)| (0..s.heads).map(move |h| dot(&o[h * d..][..d], &g[h * d..][..d])))
        .collect()
}

/// Adds the step's share of the gradients: the queries' into `dq` (`[2b·C, heads·dim]`), the
/// block's keys' and values' into `dkv` (laid out as the block). `lse` and `delta` are the final
/// output's (`[2b·C, heads]`), `dout` its gradient.
pub fn ring_backward_step(st: RingStep<'_>, lse: &[f32], delta: &[f32], dout: &[f32], dq: &mut [f32], dkv: &mut [f32]) {
    let s = st.s;
    let (c, d, w, kw, ow) = (s.seq, s.dim, s.qkv_width(), st.kv_width(), s.out_width());
    st.check(&[(lse.len(), s.heads), (delta.len(), s.heads), (dout.len(), ow), (dq.len(), ow), (dkv.len(), kw)]);
    let scale = 1.0 / (d as f32).sqrt();
    let per_seq = 2 * c;
    dq.par_chunks_mut(per_seq * ow).zip(dkv.par_chunks_mut(per_seq * kw)).enumerate().for_each(|(b, (dq_b, dkv_b))| {
        let (mut p, mut dp) = (vec![0.0f32; c * c], vec![0.0f32; c * c]);
        for qi in 0..2 {
            let q_rows = (2 * b + qi) * c;
            for ki in 0..2 {
                let vis = st.visible(qi, ki);
                if vis == Visible::None {
                    continue;
                }
                let k_rows = (2 * b + ki) * c;
                for h in 0..s.heads {
                    let (kc, vc) = st.kv_cols(h);
                    let q = MatRef::strided(&st.qkv[q_rows * w + h * d..], c, d, w, 1);
                    let k = MatRef::strided(&st.kv[k_rows * kw + kc..], c, d, kw, 1);
                    let v = MatRef::strided(&st.kv[k_rows * kw + vc..], c, d, kw, 1);
                    let g = MatRef::strided(&dout[q_rows * ow + h * d..], c, d, ow, 1);
                    matmul(MatMut::new(&mut p, c, c), q, k.t(), Accumulate::Overwrite, Threads::Single);
                    matmul(MatMut::new(&mut dp, c, c), g, v.t(), Accumulate::Overwrite, Threads::Single);
                    // p ← probabilities under the final log-sum-exp, dp ← dS·scale; masked zero.
                    for (i, (pr, dpr)) in p.chunks_exact_mut(c).zip(dp.chunks_exact_mut(c)).enumerate() {
                        let seen = if vis == Visible::Causal { i + 1 } else { c };
                        let (l, dl) = (lse[(q_rows + i) * s.heads + h], delta[(q_rows + i) * s.heads + h]);
                        for j in 0..seen {
                            let pj = exp(pr[j] * scale - l);
                            pr[j] = pj;
                            dpr[j] = pj * (dpr[j] - dl) * scale;
                        }
                        pr[seen..].fill(0.0);
                        dpr[seen..].fill(0.0);
                    }
                    let (pm, dsm) = (MatRef::new(&p, c, c), MatRef::new(&dp, c, c));
                    let kb = ki * c * kw;
                    matmul(MatMut::strided(&mut dkv_b[kb + vc..], c, d, kw, 1), pm.t(), g, Accumulate::Add, Threads::Single);
                    matmul(MatMut::strided(&mut dkv_b[kb + kc..], c, d, kw, 1), dsm.t(), q, Accumulate::Add, Threads::Single);
                    matmul(MatMut::strided(&mut dq_b[qi * c * ow + h * d..], c, d, ow, 1), dsm, k, Accumulate::Add, Threads::Single);
                }
            }
        }
    });
}

/// The two chunks (of `2·n`) rank `r` of a ring of `n` holds: one early, one late.
pub fn zigzag_chunks(r: usize, n: usize) -> [usize; 2] {
    [r, 2 * n - 1 - r]
}

#[cfg(test)]
mod tests {
    use super::super::attention::{attention_backward, attention_forward};
    use super::*;
    use crate::cpu::test_util::{assert_close, seeded};

    /// Rank r's rows of a whole-sequence buffer (`[b·T, width]`): its two chunks of each sequence.
    fn rank_rows(x: &[f32], b: usize, t: usize, n: usize, r: usize, width: usize) -> Vec<f32> {
        let c = t / (2 * n);
        let mut out = Vec::new();
        for s in 0..b {
            for chunk in zigzag_chunks(r, n) {
                out.extend_from_slice(&x[(s * t + chunk * c) * width..][..c * width]);
            }
        }
        out
    }

    /// Every rank's ring, run in one process, against attention over whole sequences: the
    /// outputs and log-sum-exps, and the gradients of queries, keys and values.
    #[test]
    fn a_ring_of_ranks_matches_whole_sequence_attention() {
        for (n, kv_heads) in [(1, 2), (2, 2), (4, 1), (3, 4)] {
            let (b, c) = (2, 3);
            let t = 2 * n * c;
            let whole = AttnShape { batch: b, seq: t, heads: 4, kv_heads, dim: 8 };
            let (w, ow) = (whole.qkv_width(), whole.out_width());
            let qkv = seeded(b * t * w, 7, 1.5);
            let dout = seeded(b * t * ow, 8, 1.0);
            let (mut out, mut lse) = (vec![0.0; b * t * ow], vec![0.0; b * t * whole.heads]);
            attention_forward(whole, &qkv, &mut out, &mut lse);
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward(whole, &qkv, &out, &lse, &dout, &mut dqkv);
            let s = AttnShape { seq: c, ..whole };
            let mine: Vec<Vec<f32>> = (0..n).map(|r| rank_rows(&qkv, b, t, n, r, w)).collect();
            let blocks: Vec<Vec<f32>> = mine.iter().map(|q| pack_kv(s, q)).collect();
            let mut dkvs: Vec<Vec<f32>> = blocks.iter().map(|k| vec![0.0; k.len()]).collect();
            for (r, q) in mine.iter().enumerate() {
                let rows = 2 * b * c;
                let (mut o, mut l) = (vec![0.0; rows * ow], vec![0.0; rows * s.heads]);
                ring_forward_init(&mut o, &mut l);
                // The order the ring brings the blocks: this rank's, then each predecessor's.
                for j in 0..n {
                    let src = (r + n - j) % n;
                    let st = RingStep { s, qkv: q, q_chunks: zigzag_chunks(r, n), kv: &blocks[src], k_chunks: zigzag_chunks(src, n) };
                    ring_forward_step(st, &mut o, &mut l);
                }
                assert_close(&o, &rank_rows(&out, b, t, n, r, ow), 1e-5);
                assert_close(&l, &rank_rows(&lse, b, t, n, r, whole.heads), 1e-5);
                let g = rank_rows(&dout, b, t, n, r, ow);
                let delta = ring_delta(s, &o, &g);
                let mut dq = vec![0.0; rows * ow];
                for j in 0..n {
                    let src = (r + n - j) % n;
                    let st = RingStep { s, qkv: q, q_chunks: zigzag_chunks(r, n), kv: &blocks[src], k_chunks: zigzag_chunks(src, n) };
                    ring_backward_step(st, &l, &delta, &g, &mut dq, &mut dkvs[src]);
                }
                let want = rank_rows(&dqkv, b, t, n, r, w);
                let want_q: Vec<f32> = want.chunks_exact(w).flat_map(|row| row[..ow].to_vec()).collect();
                assert_close(&dq, &want_q, 1e-4);
            }
            for (r, dkv) in dkvs.iter().enumerate() {
                let want = pack_kv(s, &rank_rows(&dqkv, b, t, n, r, w));
                assert_close(dkv, &want, 1e-4);
            }
        }
    }
}
