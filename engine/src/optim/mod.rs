//! AdamW over the parameter table, the learning-rate schedule and gradient clipping.

mod schedule;

pub use schedule::{LrSchedule, Schedule};

use gantry_kernels::cpu::adamw::AdamWStep;

use std::ops::Range;

use crate::backend::{Backend, Cpu, Span, SpanMut};
use crate::params::{ParamBuffers, ParamTable};
use crate::Result;

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
        self.update_on(&Cpu, table, pieces, params, None, Grads::Full(grads), m, v, lr, step)
            .expect("the CPU update keeps no working copy, so cannot fail");
    }

    /// The update on backend `be`, each tensor's part of each piece where the piece lives (the
    /// one AdamW of both backends): `params` are the f32 masters, and `work`, when the backend
    /// computes in 16 bits, their working copy, written in the same pass.
    #[allow(clippy::too_many_arguments)]
    pub fn update_on<B: Backend>(
        &self,
        be: &B,
        table: &ParamTable,
        pieces: &[Range<usize>],
        params: &mut B::F32,
        mut work: Option<&mut B::Act>,
        grads: Grads<'_, B::F32>,
        m: &mut B::F32,
        v: &mut B::F32,
        lr: f32,
        step: u32,
    ) -> Result<()> {
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
                    Grads::Full(g) => Span::new(g, lo..hi),
                    Grads::Pieces(g) => Span::new(g, s.clone()),
                };
                let wk = work.as_deref_mut().map(|w| SpanMut::new(w, lo..hi));
                be.adamw(
                    SpanMut::new(&mut *params, lo..hi),
                    wk,
                    g,
                    SpanMut::new(&mut *m, s.clone()),
                    SpanMut::new(&mut *v, s),
                    &hp,
                    e.decay,
                )?;
            }
            at += piece.len();
        }
        Ok(())
    }
}

/// Where an update finds its gradients.
pub enum Grads<'a, X: ?Sized = [f32]> {
    /// The whole flat buffer.
    Full(&'a X),
    /// Only the updated pieces, concatenated like the moments (ZeRO-2 and 3).
    Pieces(&'a X),
}

impl<X: ?Sized> Clone for Grads<'_, X> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<X: ?Sized> Copy for Grads<'_, X> {}

/// Scales `grads` so their global norm is at most `max_norm` (as `torch.nn.utils.clip_grad_norm_`
/// does, with its 1e-6 guard); returns the norm before clipping. `max_norm = 0` disables it.
///
/// A norm that is not finite (a NaN or infinite gradient) scales nothing: no factor makes such
/// gradients usable (an infinite norm's factor of 0 would turn infinities into NaN), and the
/// caller skips the update instead (see `train::MAX_NONFINITE_STEPS_IN_A_ROW`).
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let all = 0..grads.len();
    clip_on(&Cpu, grads, &[all], None, max_norm).expect("the CPU's norm and scaling cannot fail")
}

/// The one clipping of both backends: the norm of `grads` over `spans` (the parts this rank
/// owns), their squares summed across the group by `group` when the parts differ between ranks,
/// and those parts scaled as `clip_grad_norm` says. Every rank of a group gets the same norm.
pub fn clip_on<B: Backend>(
    be: &B,
    grads: &mut B::F32,
    spans: &[Range<usize>],
    group: Option<&mut dyn FnMut(f64) -> Result<f64>>,
    max_norm: f64,
) -> Result<f64> {
    let mut squares = be.sum_squares(grads, spans)?;
    if let Some(sum) = group {
        squares = sum(squares)?;
    }
    let norm = squares.sqrt();
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for s in spans {
                be.scale(SpanMut::new(&mut *grads, s.clone()), coef as f32)?;
            }
        }
    }
    Ok(norm)
}
