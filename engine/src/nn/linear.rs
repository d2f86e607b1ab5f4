//! `y = x · W + b` over rows, with the weight read in place in its checkpoint layout.

use crate::backend::{Accumulate, Backend, Mat, MatMut, Span, SpanMut, Weights};
use crate::params::ParamRef;
use crate::Result;

/// How a checkpoint stores the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[out, in]`: `torch.nn.Linear` (LLaMA).
    OutIn,
    /// `[in, out]`: GPT-2's `Conv1D`.
    InOut,
}

/// A dense layer. Inputs and outputs are `(buffer, row stride)` pairs so that a projection can read
/// or write a column block of a wider buffer (LLaMA's q, k and v share one fused buffer).
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub weight: ParamRef,
    pub bias: Option<ParamRef>,
    pub d_in: usize,
    pub d_out: usize,
    pub layout: WeightLayout,
    /// A row-parallel layer on a rank other than the lead (`models::TpRank`): its output is a
    /// partial sum the group adds up, so the bias, which the lead adds, is left out of its
    /// forward (its gradient is still every rank's, the output gradient being the same on each).
    pub partial: bool,
    /// Under split_gather, a row-parallel layer's bias gradient is the lead rank's alone: every
    /// rank sees the whole output gradient, and the group sums whole parameters' gradients
    /// (norms see only a rank's part of each sequence), so the others leave it at zero.
    pub lead_bias_grad: bool,
}

impl Linear {
    /// The weight and its bias (declared together: one contiguous range).
    pub fn range(&self) -> std::ops::Range<usize> {
        let w = self.weight.range();
        match self.bias {
            Some(b) => w.start.min(b.offset)..w.end.max(b.offset + b.len),
            None => w,
        }
    }

    /// The weight as an `[in, out]` view.
    fn w<'a, B: Backend>(&self, p: Weights<'a, B>) -> Mat<'a, B::Act> {
        match self.layout {
            WeightLayout::OutIn => Mat::new(p.w, self.weight.offset, self.d_out, self.d_in).t(),
            WeightLayout::InOut => Mat::new(p.w, self.weight.offset, self.d_in, self.d_out),
        }
    }

    /// `y (+)= x · W + b` over the rows of `x` (`[rows, in]`) into `y` (`[rows, out]`); either may
    /// be a column block of a wider buffer.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        x: Mat<'_, B::Act>,
        mut y: MatMut<'_, B::Act>,
        acc: Accumulate,
    ) -> Result<()> {
        let mut acc = acc;
        if let Some(b) = self.bias.filter(|_| !self.partial) {
            be.add_bias(y.reborrow(), Span::new(p.master, b.range()), acc)?;
            acc = Accumulate::Add;
        }
        be.matmul(y, x, self.w(p), acc)
    }

    /// Accumulates the weight and bias gradients (into `g`) from the output gradient `dy` and the
    /// saved input `x`, and writes (or adds) the input gradient into `dx` when asked.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        g: &mut B::F32,
        x: Mat<'_, B::Act>,
        dy: Mat<'_, B::Act>,
        dx: Option<(MatMut<'_, B::Act>, Accumulate)>,
    ) -> Result<()> {
        let off = self.weight.offset;
        match self.layout {
            WeightLayout::OutIn => be.matmul_grad(MatMut::new(&mut *g, off, self.d_out, self.d_in), dy.t(), x)?,
            WeightLayout::InOut => be.matmul_grad(MatMut::new(&mut *g, off, self.d_in, self.d_out), x.t(), dy)?,
        }
        if let Some(b) = self.bias.filter(|_| !(self.lead_bias_grad && self.partial)) {
            be.bias_grad(SpanMut::new(g, b.range()), dy)?;
        }
        if let Some((dx, acc)) = dx {
            be.matmul(dx, dy, self.w(p).t(), acc)?;
        }
        Ok(())
    }
}
