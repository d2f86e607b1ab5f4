//! LayerNorm and RMSNorm layers over the last dimension.

use gantry_kernels::cpu::norm;

use super::two_mut;
use crate::params::ParamRef;

#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    pub weight: ParamRef,
    pub bias: ParamRef,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, params: &[f32], x: &[f32], out: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
        norm::layernorm_forward(out, mean, rstd, x, self.weight.get(params), self.bias.get(params), self.eps);
    }

    /// `dx += …`; weight and bias gradients accumulate.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, params: &[f32], grads: &mut [f32], dx: &mut [f32], dout: &[f32], x: &[f32], mean: &[f32], rstd: &[f32]) {
        let (dw, db) = two_mut(grads, self.weight, self.bias);
        norm::layernorm_backward(dx, dw, db, dout, x, mean, rstd, self.weight.get(params));
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RmsNorm {
    pub weight: ParamRef,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, params: &[f32], x: &[f32], out: &mut [f32], rstd: &mut [f32]) {
        norm::rmsnorm_forward(out, rstd, x, self.weight.get(params), self.eps);
    }

    /// `dx += …`; the weight gradient accumulates.
    pub fn backward(&self, params: &[f32], grads: &mut [f32], dx: &mut [f32], dout: &[f32], x: &[f32], rstd: &[f32]) {
        norm::rmsnorm_backward(dx, self.weight.get_mut(grads), dout, x, rstd, self.weight.get(params));
    }
}
