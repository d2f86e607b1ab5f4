//! Small vector primitives written so that LLVM vectorises them: eight independent accumulators
//! break the floating-point dependency chain that otherwise keeps a sum scalar.

/// Dot product of two equal-length slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// Sum of squares in f64 (used for the global gradient norm, where millions of terms are added).
pub fn sum_squares(x: &[f32]) -> f64 {
    use rayon::prelude::*;
    // Fixed blocks, summed in order: the norm is the same bits for any thread count.
    const BLOCK: usize = 1 << 16;
    let partial: Vec<f64> = x
        .par_chunks(BLOCK)
        .map(|c| {
            let mut acc = [0.0f64; 4];
            let chunks = c.chunks_exact(4);
            let rem = chunks.remainder();
            for q in chunks {
                for l in 0..4 {
                    acc[l] += (q[l] as f64) * (q[l] as f64);
                }
            }
            let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            for v in rem {
                s += (*v as f64) * (*v as f64);
            }
            s
        })
        .collect();
    partial.iter().sum()
}

/// `x = 0`, in parallel (a single-threaded memset of a 124M-parameter gradient buffer takes
/// tens of milliseconds).
pub fn zero(x: &mut [f32]) {
    use rayon::prelude::*;
    x.par_chunks_mut(1 << 18).for_each(|c| c.fill(0.0));
}

/// `x *= s`, in parallel.
pub fn scale(x: &mut [f32], s: f32) {
    use rayon::prelude::*;
    x.par_chunks_mut(1 << 16).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Adds the column sums of the first `cols` columns of `rows` rows, `row_stride` apart, into
/// `out` (`[cols]`): the bias gradient of a (possibly column-block) output.
pub fn add_col_sums_strided(out: &mut [f32], x: &[f32], rows: usize, cols: usize, row_stride: usize) {
    use rayon::prelude::*;
    debug_assert!(rows == 0 || (rows - 1) * row_stride + cols <= x.len());
    let blocks = rows.div_ceil(crate::cpu::REDUCE_ROWS);
    let partial: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0f32; cols];
            let lo = b * crate::cpu::REDUCE_ROWS;
            for r in lo..(lo + crate::cpu::REDUCE_ROWS).min(rows) {
                for (a, v) in acc.iter_mut().zip(&x[r * row_stride..r * row_stride + cols]) {
                    *a += *v;
                }
            }
            acc
        })
        .collect();
    for p in &partial {
        for (o, v) in out.iter_mut().zip(p) {
            *o += *v;
        }
    }
}

/// `e^x` to about 2 ulp, branch-free so that loops over it vectorise (libm's `expf` does not).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer in f32 arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor polynomial of e^r on |r| <= ln2/2 (error below 2e-7 relative), Horner with FMAs.
    let mut p: f32 = 1.0 / 720.0;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // The low mantissa bits of `t` hold n (as an offset from ROUND's bits): integer arithmetic
    // that vectorises, unlike a float-to-int cast.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// The largest element (`-inf` for an empty slice), with eight lanes so that it vectorises.
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in rem {
        m = if *v > m { *v } else { m };
    }
    m
}

/// `x ← exp(scale·x − shift)`, returning the sum of the results. Two loops rather than one: a
/// loop without a reduction vectorises fully, while a fused exp-and-sum loop came out as 2-lane
/// SSE code (measured 2.3 ns per element against 0.3 with `kernels/examples/exp_speed.rs`).
#[inline]
pub fn exp_shifted_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(v.mul_add(scale, -shift));
    }
    sum(x)
}

/// Sum with sixteen independent lanes (two AVX registers), so that it vectorises.
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    let mut s = 0.0;
    for half in 0..8 {
        s += acc[half] + acc[half + 8];
    }
    s + rem.iter().sum::<f32>()
}

/// `Σ (x − m)²` with sixteen lanes (the variance numerator, without the cancellation of
/// `Σx² − n·m²`).
#[inline]
pub fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            let d = c[l] - m;
            acc[l] = d.mul_add(d, acc[l]);
        }
    }
    let mut s = 0.0;
    for half in 0..8 {
        s += acc[half] + acc[half + 8];
    }
    s + rem.iter().map(|v| (v - m) * (v - m)).sum::<f32>()
}

/// `(Σ a·b, Σ a·b·(c − m)·k)`: the two row sums a norm's backward needs, in one vectorised pass.
#[inline]
pub fn norm_backward_sums(a: &[f32], b: &[f32], c: &[f32], m: f32, k: f32) -> (f32, f32) {
    debug_assert!(a.len() == b.len() && b.len() == c.len());
    let (mut s1, mut s2) = ([0.0f32; 16], [0.0f32; 16]);
    let n = a.len() / 16 * 16;
    for ((ca, cb), cc) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)).zip(c[..n].chunks_exact(16)) {
        for l in 0..16 {
            let ab = ca[l] * cb[l];
            s1[l] += ab;
            s2[l] = ab.mul_add((cc[l] - m) * k, s2[l]);
        }
    }
    let (mut t1, mut t2) = (0.0f32, 0.0f32);
    for half in 0..8 {
        t1 += s1[half] + s1[half + 8];
        t2 += s2[half] + s2[half + 8];
    }
    for i in n..a.len() {
        let ab = a[i] * b[i];
        t1 += ab;
        t2 += ab * (c[i] - m) * k;
    }
    (t1, t2)
}

/// `tanh(x)` built on [`exp`]; absolute error about 1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (1.0 + exp(2.0 * x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_scalar() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
    }

    #[test]
    fn col_sums_of_a_column_block_match_scalar() {
        let (rows, cols, stride) = (70, 5, 7); // more than two reduction blocks; 2 columns ignored
        let x: Vec<f32> = (0..rows * stride).map(|i| (i as f32).sqrt()).collect();
        let mut out = vec![1.0f32; cols];
        add_col_sums_strided(&mut out, &x, rows, cols, stride);
        for c in 0..cols {
            let want: f64 = 1.0 + (0..rows).map(|r| x[r * stride + c] as f64).sum::<f64>();
            assert!((out[c] as f64 - want).abs() / want < 1e-5);
        }
    }
}
