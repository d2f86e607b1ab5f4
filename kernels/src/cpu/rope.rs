//! Rotary position embedding in the Hugging Face convention (`rotate_half`: dimension `i` pairs
//! with `i + dim/2`), applied in place to the q and k heads of a fused qkv buffer.

use rayon::prelude::*;

/// Cosine and sine tables, `[positions, dim/2]` each.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles computed as transformers does (`inv_freq` and `pos * inv_freq` in f32), so the
    /// rotation matches it to the last bits that matter.
    pub fn new(positions: usize, dim: usize, theta: f32) -> Self {
        let half = dim / 2;
        let inv: Vec<f32> = (0..half).map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32)).collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// The cosine table, `[positions, half]` (the CUDA path uploads it as it is).
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// The sine table, `[positions, half]`.
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }
}

/// Rotates heads `0..heads` (each `2*half` wide) at the start of every row of `x`, a
/// `[rows, row_stride]` buffer whose row `r` holds position `pos0 + r % seq` (`pos0`: where a
/// part of a sequence starts, under sequence parallelism). `inverse` rotates by the negative
/// angle, which is the backward pass (the rotation is orthogonal).
pub fn rope_apply(x: &mut [f32], row_stride: usize, heads: usize, seq: usize, pos0: usize, table: &RopeTable, inverse: bool) {
    let half = table.half;
    let dim = 2 * half;
    assert!(heads * dim <= row_stride && pos0 + seq <= table.positions(), "rope: shape exceeds its table");
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x.par_chunks_mut(row_stride).enumerate().for_each(|(r, row)| {
        let pos = pos0 + r % seq;
        let cos = &table.cos[pos * half..][..half];
        let sin = &table.sin[pos * half..][..half];
        for h in row[..heads * dim].chunks_exact_mut(dim) {
            let (a, b) = h.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                let s = sign * sin[i];
                a[i] = x1 * cos[i] - x2 * s;
                b[i] = x2 * cos[i] + x1 * s;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::{assert_close, seeded};

    /// A part of a sequence starting at `pos0` is rotated as those rows of the whole sequence.
    #[test]
    fn an_offset_part_matches_the_whole_sequence() {
        let (seq, heads, dim) = (12, 2, 8);
        let x = seeded(seq * heads * dim, 3, 1.0);
        let table = RopeTable::new(16, dim, 10000.0);
        let mut whole = x.clone();
        rope_apply(&mut whole, heads * dim, heads, seq, 0, &table, false);
        let (pos0, part) = (5, 4);
        let mut got = x[pos0 * heads * dim..(pos0 + part) * heads * dim].to_vec();
        rope_apply(&mut got, heads * dim, heads, part, pos0, &table, false);
        assert_eq!(&got[..], &whole[pos0 * heads * dim..(pos0 + part) * heads * dim]);
    }

    #[test]
    fn matches_oracle_and_inverts() {
        let (seq, heads, dim, stride) = (7, 3, 8, 3 * 8 + 5);
        let x = seeded(2 * seq * stride, 1, 1.0);
        let table = RopeTable::new(16, dim, 10000.0);
        let mut got = x.clone();
        rope_apply(&mut got, stride, heads, seq, 0, &table, false);
        // the oracle works on a packed [rows, heads*dim] copy
        let mut packed: Vec<f32> = x.chunks(stride).flat_map(|r| r[..heads * dim].to_vec()).collect();
        reference::rope(&mut packed, seq, heads, dim, 10000.0);
        let got_packed: Vec<f32> = got.chunks(stride).flat_map(|r| r[..heads * dim].to_vec()).collect();
        assert_close(&got_packed, &packed, 1e-5);
        for (g, o) in got.chunks(stride).zip(x.chunks(stride)) {
            assert_eq!(&g[heads * dim..], &o[heads * dim..], "columns past the heads are untouched");
        }
        rope_apply(&mut got, stride, heads, seq, 0, &table, true);
        assert_close(&got, &x, 1e-5);
    }
}
