//! Causal self-attention with grouped key/value heads, without materialising the `T×T`
//! probabilities: the forward walks the keys of one query row with a scratch row of scores and
//! saves only the row's log-sum-exp; the backward recomputes each probability from it (the
//! flash-attention recipe, at the granularity of one query row, which on CPU keeps the working set
//! of a head, `2·T·D` floats of keys and values, in L2).
//!
//! Layout: one fused buffer `qkv` of `[batch*seq, (heads + 2*kv_heads) * dim]` holding, per row,
//! the query heads, then the key heads, then the value heads (GPT-2's `c_attn` output as it is;
//! LLaMA's three projections write into it). Work is split by batch element so that every thread
//! owns a contiguous block of rows of every output.

use rayon::prelude::*;

use super::vec::{axpy, dot, exp};

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

    /// Width of a row of the output.
    pub fn out_width(&self) -> usize {
        self.heads * self.dim
    }

    fn check(&self, qkv: usize, out: usize, lse: usize) {
        let rows = self.batch * self.seq;
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "heads must be a multiple of kv_heads"
        );
        assert_eq!(qkv, rows * self.qkv_width(), "attention: qkv buffer size");
        assert_eq!(
            out,
            rows * self.out_width(),
            "attention: output buffer size"
        );
        assert_eq!(lse, rows * self.heads, "attention: lse buffer size");
    }
}

/// `out = softmax(q kᵀ / √dim + causal mask) v` per head; `lse` (`[batch*seq, heads]`) receives
/// each row's log-sum-exp of the scaled scores for the backward pass.
pub fn attention_forward(s: AttnShape, qkv: &[f32], out: &mut [f32], lse: &mut [f32]) {
    s.check(qkv.len(), out.len(), lse.len());
    let (t, d, w, ow) = (s.seq, s.dim, s.qkv_width(), s.out_width());
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(t * ow)
        .zip(lse.par_chunks_mut(t * s.heads))
        .zip(qkv.par_chunks(t * w))
        .for_each(|((out_b, lse_b), qkv_b)| {
            let mut scores = vec![0.0f32; t];
            for h in 0..s.heads {
                let k_off = (s.heads + h / group) * d;
                let v_off = (s.heads + s.kv_heads + h / group) * d;
                for i in 0..t {
                    let q = &qkv_b[i * w + h * d..][..d];
                    let mut m = f32::NEG_INFINITY;
                    for (j, sc) in scores[..=i].iter_mut().enumerate() {
                        *sc = dot(q, &qkv_b[j * w + k_off..][..d]) * scale;
                        m = m.max(*sc);
                    }
                    let mut z = 0.0f32;
                    for sc in scores[..=i].iter_mut() {
                        *sc = exp(*sc - m);
                        z += *sc;
                    }
                    let o = &mut out_b[i * ow + h * d..][..d];
                    o.fill(0.0);
                    for (j, p) in scores[..=i].iter().enumerate() {
                        axpy(*p, &qkv_b[j * w + v_off..][..d], o);
                    }
                    let inv = 1.0 / z;
                    o.iter_mut().for_each(|x| *x *= inv);
                    lse_b[i * s.heads + h] = m + z.ln();
                }
            }
        });
}

/// Writes `dqkv` (same layout as `qkv`) from the output gradient `dout`.
pub fn attention_backward(
    s: AttnShape,
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dqkv: &mut [f32],
) {
    s.check(qkv.len(), out.len(), lse.len());
    assert_eq!(dout.len(), out.len(), "attention: dout size");
    assert_eq!(dqkv.len(), qkv.len(), "attention: dqkv size");
    let (t, d, w, ow) = (s.seq, s.dim, s.qkv_width(), s.out_width());
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    dqkv.par_chunks_mut(t * w)
        .zip(qkv.par_chunks(t * w))
        .zip(out.par_chunks(t * ow).zip(dout.par_chunks(t * ow)))
        .zip(lse.par_chunks(t * s.heads))
        .for_each(|(((dqkv_b, qkv_b), (out_b, dout_b)), lse_b)| {
            dqkv_b.fill(0.0);
            let mut dq = vec![0.0f32; d];
            for h in 0..s.heads {
                let k_off = (s.heads + h / group) * d;
                let v_off = (s.heads + s.kv_heads + h / group) * d;
                for i in 0..t {
                    let q = &qkv_b[i * w + h * d..][..d];
                    let o_grad = &dout_b[i * ow + h * d..][..d];
                    let delta = dot(o_grad, &out_b[i * ow + h * d..][..d]);
                    let l = lse_b[i * s.heads + h];
                    dq.fill(0.0);
                    for j in 0..=i {
                        let k = &qkv_b[j * w + k_off..][..d];
                        let v = &qkv_b[j * w + v_off..][..d];
                        let p = exp(dot(q, k) * scale - l);
                        let dp = dot(o_grad, v);
                        let ds = p * (dp - delta) * scale;
                        axpy(ds, k, &mut dq);
                        axpy(ds, q, &mut dqkv_b[j * w + k_off..][..d]);
                        axpy(p, o_grad, &mut dqkv_b[j * w + v_off..][..d]);
                    }
                    dqkv_b[i * w + h * d..][..d].copy_from_slice(&dq);
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
        let s = AttnShape {
            batch: 3,
            seq: 9,
            heads: 4,
            kv_heads: 2,
            dim: 12,
        };
        let qkv = seeded(s.batch * s.seq * s.qkv_width(), 1, 2.0);
        let mut out = vec![0.0; s.batch * s.seq * s.out_width()];
        let mut lse = vec![0.0; s.batch * s.seq * s.heads];
        attention_forward(s, &qkv, &mut out, &mut lse);
        assert_close(&out, &oracle(s, &qkv), 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        for kv_heads in [1, 2] {
            let s = AttnShape {
                batch: 2,
                seq: 5,
                heads: 2,
                kv_heads,
                dim: 4,
            };
            let qkv = seeded(s.batch * s.seq * s.qkv_width(), 2, 1.0);
            let probe = seeded(s.batch * s.seq * s.out_width(), 3, 1.0);
            let mut out = vec![0.0; probe.len()];
            let mut lse = vec![0.0; s.batch * s.seq * s.heads];
            attention_forward(s, &qkv, &mut out, &mut lse);
            let mut dqkv = vec![0.0; qkv.len()];
            attention_backward(s, &qkv, &out, &lse, &probe, &mut dqkv);
            let fd = finite_diff(&qkv, |x| {
                oracle(s, x)
                    .iter()
                    .zip(&probe)
                    .map(|(o, p)| *o as f64 * *p as f64)
                    .sum()
            });
            assert_close(&dqkv, &fd, 2e-3);
        }
    }
}
