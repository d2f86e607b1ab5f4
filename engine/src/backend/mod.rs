//! The operations a model runs, over either backend: the CPU kernels (`kernels::cpu`) or the CUDA
//! ones (`kernels::cuda::ops`). A model is written once, against [`Backend`]; the parallel
//! wrappers and the trainer drive it the same way on both.
//!
//! A backend names its storage: `Act`, where activations and the weights the matmuls read live
//! (`[f32]` on CPU; a device allocation in the working precision on GPU), and `F32`, where the
//! f32 master parameters, gradients and norm statistics live (`[f32]`; a device allocation of
//! f32). Operations take views that carry their shape ([`Span`], [`Mat`]), so a caller says
//! "rows 0..n of layer l's stack" or "the k block of the fused QKV buffer" once, and the backend
//! turns that into a slice or a device pointer with a leading dimension.
//!
//! Parameters are read through [`Weights`]: the matmul operand in `Act` and the masters (norm
//! weights, biases, embedding tables) in `F32`. On CPU both are the one f32 buffer; on GPU the
//! first is the bf16/f16 working copy (or the masters themselves in f32). Weight gradients are
//! always accumulated into f32 (`matmul_grad`), as PyTorch's autocast does.

pub mod cpu;
pub mod cuda;
mod view;

use std::borrow::BorrowMut;
use std::ops::Range;

pub use gantry_kernels::cpu::adamw::AdamWStep;
use gantry_kernels::cpu::attention::AttnShape;
pub use gantry_kernels::cpu::matmul::Accumulate;
use gantry_kernels::cpu::rope::RopeTable;

pub use cpu::Cpu;
pub use cuda::Cuda;
pub use view::{Mat, MatMut, Span, SpanMut};

use crate::Result;

/// A model's parameters as its layers read them.
pub struct Weights<'a, B: Backend> {
    /// The matmul operands (the working precision).
    pub w: &'a B::Act,
    /// The f32 masters: norm weights, biases, embedding tables.
    pub master: &'a B::F32,
}

impl<B: Backend> Clone for Weights<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Weights<'_, B> {}

/// Token ids of a micro-batch: the host copy (the embedding's backward buckets rows by token on
/// the host, on both backends) and the device's, rows `at..at + host.len()` of it.
pub struct Ids<'a, B: Backend> {
    pub host: &'a [u32],
    pub dev: &'a B::Tokens,
    pub at: usize,
}

impl<B: Backend> Clone for Ids<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Ids<'_, B> {}

impl<'a, B: Backend> Ids<'a, B> {
    /// Rows `range` of these ids.
    pub fn rows(&self, range: Range<usize>) -> Ids<'a, B> {
        Ids { host: &self.host[range.clone()], dev: self.dev, at: self.at + range.start }
    }
}

/// The operation set both backends implement. Every operation checks what it can and returns
/// an error rather than touching memory outside a view (the CPU kernels panic on a shape bug, as
/// they always have: shapes are fixed when a model is built).
pub trait Backend: Sized {
    /// Activations and matmul weights.
    type Act: ?Sized;
    /// f32 masters, gradients, norm statistics, the attention's log-sum-exp.
    type F32: ?Sized;
    type ActBuf: BorrowMut<Self::Act> + Send;
    type F32Buf: BorrowMut<Self::F32> + Send;
    /// Token ids on the device (nothing on CPU, which reads the host copy).
    type Tokens: Send;
    /// The rotary table where the kernels read it.
    type Rope: Send;
    /// Where the head's per-row losses collect until `loss_sum` reads them.
    type Losses: Send;

    /// Elements of one block of the head's logits: the head runs a block of rows at a time, and
    /// larger blocks sweep its weight gradient fewer times.
    const HEAD_BLOCK_FLOATS: usize;

    /// "cpu", or the GPU and its precision.
    fn describe(&self) -> String;

    /// An owned buffer as the storage views point into.
    fn act(b: &Self::ActBuf) -> &Self::Act {
        <Self::ActBuf as std::borrow::Borrow<Self::Act>>::borrow(b)
    }

    fn act_mut(b: &mut Self::ActBuf) -> &mut Self::Act {
        <Self::ActBuf as BorrowMut<Self::Act>>::borrow_mut(b)
    }

    fn f32s(b: &Self::F32Buf) -> &Self::F32 {
        <Self::F32Buf as std::borrow::Borrow<Self::F32>>::borrow(b)
    }

    fn f32s_mut(b: &mut Self::F32Buf) -> &mut Self::F32 {
        <Self::F32Buf as BorrowMut<Self::F32>>::borrow_mut(b)
    }

