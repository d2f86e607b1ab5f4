//! One training step, the same on both backends: zero the gradients, forward and backward over
//! the rank's micro-batches, the group's loss, the update (`update.rs`), and what brings every
//! rank the parameters it needs next. What a parallel layout adds (the hooks the model runs
//! with, the collectives, the gathers) comes from a [`Layout`]: one CPU rank on its own
//! ([`Alone`]), data parallelism and ZeRO over sockets (`parallel::DataParallel`), or a GPU rank,
//! alone or in a dp group over NCCL or host memory (`cuda::GpuLayout`).

use std::ops::Range;

use super::update::{self, LossScale, Outcome, Summed, Update};
use crate::backend::{Backend, SpanMut, Weights};
use crate::models::{Activations, Model};
use crate::{Error, Result};

/// A rank's training state as a step sees it, wherever it lives.
pub struct State<'a, B: Backend> {
    /// The f32 master parameters, `len` of them (the flat buffer).
    pub params: &'a mut B::F32,
    /// Their working copy in 16 bits, when the backend computes in 16 bits.
    pub work: Option<&'a mut B::Act>,
    pub grads: &'a mut B::F32,
    /// AdamW's moments for `pieces`, concatenated.
    pub m: &'a mut B::F32,
    pub v: &'a mut B::F32,
    pub pieces: &'a [Range<usize>],
    pub len: usize,
}

impl<B: Backend> State<'_, B> {
    /// The parameters as the model reads them: the working copy, or the masters themselves.
    pub fn weights<'s>(be: &B, params: &'s B::F32, work: Option<&'s B::Act>) -> Result<Weights<'s, B>> {
        let w = match work {
            Some(w) => w,
            None => be.f32_as_act(params).ok_or_else(|| Error::Device("a 16-bit backend without a working copy".into()))?,
        };
        Ok(Weights { w, master: params })
    }
}

/// What a parallel layout adds to a step.
pub trait Layout<B: Backend> {
    /// Whether the gradients start the step at zero already (ZeRO-2/3 released them).
    fn grads_start_zero(&self) -> bool {
        false
    }

    /// Forward and backward of micro-batch `k` of `n`, accumulating `scale ×` the gradients.
    #[allow(clippy::too_many_arguments)]
    fn forward_backward(
        &mut self,
        be: &B,
        model: &Model,
        st: &mut State<'_, B>,
        acts: &mut Activations<B>,
        windows: &[u32],
        scale: f32,
        k: usize,
        n: usize,
    ) -> Result<f64>;

    /// The group's sum of a per-rank value (the loss).
    fn sum(&mut self, x: f64) -> Result<f64>;

    /// The update, given where this layout leaves the summed gradients.
    fn update(&mut self, be: &B, u: &Update<'_>, st: &mut State<'_, B>, scaler: Option<&mut LossScale>) -> Result<Outcome>;

    /// After the update (`applied`) or its skipping.
    fn after_update(&mut self, be: &B, st: &mut State<'_, B>, applied: bool) -> Result<()>;
}

/// One optimizer step over `batches` (this rank's micro-batches, each `[b, seq+1]` tokens), the
/// loss gradient scaled by `scale`: the group's summed loss and what became of the update.
#[allow(clippy::too_many_arguments)]
pub fn step<B: Backend>(
    be: &B,
    model: &Model,
    layout: &mut dyn Layout<B>,
    st: &mut State<'_, B>,
    acts: &mut Activations<B>,
    batches: &[&[u32]],
    scale: f32,
    u: &Update<'_>,
    scaler: Option<&mut LossScale>,
) -> Result<(f64, Outcome)> {
    if !layout.grads_start_zero() {
        be.zero_f32(SpanMut::new(&mut *st.grads, 0..st.len))?;
    }
    let mut loss = 0.0;
    for (k, w) in batches.iter().enumerate() {
        loss += layout.forward_backward(be, model, st, acts, w, scale, k, batches.len())?;
    }
    let loss = layout.sum(loss)?;
    let outcome = layout.update(be, u, st, scaler)?;
    layout.after_update(be, st, !outcome.skipped)?;
    Ok((loss, outcome))
}

/// One rank on its own.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alone;

impl<B: Backend> Layout<B> for Alone {
    fn forward_backward(
        &mut self,
        be: &B,
        model: &Model,
        st: &mut State<'_, B>,
        acts: &mut Activations<B>,
        windows: &[u32],
        scale: f32,
        _: usize,
        _: usize,
    ) -> Result<f64> {
        let mut w = State::weights(be, st.params, st.work.as_deref())?;
        model.forward_backward_on(be, &mut w, st.grads, acts, windows, scale)
    }

    fn sum(&mut self, x: f64) -> Result<f64> {
        Ok(x)
    }

    fn update(&mut self, be: &B, u: &Update<'_>, st: &mut State<'_, B>, scaler: Option<&mut LossScale>) -> Result<Outcome> {
        let whole = std::iter::once(0..st.len).collect::<Vec<_>>();
        let summed = Summed::Full { grads: &mut *st.grads, norm: &whole };
        update::apply(be, u, st.params, st.work.as_deref_mut(), summed, st.m, st.v, None, scaler)
    }

    fn after_update(&mut self, _: &B, _: &mut State<'_, B>, _: bool) -> Result<()> {
        Ok(())
    }
}
