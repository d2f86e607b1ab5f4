//! `y = x · W + b` over rows, with the weight read in place in its checkpoint layout.

use gantry_kernels::cpu::matmul::{matmul, Accumulate, MatMut, MatRef, Threads};
use gantry_kernels::cpu::vec::add_col_sums_strided;

use crate::params::ParamRef;

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
    fn w<'a>(&self, params: &'a [f32]) -> MatRef<'a> {
        let w = self.weight.get(params);
        match self.layout {
            WeightLayout::OutIn => MatRef::new(w, self.d_out, self.d_in).t(),
            WeightLayout::InOut => MatRef::new(w, self.d_in, self.d_out),
        }
    }

    /// `y (+)= x · W + b` for `rows` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, params: &[f32], x: &[f32], x_stride: usize, y: &mut [f32], y_stride: usize, rows: usize, acc: Accumulate) {
        let mut acc = acc;
        if let Some(b) = self.bias {
            let b = b.get(params);
            for r in 0..rows {
                let row = &mut y[r * y_stride..r * y_stride + self.d_out];
                if acc == Accumulate::Add {
                    row.iter_mut().zip(b).for_each(|(o, b)| *o += *b);
                } else {
                    row.copy_from_slice(b);
                }
            }
            acc = Accumulate::Add;
        }
        let xv = MatRef::strided(x, rows, self.d_in, x_stride, 1);
        let yv = MatMut::strided(y, rows, self.d_out, y_stride, 1);
        matmul(yv, xv, self.w(params), acc, Threads::Pool);
    }

    /// Accumulates the weight and bias gradients from the output gradient `dy` and the saved
    /// input `x`, and writes (or adds) the input gradient into `dx` when asked.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        x: (&[f32], usize),
        dy: (&[f32], usize),
        dx: Option<(&mut [f32], usize, Accumulate)>,
        rows: usize,
    ) {
        let xv = MatRef::strided(x.0, rows, self.d_in, x.1, 1);
        let dyv = MatRef::strided(dy.0, rows, self.d_out, dy.1, 1);
        {
            let dw = self.weight.get_mut(grads);
            match self.layout {
                WeightLayout::OutIn => matmul(MatMut::new(dw, self.d_out, self.d_in), dyv.t(), xv, Accumulate::Add, Threads::Pool),
                WeightLayout::InOut => matmul(MatMut::new(dw, self.d_in, self.d_out), xv.t(), dyv, Accumulate::Add, Threads::Pool),
            }
        }
        if let Some(b) = self.bias {
            add_col_sums_strided(b.get_mut(grads), dy.0, rows, self.d_out, dy.1);
        }
        if let Some((dx, stride, acc)) = dx {
            let dxv = MatMut::strided(dx, rows, self.d_in, stride, 1);
            matmul(dxv, dyv, self.w(params).t(), acc, Threads::Pool);
        }
    }
}
