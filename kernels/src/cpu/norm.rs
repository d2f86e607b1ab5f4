//! LayerNorm and RMSNorm, forward and backward, over the last dimension of `[rows, cols]`.
//!
//! The forward saves one `rstd` (and for LayerNorm one `mean`) per row; the backward recomputes the
//! normalised input from them instead of storing it.

use rayon::prelude::*;

use super::vec::{dot, norm_backward_sums, sum, sum_sq_dev};
use super::REDUCE_ROWS;

/// `out = (x - mean) * rstd * w + b`, saving `mean` and `rstd` per row.
pub fn layernorm_forward(out: &mut [f32], mean: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let c = w.len();
    debug_assert!(x.len() == out.len() && x.len() == mean.len() * c && mean.len() == rstd.len() && b.len() == c);
    out.par_chunks_mut(c).zip(x.par_chunks(c)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(|((o, row), (mu, rs))| {
        let m = sum(row) / c as f32;
        let var = sum_sq_dev(row, m) / c as f32;
        let r = 1.0 / (var + eps).sqrt();
        for i in 0..c {
            o[i] = (row[i] - m) * r * w[i] + b[i];
        }
        *mu = m;
        *rs = r;
    });
}

/// Accumulates `dx += ∂L/∂x`, `dw += ∂L/∂w`, `db += ∂L/∂b`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(dx: &mut [f32], dw: &mut [f32], db: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32], w: &[f32]) {
    let c = w.len();
    let block = REDUCE_ROWS * c;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(block)
        .zip(dout.par_chunks(block).zip(x.par_chunks(block)))
        .zip(mean.par_chunks(REDUCE_ROWS).zip(rstd.par_chunks(REDUCE_ROWS)))
        .map(|((dxb, (dob, xb)), (mb, rb))| {
            let mut pw = vec![0.0f32; c];
            let mut pb = vec![0.0f32; c];
            for (r, ((dxr, dor), xr)) in dxb.chunks_mut(c).zip(dob.chunks(c)).zip(xb.chunks(c)).enumerate() {
                let (m, rs) = (mb[r], rb[r]);
                let (sum_dn, sum_dn_xhat) = norm_backward_sums(dor, w, xr, m, rs);
                let (mean_dn, mean_dn_xhat) = (sum_dn / c as f32, sum_dn_xhat / c as f32);
                for i in 0..c {
                    let xhat = (xr[i] - m) * rs;
                    pw[i] = dor[i].mul_add(xhat, pw[i]);
                    pb[i] += dor[i];
                }
                for i in 0..c {
                    let xhat = (xr[i] - m) * rs;
                    let dn = dor[i] * w[i];
                    dxr[i] += rs * (dn - mean_dn - xhat * mean_dn_xhat);
                }
            }
            (pw, pb)
        })
        .collect();
    for (pw, pb) in &partials {
        for i in 0..c {
            dw[i] += pw[i];
            db[i] += pb[i];
        }
    }
}

/// `out = x * rstd * w` with `rstd = 1/sqrt(mean(x²) + eps)`, saving `rstd` per row.
pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let c = w.len();
    debug_assert!(x.len() == out.len() && x.len() == rstd.len() * c);
    out.par_chunks_mut(c).zip(x.par_chunks(c)).zip(rstd.par_iter_mut()).for_each(|((o, row), rs)| {
        let ms = dot(row, row) / c as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..c {
            o[i] = row[i] * r * w[i];
        }
        *rs = r;
    });
}

