//! The AdamW update over a whole range of the flat parameter buffer: parameter, gradient and both
//! moments are read once and written once, in PyTorch's formulation (decoupled decay first, then
//! the bias-corrected step).

use rayon::prelude::*;

/// Hyper-parameters of one optimizer step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for the bias corrections.
    pub step: u32,
}

/// The per-step scalars of the update, derived once per tensor (in f64 where the bias
/// corrections need it). The CUDA kernel takes the same values, so both paths round alike.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `1 - lr * weight_decay` (decoupled decay), or 1 without decay.
    pub shrink: f32,
    /// `lr / (1 - beta1^step)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^step)`.
    pub bc2_sqrt: f32,
}

impl AdamWStep {
    pub fn scalars(&self, decay: bool) -> AdamWScalars {
        let wd = if decay { self.weight_decay } else { 0.0 };
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.step as i32);
        AdamWScalars { shrink: 1.0 - self.lr * wd, step_size: (self.lr as f64 / bc1) as f32, bc2_sqrt: bc2.sqrt() as f32 }
    }
}

const PAR: usize = 1 << 15;

/// Updates `p`, `m`, `v` in place from `g`. `decay` selects whether weight decay applies.
pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep, decay: bool) {
    debug_assert!(p.len() == g.len() && g.len() == m.len() && m.len() == v.len());
    let AdamWScalars { shrink, step_size, bc2_sqrt } = hp.scalars(decay);
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    p.par_chunks_mut(PAR).zip(g.par_chunks(PAR)).zip(m.par_chunks_mut(PAR).zip(v.par_chunks_mut(PAR))).for_each(|((p, g), (m, v))| {
        for i in 0..p.len() {
            let gi = g[i];
            let mi = m[i] + (1.0 - b1) * (gi - m[i]);
            let vi = v[i] * b2 + (1.0 - b2) * gi * gi;
            m[i] = mi;
            v[i] = vi;
            let denom = vi.sqrt() / bc2_sqrt + eps;
            p[i] = p[i] * shrink - step_size * mi / denom;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::reference;
    use crate::cpu::test_util::{assert_close, seeded};

    #[test]
    fn three_steps_match_oracle() {
        let n = 100_000;
        let (mut p, mut m, mut v) = (seeded(n, 1, 1.0), vec![0.0; n], vec![0.0; n]);
        let (mut rp, mut rm, mut rv) = (p.clone(), m.clone(), v.clone());
        for step in 1..=3 {
            let g = seeded(n, 10 + step as u64, 0.1);
            let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step };
            adamw_update(&mut p, &g, &mut m, &mut v, &hp, true);
            reference::adamw(&mut rp, &g, &mut rm, &mut rv, 1e-2, 0.9, 0.95, 1e-8, 0.1, step);
        }
        assert_close(&p, &rp, 1e-5);
        assert_close(&m, &rm, 1e-5);
        assert_close(&v, &rv, 1e-5);
    }
}
