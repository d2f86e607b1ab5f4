//! How parallel wrappers observe a model's use of its parameters without the model knowing about
//! parallelism: the model says which parameters it is about to read and which gradients are final;
//! ZeRO-3 gathers parameters on the first, DDP and ZeRO-2 communicate gradients on the second.

use std::ops::Range;

use crate::backend::{Backend, Cpu, Weights};
use crate::Result;

/// Called by a model during forward and backward. Ranges are of the flat buffer and cover whole
/// tensors, or whole-row slices of a tensor split across chunks (`ParamTable::slices`).
pub trait ParamHooks {
    /// The parameters in `ranges` are about to be read (together: all of them stay needed until
    /// the next call).
    fn need_params(&mut self, params: &mut [f32], ranges: &[Range<usize>]) -> Result<()> {
        let _ = (params, ranges);
        Ok(())
    }

    /// The gradients in `range` are final for this backward pass (the model will not add to them
    /// again before it returns).
    fn grads_ready(&mut self, grads: &mut [f32], range: Range<usize>) -> Result<()> {
        let _ = (grads, range);
        Ok(())
    }
}

/// No wrapper: every parameter is always present.
pub struct NoHooks;

impl ParamHooks for NoHooks {}

/// What a model sees of its parameters, on backend `B`: read access announced before each use,
/// and a place to say which gradients are final.
pub trait Params<B: Backend = Cpu> {
    fn need(&mut self, ranges: &[Range<usize>]) -> Result<()>;
    fn get(&self) -> Weights<'_, B>;
    fn grads_ready(&mut self, grads: &mut B::F32, range: Range<usize>) -> Result<()>;
}

/// Parameters that are all present, with no one to tell.
impl<B: Backend> Params<B> for Weights<'_, B> {
    fn need(&mut self, _: &[Range<usize>]) -> Result<()> {
        Ok(())
    }

    fn get(&self) -> Weights<'_, B> {
        *self
    }

    fn grads_ready(&mut self, _: &mut B::F32, _: Range<usize>) -> Result<()> {
        Ok(())
    }
}

impl Params<Cpu> for &[f32] {
    fn need(&mut self, _: &[Range<usize>]) -> Result<()> {
        Ok(())
    }

    fn get(&self) -> Weights<'_, Cpu> {
        Weights { w: self, master: self }
    }

    fn grads_ready(&mut self, _: &mut [f32], _: Range<usize>) -> Result<()> {
        Ok(())
    }
}

/// Parameters whose uses are reported to hooks.
pub struct Hooked<'a> {
    pub params: &'a mut [f32],
    pub hooks: &'a mut dyn ParamHooks,
}

impl Params<Cpu> for Hooked<'_> {
    fn need(&mut self, ranges: &[Range<usize>]) -> Result<()> {
        self.hooks.need_params(self.params, ranges)
    }

    fn get(&self) -> Weights<'_, Cpu> {
        Weights { w: self.params, master: self.params }
    }

    fn grads_ready(&mut self, grads: &mut [f32], range: Range<usize>) -> Result<()> {
        self.hooks.grads_ready(grads, range)
    }
}

/// The smallest range covering `refs`.
pub fn span(refs: impl IntoIterator<Item = Range<usize>>) -> Range<usize> {
    let (lo, hi) = refs.into_iter().fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r.start), hi.max(r.end)));
    lo.min(hi)..hi
}