/// Accumulates `dx += ∂L/∂x` and `dw += ∂L/∂w`.
pub fn rmsnorm_backward(dx: &mut [f32], dw: &mut [f32], dout: &[f32], x: &[f32], rstd: &[f32], w: &[f32]) {
    let c = w.len();
    let block = REDUCE_ROWS * c;
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(block)
        .zip(dout.par_chunks(block).zip(x.par_chunks(block)))
        .zip(rstd.par_chunks(REDUCE_ROWS))
        .map(|((dxb, (dob, xb)), rb)| {
            let mut pw = vec![0.0f32; c];
            for (r, ((dxr, dor), xr)) in dxb.chunks_mut(c).zip(dob.chunks(c)).zip(xb.chunks(c)).enumerate() {
                let rs = rb[r];
                let mean_dn_xhat = norm_backward_sums(dor, w, xr, 0.0, rs).1 / c as f32;
                for i in 0..c {
                    pw[i] = dor[i].mul_add(xr[i] * rs, pw[i]);
                }
                for i in 0..c {
                    dxr[i] += rs * (dor[i] * w[i] - xr[i] * rs * mean_dn_xhat);
                }
            }
            pw
        })
        .collect();
    for pw in &partials {
        for i in 0..c {
            dw[i] += pw[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::{assert_close, finite_diff, seeded};

    const C: usize = 24;
    const ROWS: usize = 70; // more than two reduction blocks

    #[test]
    fn layernorm_forward_matches_oracle() {
        let (x, w, b) = (seeded(ROWS * C, 1, 2.0), seeded(C, 2, 1.0), seeded(C, 3, 1.0));
        let mut out = vec![0.0; ROWS * C];
        let (mut m, mut r) = (vec![0.0; ROWS], vec![0.0; ROWS]);
        layernorm_forward(&mut out, &mut m, &mut r, &x, &w, &b, 1e-5);
        assert_close(&out, &reference::layernorm(&x, &w, &b, 1e-5), 1e-5);
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let rows = 3;
        let (x, w, b) = (seeded(rows * C, 4, 2.0), seeded(C, 5, 1.0), seeded(C, 6, 1.0));
        let probe = seeded(rows * C, 7, 1.0); // L = sum(probe * out)
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            reference::layernorm(x, w, b, 1e-5).iter().zip(&probe).map(|(o, p)| *o as f64 * *p as f64).sum()
        };
        let mut out = vec![0.0; rows * C];
        let (mut m, mut r) = (vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(&mut out, &mut m, &mut r, &x, &w, &b, 1e-5);
        let (mut dx, mut dw, mut db) = (vec![0.0; rows * C], vec![0.0; C], vec![0.0; C]);
        layernorm_backward(&mut dx, &mut dw, &mut db, &probe, &x, &m, &r, &w);
        assert_close(&dx, &finite_diff(&x, |v| loss(v, &w, &b)), 2e-3);
        assert_close(&dw, &finite_diff(&w, |v| loss(&x, v, &b)), 2e-3);
        assert_close(&db, &finite_diff(&b, |v| loss(&x, &w, v)), 2e-3);
    }

    #[test]
    fn rmsnorm_forward_matches_oracle() {
        let (x, w) = (seeded(ROWS * C, 8, 2.0), seeded(C, 9, 1.0));
        let mut out = vec![0.0; ROWS * C];
        let mut r = vec![0.0; ROWS];
        rmsnorm_forward(&mut out, &mut r, &x, &w, 1e-6);
        assert_close(&out, &reference::rmsnorm(&x, &w, 1e-6), 1e-5);
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let rows = 3;
        let (x, w) = (seeded(rows * C, 10, 2.0), seeded(C, 11, 1.0));
        let probe = seeded(rows * C, 12, 1.0);
        let loss =
            |x: &[f32], w: &[f32]| -> f64 { reference::rmsnorm(x, w, 1e-6).iter().zip(&probe).map(|(o, p)| *o as f64 * *p as f64).sum() };
        let mut out = vec![0.0; rows * C];
        let mut r = vec![0.0; rows];
        rmsnorm_forward(&mut out, &mut r, &x, &w, 1e-6);
        let (mut dx, mut dw) = (vec![0.0; rows * C], vec![0.0; C]);
        rmsnorm_backward(&mut dx, &mut dw, &probe, &x, &r, &w);
        assert_close(&dx, &finite_diff(&x, |v| loss(v, &w)), 2e-3);
        assert_close(&dw, &finite_diff(&w, |v| loss(&x, v)), 2e-3);
    }
}
