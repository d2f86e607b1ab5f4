//! Element-wise activations: GELU (tanh approximation) for GPT-2 and SwiGLU for LLaMA.

use rayon::prelude::*;

use super::vec::{exp, tanh};

const PAR: usize = 1 << 14;
const GELU_K: f32 = 0.797_884_6; // sqrt(2/pi)
const GELU_C: f32 = 0.044_715;

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)))
}

#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    let t = tanh(GELU_K * (x + GELU_C * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)
}

/// `out = gelu(x)`.
pub fn gelu_forward(out: &mut [f32], x: &[f32]) {
    out.par_chunks_mut(PAR).zip(x.par_chunks(PAR)).for_each(|(o, x)| {
        for (o, x) in o.iter_mut().zip(x) {
            *o = gelu_one(*x);
        }
    });
}

/// In place: `d = d * gelu'(x)` (turns the output gradient into the input gradient).
pub fn gelu_backward_inplace(d: &mut [f32], x: &[f32]) {
    d.par_chunks_mut(PAR).zip(x.par_chunks(PAR)).for_each(|(d, x)| {
        for (d, x) in d.iter_mut().zip(x) {
            *d *= gelu_grad(*x);
        }
    });
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `out = silu(gate) * up`.
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(PAR).zip(gate.par_chunks(PAR).zip(up.par_chunks(PAR))).for_each(|(o, (g, u))| {
        for i in 0..o.len() {
            o[i] = g[i] * sigmoid(g[i]) * u[i];
        }
    });
}

/// Given `d_out` in `d_gate_out`, writes the gate gradient there and the up gradient into
/// `d_up_out`: one pass over the four arrays.
pub fn swiglu_backward(d_gate_out: &mut [f32], d_up_out: &mut [f32], gate: &[f32], up: &[f32]) {
    d_gate_out.par_chunks_mut(PAR).zip(d_up_out.par_chunks_mut(PAR)).zip(gate.par_chunks(PAR).zip(up.par_chunks(PAR))).for_each(
        |((dg, du), (g, u))| {
            for i in 0..dg.len() {
                let d = dg[i];
                let s = sigmoid(g[i]);
                let silu = g[i] * s;
                du[i] = d * silu;
                dg[i] = d * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::{assert_close, finite_diff, seeded};

    #[test]
    fn exp_and_tanh_are_accurate() {
        for i in -8000..8000 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            assert!(((got - want) / want).abs() < 1e-6, "exp({x}) = {got}, want {want}");
            assert!((tanh(x) as f64 - (x as f64).tanh()).abs() < 3e-7, "tanh({x})");
        }
    }

    #[test]
    fn gelu_matches_oracle_and_finite_differences() {
        let x = seeded(1000, 1, 6.0);
        let mut out = vec![0.0; x.len()];
        gelu_forward(&mut out, &x);
        let want: Vec<f32> = x.iter().map(|v| reference::gelu(*v)).collect();
        assert_close(&out, &want, 1e-6);
        let mut d = vec![1.0; x.len()];
        gelu_backward_inplace(&mut d, &x);
        let fd: Vec<f32> = x.iter().map(|v| finite_diff(&[*v], |y| reference::gelu(y[0]) as f64)[0]).collect();
        assert_close(&d, &fd, 2e-3);
    }

    #[test]
    fn swiglu_matches_oracle_and_finite_differences() {
        let (g, u) = (seeded(500, 2, 6.0), seeded(500, 3, 2.0));
        let mut out = vec![0.0; g.len()];
        swiglu_forward(&mut out, &g, &u);
        let want: Vec<f32> = g.iter().zip(&u).map(|(g, u)| reference::silu(*g) * u).collect();
        assert_close(&out, &want, 1e-6);
        let (mut dg, mut du) = (vec![1.0; g.len()], vec![0.0; g.len()]);
        swiglu_backward(&mut dg, &mut du, &g, &u);
        for i in 0..g.len() {
            let fg = finite_diff(&[g[i]], |y| (reference::silu(y[0]) * u[i]) as f64)[0];
            assert!((dg[i] - fg).abs() < 2e-3 * (1.0 + fg.abs()), "gate grad {i}");
            assert!((du[i] - reference::silu(g[i])).abs() < 1e-6);
        }
    }
}
