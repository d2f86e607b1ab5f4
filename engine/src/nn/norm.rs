//! LayerNorm and RMSNorm layers over the last dimension.

use crate::backend::{Backend, Span, SpanMut, Weights};
use crate::params::ParamRef;
use crate::Result;

#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    pub weight: ParamRef,
    pub bias: ParamRef,
    pub eps: f32,
}

impl LayerNorm {
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        x: Span<'_, B::Act>,
        out: SpanMut<'_, B::Act>,
        mean: SpanMut<'_, B::F32>,
        rstd: SpanMut<'_, B::F32>,
    ) -> Result<()> {
        be.layernorm_forward(out, mean, rstd, x, Span::new(p.master, self.weight.range()), Span::new(p.master, self.bias.range()), self.eps)
    }

    /// `dx += …`; weight and bias gradients accumulate into `g`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        g: &mut B::F32,
        dx: SpanMut<'_, B::Act>,
        dout: Span<'_, B::Act>,
        x: Span<'_, B::Act>,
        mean: Span<'_, B::F32>,
        rstd: Span<'_, B::F32>,
    ) -> Result<()> {
        be.layernorm_backward(dx, g, self.weight.range(), self.bias.range(), dout, x, mean, rstd, Span::new(p.master, self.weight.range()))
    }

    /// The weight and the bias (declared together: one contiguous range).
    pub fn range(&self) -> std::ops::Range<usize> {
        crate::models::hooks::span([self.weight.range(), self.bias.range()])
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    pub weight: ParamRef,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        x: Span<'_, B::Act>,
        out: SpanMut<'_, B::Act>,
        rstd: SpanMut<'_, B::F32>,
    ) -> Result<()> {
        be.rmsnorm_forward(out, rstd, x, Span::new(p.master, self.weight.range()), self.eps)
    }

    /// `dx += …`; the weight's gradient accumulates into `g`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        p: Weights<'_, B>,
        g: &mut B::F32,
        dx: SpanMut<'_, B::Act>,
        dout: Span<'_, B::Act>,
        x: Span<'_, B::Act>,
        rstd: Span<'_, B::F32>,
    ) -> Result<()> {
        be.rmsnorm_backward(dx, SpanMut::new(g, self.weight.range()), dout, x, rstd, Span::new(p.master, self.weight.range()))
    }
}
