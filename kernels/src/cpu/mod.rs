//! CPU kernels, all in fp32.
//!
//! Conventions: activations are row-major `[rows, cols]`; a kernel that produces an input
//! gradient *accumulates* (`+=`) into it when it says so, because the residual stream's gradient
//! is a sum of its branches; parameter gradients always accumulate. Reductions across rows (the
//! gradients of norm weights, biases) go through fixed-size row blocks whose partial sums are added
//! in block order, so results are bit-identical whatever the thread count.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod embedding;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod reference;
pub mod ring_attention;
pub mod rope;
pub mod vec;

/// Rows per block for cross-row reductions; fixed so that results do not depend on the number
/// of threads.
pub(crate) const REDUCE_ROWS: usize = 32;

#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic pseudo-random values in `[-scale, scale)`.
    pub fn seeded(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Central differences of `f` at `x` (in f64 around f32 inputs).
    pub fn finite_diff(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f32> {
        let h = 1e-2f32;
        let mut v = x.to_vec();
        (0..x.len())
            .map(|i| {
                v[i] = x[i] + h;
                let up = f(&v);
                v[i] = x[i] - h;
                let down = f(&v);
                v[i] = x[i];
                ((up - down) / (2.0 * h as f64)) as f32
            })
            .collect()
    }

    /// Asserts `|a - b| <= tol * (1 + |b|)` element-wise, naming the first offender.
    pub fn assert_close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "element {i}: {x} vs {y} (tol {tol})");
        }
    }
}