    /// A zeroed buffer of `len` activations.
    fn alloc(&self, len: usize) -> Result<Self::ActBuf>;
    fn alloc_f32(&self, len: usize) -> Result<Self::F32Buf>;
    fn alloc_tokens(&self, len: usize) -> Result<Self::Tokens>;
    /// Copies `host` to the start of `dev`.
    fn load_tokens(&self, dev: &mut Self::Tokens, host: &[u32]) -> Result<()>;
    fn upload_rope(&self, table: &RopeTable) -> Result<Self::Rope>;
    fn losses(&self, rows: usize) -> Result<Self::Losses>;
    /// The losses of rows `0..rows` written since the last call, summed in row order in f64
    /// (a GPU waits for the pass here); starts the next sum at zero.
    fn loss_sum(&self, losses: &mut Self::Losses, rows: usize) -> Result<f64>;

    /// `c (+)= a · b`.
    fn matmul(&self, c: MatMut<'_, Self::Act>, a: Mat<'_, Self::Act>, b: Mat<'_, Self::Act>, acc: Accumulate) -> Result<()>;
    /// `g += a · b` into an f32 gradient (on GPU: the product in the working precision, then
    /// added).
    fn matmul_grad(&self, g: MatMut<'_, Self::F32>, a: Mat<'_, Self::Act>, b: Mat<'_, Self::Act>) -> Result<()>;
    /// `y[r] (+)= bias` for every row of `y`.
    fn add_bias(&self, y: MatMut<'_, Self::Act>, bias: Span<'_, Self::F32>, acc: Accumulate) -> Result<()>;
    /// `db += Σ_rows dy`.
    fn bias_grad(&self, db: SpanMut<'_, Self::F32>, dy: Mat<'_, Self::Act>) -> Result<()>;

    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: SpanMut<'_, Self::Act>,
        mean: SpanMut<'_, Self::F32>,
        rstd: SpanMut<'_, Self::F32>,
        x: Span<'_, Self::Act>,
        w: Span<'_, Self::F32>,
        b: Span<'_, Self::F32>,
        eps: f32,
    ) -> Result<()>;
    /// `dx += …`; the gradients of the weight (`dw`) and bias (`db`), ranges of `g`, accumulate.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dx: SpanMut<'_, Self::Act>,
        g: &mut Self::F32,
        dw: Range<usize>,
        db: Range<usize>,
        dout: Span<'_, Self::Act>,
        x: Span<'_, Self::Act>,
        mean: Span<'_, Self::F32>,
        rstd: Span<'_, Self::F32>,
        w: Span<'_, Self::F32>,
    ) -> Result<()>;
    fn rmsnorm_forward(
        &self,
        out: SpanMut<'_, Self::Act>,
        rstd: SpanMut<'_, Self::F32>,
        x: Span<'_, Self::Act>,
        w: Span<'_, Self::F32>,
        eps: f32,
    ) -> Result<()>;
    /// `dx += …`; the weight's gradient accumulates.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: SpanMut<'_, Self::Act>,
        dw: SpanMut<'_, Self::F32>,
        dout: Span<'_, Self::Act>,
        x: Span<'_, Self::Act>,
        rstd: Span<'_, Self::F32>,
        w: Span<'_, Self::F32>,
    ) -> Result<()>;

    /// Causal attention over the fused `[rows, (heads + 2·kv_heads)·dim]` buffer; `lse` gets
    /// each row's log-sum-exp per head.
    fn attention_forward(
        &self,
        s: AttnShape,
        qkv: Span<'_, Self::Act>,
        out: SpanMut<'_, Self::Act>,
        lse: SpanMut<'_, Self::F32>,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: AttnShape,
        qkv: Span<'_, Self::Act>,
        out: Span<'_, Self::Act>,
        lse: Span<'_, Self::F32>,
        dout: Span<'_, Self::Act>,
        dqkv: SpanMut<'_, Self::Act>,
    ) -> Result<()>;
    /// Rotates heads `0..heads` at the start of every `stride`-wide row (row r at position
    /// `pos0 + r % seq`); `inverse` is the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn rope_apply(
        &self,
        x: SpanMut<'_, Self::Act>,
        stride: usize,
        heads: usize,
        seq: usize,
        pos0: usize,
        host: &RopeTable,
        dev: &Self::Rope,
        inverse: bool,
    ) -> Result<()>;

    fn gelu_forward(&self, out: SpanMut<'_, Self::Act>, x: Span<'_, Self::Act>) -> Result<()>;
    /// `d *= gelu'(x)`.
    fn gelu_backward_inplace(&self, d: SpanMut<'_, Self::Act>, x: Span<'_, Self::Act>) -> Result<()>;
    fn swiglu_forward(&self, out: SpanMut<'_, Self::Act>, gate: Span<'_, Self::Act>, up: Span<'_, Self::Act>) -> Result<()>;
    /// Turns `d_gate` (holding the output's gradient) into the gate's gradient and writes the
    /// up projection's into `d_up`.
    fn swiglu_backward(
        &self,
        d_gate: SpanMut<'_, Self::Act>,
        d_up: SpanMut<'_, Self::Act>,
        gate: Span<'_, Self::Act>,
        up: Span<'_, Self::Act>,
    ) -> Result<()>;
    fn copy(&self, dst: SpanMut<'_, Self::Act>, src: Span<'_, Self::Act>) -> Result<()>;
    fn zero(&self, dst: SpanMut<'_, Self::Act>) -> Result<()>;

    /// `out[r] = wte[tokens[r]] (+ wpe[r % seq])`, rows of width `c`, from whole tables.
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: SpanMut<'_, Self::Act>,
        tokens: Ids<'_, Self>,
        wte: Span<'_, Self::F32>,
        wpe: Option<Span<'_, Self::F32>>,
        seq: usize,
        c: usize,
    ) -> Result<()>;
    /// The rows of `out` whose token lies in `table` (vocabulary rows `first..`, a slice of a
    /// table split across chunks) become that token's row; the others are left alone.
    fn embedding_rows(
        &self,
        out: SpanMut<'_, Self::Act>,
        tokens: Ids<'_, Self>,
        table: Span<'_, Self::F32>,
        first: usize,
        c: usize,
    ) -> Result<()>;
    /// `out[r] += wpe[r % seq]`.
    fn add_positions(&self, out: SpanMut<'_, Self::Act>, wpe: Span<'_, Self::F32>, seq: usize, c: usize) -> Result<()>;
    /// Accumulates the token (and position) tables' gradients, ranges of `g`. `wte` holds
    /// vocabulary rows `first..` (all of them, or a rank's slice of a vocabulary-parallel table):
    /// the rows of tokens outside it are another rank's.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        g: &mut Self::F32,
        wte: Range<usize>,
        first: usize,
        wpe: Option<Range<usize>>,
        dout: Span<'_, Self::Act>,
        tokens: Ids<'_, Self>,
        seq: usize,
        c: usize,
    ) -> Result<()>;
    /// Softmax cross-entropy over the rows of `logits` (`[rows, vocab]`) against `targets`, in
    /// place: with `grad_scale`, the rows become `scale · (softmax − onehot)`. The rows' losses go
    /// to `losses` (see `loss_sum`).
    fn softmax_xent(
        &self,
        logits: MatMut<'_, Self::Act>,
        targets: Ids<'_, Self>,
        grad_scale: Option<f32>,
        losses: &mut Self::Losses,
    ) -> Result<()>;

    /// Vocabulary-parallel cross-entropy, first half: `logits` are this rank's vocabulary rows
    /// `first..first + cols` of each row's logits; each row's statistics (max, sum of
    /// exponentials, the target's logit if held: `kernels::cpu::loss::XENT_STATS` floats) go to
    /// `stats`, and the rows are left for `xent_finish`.
    fn xent_stats(&self, logits: MatMut<'_, Self::Act>, targets: Ids<'_, Self>, first: usize, stats: SpanMut<'_, Self::F32>) -> Result<()>;
    /// Second half, once the group's statistics (`global`) are combined from every rank's
    /// (`local`: this rank's): the rows' losses go to `losses`, and with `grad_scale` the rows
    /// become this rank's part of `scale · (softmax − onehot)`.
    #[allow(clippy::too_many_arguments)]
    fn xent_finish(
        &self,
        logits: MatMut<'_, Self::Act>,
        targets: Ids<'_, Self>,
        first: usize,
        local: Span<'_, Self::F32>,
        global: Span<'_, Self::F32>,
        grad_scale: Option<f32>,
        losses: &mut Self::Losses,
    ) -> Result<()>;

    /// The sum of squares of `x` over `pieces` (ranges of it), in f64: a gradient norm over what
    /// this rank owns.
    fn sum_squares(&self, x: &Self::F32, pieces: &[Range<usize>]) -> Result<f64>;
    /// `x *= s`.
    fn scale(&self, x: SpanMut<'_, Self::F32>, s: f32) -> Result<()>;
    fn zero_f32(&self, x: SpanMut<'_, Self::F32>) -> Result<()>;
    /// The f32 masters read as the matmul operands, when the backend computes in f32 (`None`
    /// in 16 bits, where the operands are a working copy).
    fn f32_as_act<'a>(&self, x: &'a Self::F32) -> Option<&'a Self::Act>;
    /// `g *= inv_scale` over `pieces` (ranges of `g`), and whether any of their elements is not
    /// finite (fp16's loss-scale check of the sums this rank owns).
    fn unscale_check(&self, g: &mut Self::F32, pieces: &[Range<usize>], inv_scale: f32) -> Result<bool>;
    /// Fused AdamW on one range: parameters `p` (f32), gradients `g`, moments `m` and `v`;
    /// with `work`, the updated parameters are also written there in the working precision.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        p: SpanMut<'_, Self::F32>,
        work: Option<SpanMut<'_, Self::Act>>,
        g: Span<'_, Self::F32>,
        m: SpanMut<'_, Self::F32>,
        v: SpanMut<'_, Self::F32>,
        hp: &AdamWStep,
        decay: bool,
    ) -> Result<()>;
}
