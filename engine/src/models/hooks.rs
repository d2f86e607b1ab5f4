//! How parallel wrappers observe a model's use of its parameters without the model knowing about
//! parallelism: the model says which parameters it is about to read and which gradients are final;
//! ZeRO-3 gathers parameters on the first, DDP and ZeRO-2 communicate gradients on the second.

use std::ops::Range;

use gantry_kernels::cpu::attention::AttnShape;

use super::sp::HeadGroups;
use super::TpRank;
use crate::backend::{Accumulate, Backend, Cpu, Mat, MatMut, Span, SpanMut, Weights};
use crate::{Error, Result};

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
    /// The tensor-parallel group of a model cut across ranks (`None` for a whole model).
    fn tensor_group(&mut self) -> Option<&mut dyn TensorGroup<B>> {
        None
    }

    /// The sequence-parallel group of a model that runs a part of each sequence (`None` for
    /// whole sequences).
    fn sequence_group(&mut self) -> Option<&mut dyn SequenceGroup<B>> {
        None
    }
}

/// The all-to-alls of sequence parallelism (DeepSpeed Ulysses) around attention: the model says
/// which columns make a rank's head group, the layout moves them (`parallel::SequenceParallel`
/// on CPU ranks).
pub trait SequenceGroup<B: Backend> {
    /// `local` (`[b·t, cols]`: this rank's `t` consecutive tokens of each of `b` sequences, with
    /// every head's columns) becomes `full` (`[b·t·n, groups.width()]`: every rank's tokens, the
    /// whole sequences in order, with the columns of this rank's head group).
    fn seq_to_heads(&mut self, local: Mat<'_, B::Act>, b: usize, groups: &HeadGroups, full: SpanMut<'_, B::Act>) -> Result<()>;
    /// The reverse: `full` (this rank's head group, whole sequences) back into the columns of
    /// every head group of this rank's tokens in `local`.
    fn heads_to_seq(&mut self, full: Span<'_, B::Act>, b: usize, groups: &HeadGroups, local: MatMut<'_, B::Act>) -> Result<()>;
    /// Ring attention: causal attention of this rank's queries in `qkv` (`[2b·C, s.qkv_width()]`,
    /// its two zigzag chunks of each of `s.batch` sequences, `s.seq` = C) over every rank's keys
    /// and values, passed around the ring; `out` and `lse` as `attention_forward` writes them.
    fn ring_attention_forward(
        &mut self,
        s: AttnShape,
        qkv: Span<'_, B::Act>,
        out: SpanMut<'_, B::Act>,
        lse: SpanMut<'_, B::F32>,
    ) -> Result<()>;
    /// Its backward: `dqkv` (this rank's rows) from the output's gradient `dout`.
    #[allow(clippy::too_many_arguments)]
    fn ring_attention_backward(
        &mut self,
        s: AttnShape,
        qkv: Span<'_, B::Act>,
        out: Span<'_, B::Act>,
        lse: Span<'_, B::F32>,
        dout: Span<'_, B::Act>,
        dqkv: SpanMut<'_, B::Act>,
    ) -> Result<()>;
}

/// The collectives a model cut across tensor-parallel ranks runs inside its layers: the model
/// says when (after a row-parallel layer, before a column-parallel one's input gradient is
/// used, around the vocabulary-parallel head), the layout says how (`parallel::TensorParallel`
/// over sockets on CPU ranks).
pub trait TensorGroup<B: Backend> {
    /// Every rank's `x` becomes the sum of all ranks' `x` (the same bits on each).
    fn all_reduce(&mut self, x: SpanMut<'_, B::Act>) -> Result<()>;
    /// The vocabulary-parallel cross-entropy's statistics of `rows` rows: `stats` holds this
    /// rank's (`rows × kernels::cpu::loss::XENT_STATS` floats) and then room for as many, which
    /// get the whole vocabulary's (`kernels::cpu::loss::xent_combine` of every rank's, in rank
    /// order).
    fn combine_xent(&mut self, stats: &mut B::F32, rows: usize) -> Result<()>;
    /// The gradients in `range` are final (before the parameter hooks hear it): the layout sums
    /// the parts several ranks hold over those ranks here, when it does so as backward goes.
    fn grads_final(&mut self, grads: &mut B::F32, range: Range<usize>) -> Result<()> {
        let _ = (grads, range);
        Ok(())
    }
    /// Sequence parallelism (split_gather): `local` holds this rank's part of each of `b`
    /// sequences (`[b·t, c]`, its `t` consecutive tokens of each); `full` (`[b·t·size, c]`)
    /// gets every rank's, the whole sequences in order.
    fn gather_seq(&mut self, local: Span<'_, B::Act>, b: usize, full: SpanMut<'_, B::Act>) -> Result<()>;
    /// The reverse of `gather_seq`, summing: `local` gets this rank's part of each sequence of
    /// the group's sum of every rank's `full` (a row-parallel layer's partial outputs).
    /// `acc`: write `local`, or add to it (the residual stream a row-parallel layer adds to).
    fn scatter_seq(&mut self, full: Span<'_, B::Act>, b: usize, local: SpanMut<'_, B::Act>, acc: Accumulate) -> Result<()>;
}

/// `inner`'s parameters, read by a rank of a tensor- or sequence-parallel group (or both).
pub struct WithGroup<'a, B: Backend> {
    pub inner: &'a mut dyn Params<B>,
    pub tp: Option<&'a mut dyn TensorGroup<B>>,
    pub sp: Option<&'a mut dyn SequenceGroup<B>>,
}

