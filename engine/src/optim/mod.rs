//! AdamW over the parameter table, the learning-rate schedule and gradient clipping.

mod schedule;

pub use schedule::{LrSchedule, Schedule};

use gantry_kernels::cpu::adamw::{adamw_update, AdamWStep};
use gantry_kernels::cpu::vec::{scale, sum_squares};

use std::ops::Range;

use crate::params::{ParamBuffers, ParamTable};

/// AdamW's constant hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    /// One update of every parameter at learning rate `lr`, `step` counting from 1. Weight decay
    /// applies to matrices (embeddings included), never to norms and biases. Runs over each
    /// parameter's range so the decay flag is per tensor; the kernel itself is parallel.
    ///
    /// Only the parameters of `buf.pieces` are updated (all of them unless ZeRO shards the
    /// optimizer state); a tensor cut by a piece's edges is updated in the part inside it.
    pub fn step(&self, table: &ParamTable, buf: &mut ParamBuffers, lr: f32, step: u32) {
        let ParamBuffers { params, grads, pieces, m, v } = buf;
        self.update_pieces(table, pieces, params, Grads::Full(grads), m, v, lr, step);
    }

    /// The update of `pieces` of the flat buffer, whose moments `m` and `v` hold concatenated.
    #[allow(clippy::too_many_arguments)]
    pub fn update_pieces(
        &self,
        table: &ParamTable,
        pieces: &[Range<usize>],
        params: &mut [f32],
        grads: Grads<'_>,
        m: &mut [f32],
        v: &mut [f32],
        lr: f32,
        step: u32,
    ) {
        let hp = AdamWStep { lr, beta1: self.beta1, beta2: self.beta2, eps: self.eps, weight_decay: self.weight_decay, step };
        let mut at = 0;
        for piece in pieces {
            for e in table.entries() {
                let r = e.at.range();
                let (lo, hi) = (r.start.max(piece.start), r.end.min(piece.end));
                if lo >= hi {
                    continue;
                }
                let s = at + lo - piece.start..at + hi - piece.start;
                let g = match grads {
                    Grads::Full(g) => &g[lo..hi],
                    Grads::Pieces(g) => &g[s.clone()],
                };
                adamw_update(&mut params[lo..hi], g, &mut m[s.clone()], &mut v[s], &hp, e.decay);
            }
            at += piece.len();
        }
    }
}

/// Where an update finds its gradients.
#[derive(Clone, Copy, Debug)]
pub enum Grads<'a> {
    /// The whole flat buffer.
    Full(&'a [f32]),
    /// Only the updated pieces, concatenated like the moments (ZeRO-2 and 3).
    Pieces(&'a [f32]),
}

/// The global L2 norm of `grads`.
pub fn grad_norm(grads: &[f32]) -> f64 {
    sum_squares(grads).sqrt()
}

/// Scales `grads` so their global norm is at most `max_norm` (as `torch.nn.utils.clip_grad_norm_`
/// does, with its 1e-6 guard); returns the norm before clipping. `max_norm = 0` disables it.
///
/// A norm that is not finite (a NaN or infinite gradient) scales nothing: no factor makes such
/// gradients usable (an infinite norm's factor of 0 would turn infinities into NaN), and the
/// caller skips the update instead (see `train::MAX_NONFINITE_STEPS_IN_A_ROW`).
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            scale(grads, coef as f32);
        }
    }
    norm
}