impl<B: Backend> Params<B> for WithGroup<'_, B> {
    fn need(&mut self, ranges: &[Range<usize>]) -> Result<()> {
        self.inner.need(ranges)
    }

    fn get(&self) -> Weights<'_, B> {
        self.inner.get()
    }

    fn grads_ready(&mut self, grads: &mut B::F32, range: Range<usize>) -> Result<()> {
        if let Some(tp) = &mut self.tp {
            tp.grads_final(grads, range.clone())?;
        }
        self.inner.grads_ready(grads, range)
    }

    fn tensor_group(&mut self) -> Option<&mut dyn TensorGroup<B>> {
        match &mut self.tp {
            Some(g) => Some(&mut **g),
            None => None,
        }
    }

    fn sequence_group(&mut self) -> Option<&mut dyn SequenceGroup<B>> {
        match &mut self.sp {
            Some(g) => Some(&mut **g),
            None => None,
        }
    }
}

/// The sequence-parallel group of a model that runs a part of each sequence (an error if the
/// layout gave none).
pub fn seq_group_of<B: Backend>(pa: &mut dyn Params<B>) -> Result<&mut dyn SequenceGroup<B>> {
    pa.sequence_group().ok_or_else(|| Error::Unsupported {
        field: "parallel.sp".into(),
        message: "a model running a part of each sequence ran without its sequence-parallel group".into(),
    })
}

/// The group of a model cut across `tp.size` ranks (an error if the layout gave none).
pub fn group_of<B: Backend>(pa: &mut dyn Params<B>, tp: TpRank) -> Result<&mut dyn TensorGroup<B>> {
    pa.tensor_group().ok_or_else(|| Error::Unsupported {
        field: "parallel.tp".into(),
        message: format!("a model cut across {} tensor-parallel ranks ran without its group", tp.size),
    })
}

/// Sums `x` over the tensor-parallel group of a model cut across ranks (nothing for a whole one).
pub fn tp_sum<B: Backend>(pa: &mut dyn Params<B>, tp: TpRank, x: SpanMut<'_, B::Act>) -> Result<()> {
    if tp.size == 1 {
        return Ok(());
    }
    group_of(pa, tp)?.all_reduce(x)
}

/// The input of a column-parallel layer from the rows this rank holds (`local`, `[rows, c]`):
/// under split_gather every rank's part of each of the `b` sequences, gathered into `scratch`
/// (`[rows·size, c]`); otherwise `local` itself (every rank holds every row).
pub fn gather_seq<'a, B: Backend>(
    pa: &mut dyn Params<B>,
    tp: TpRank,
    b: usize,
    local: Span<'a, B::Act>,
    scratch: &'a mut B::Act,
) -> Result<Span<'a, B::Act>> {
    if !tp.splits_seq() {
        return Ok(local);
    }
    let len = local.len() * tp.size;
    group_of(pa, tp)?.gather_seq(local, b, SpanMut::at(&mut *scratch, 0, len))?;
    Ok(Span::at(&*scratch, 0, len))
}

/// The output of a row-parallel layer (each rank's partial sum over all rows, `full`) summed
/// over the group into the rows this rank holds: under split_gather its part of each of the `b`
/// sequences, written into `scratch` (`[rows / size, c]`); otherwise every row, summed in place.
pub fn scatter_seq<'a, B: Backend>(
    pa: &mut dyn Params<B>,
    tp: TpRank,
    b: usize,
    full: SpanMut<'a, B::Act>,
    scratch: &'a mut B::Act,
) -> Result<Span<'a, B::Act>> {
    if !tp.splits_seq() {
        let range = full.range.clone();
        tp_sum(pa, tp, SpanMut::new(&mut *full.buf, range.clone()))?;
        return Ok(Span::new(&*full.buf, range));
    }
    let len = full.len() / tp.size;
    group_of(pa, tp)?.scatter_seq(
        Span::new(&*full.buf, full.range.clone()),
        b,
        SpanMut::at(&mut *scratch, 0, len),
        Accumulate::Overwrite,
    )?;
    Ok(Span::at(&*scratch, 0, len))
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
