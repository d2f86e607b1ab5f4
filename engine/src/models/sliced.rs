//! The token embedding and the head, as the models ask the hooks for them.
//!
//! Under ZeRO-3 a large embedding or head is cut into chunks of whole rows
//! (`ParamTable::slices`), and a chunk is gathered only while it is read. The embedding's forward
//! asks for one slice, copies the rows of the tokens it holds, and moves on; the head runs a
//! slice at a time too (`LmHead::loss_in_slices`). So no rank ever gathers the whole vocabulary
//! (a quarter of a 34M-parameter LLaMA with 16k tokens). Both models call these, whole or sliced,
//! on either backend.

use std::ops::Range;

use super::hooks::{tp_sum, Params};
use super::TpRank;
use crate::backend::{Backend, Ids, Span, SpanMut};
use crate::nn::LmHead;
use crate::params::ParamRef;
use crate::Result;

/// Writes the embedding of `tokens` into `out` (`[tokens, c]` from its start): the token rows
/// (`wte`) plus, when given, the position rows (`wpe`). A table split into several slices is
/// read one slice at a time, `wpe` needed throughout; the rows come out as the whole-table
/// kernel writes them (each a copy, the positions added after). On a rank of a
/// vocabulary-parallel model (`tp`), `wte` holds vocabulary rows `first..`: each rank writes the
/// rows of its tokens into zeros and the group sums them (adding zeros: the same bits as the
/// whole table's); under split_gather (`TpRank::splits_seq`) the caller reduce-scatters them
/// instead, and the lead adds the positions. `wpe` comes with the first position of the rows (a
/// sequence-parallel rank's part of each sequence starts past 0).
#[allow(clippy::too_many_arguments)]
pub fn embed<B: Backend>(
    be: &B,
    pa: &mut dyn Params<B>,
    tp: TpRank,
    slices: &[Range<usize>],
    wte: ParamRef,
    first: usize,
    wpe: Option<(ParamRef, usize)>,
    out: &mut B::Act,
    tokens: Ids<'_, B>,
    seq: usize,
    c: usize,
) -> Result<()> {
    let nc = tokens.host.len() * c;
    // The whole table is needed (asked for); the rows read start at the first position.
    let (wpe, positions) = match wpe {
        Some((p, pos0)) => (Some(p), Some(p.offset + pos0 * c..p.offset + p.len)),
        None => (None, None),
    };
    if !tp.is_whole() {
        let want: Vec<Range<usize>> = std::iter::once(wte.range()).chain(wpe.map(|p| p.range())).collect();
        pa.need(&want)?;
        be.zero(SpanMut::new(&mut *out, 0..nc))?;
        be.embedding_rows(SpanMut::new(&mut *out, 0..nc), tokens, Span::new(pa.get().master, wte.range()), first, c)?;
        if tp.splits_seq() {
            // Split_gather: the caller reduce-scatters the rows; the positions go in once.
            if let Some(positions) = positions.filter(|_| tp.lead()) {
                be.add_positions(SpanMut::new(out, 0..nc), Span::new(pa.get().master, positions), seq, c)?;
            }
            return Ok(());
        }
        tp_sum(pa, tp, SpanMut::new(&mut *out, 0..nc))?;
        if let Some(positions) = positions {
            be.add_positions(SpanMut::new(out, 0..nc), Span::new(pa.get().master, positions), seq, c)?;
        }
        return Ok(());
    }
    if slices.len() <= 1 {
        let want: Vec<Range<usize>> = std::iter::once(wte.range()).chain(wpe.map(|p| p.range())).collect();
        pa.need(&want)?;
        let p = pa.get();
        let wpe = positions.map(|r| Span::new(p.master, r));
        return be.embedding_forward(SpanMut::new(out, 0..nc), tokens, Span::new(p.master, wte.range()), wpe, seq, c);
    }
    for s in slices {
        let want: Vec<Range<usize>> = std::iter::once(s.clone()).chain(wpe.map(|p| p.range())).collect();
        pa.need(&want)?;
        let first = (s.start - wte.offset) / c;
        be.embedding_rows(SpanMut::new(&mut *out, 0..nc), tokens, Span::new(pa.get().master, s.clone()), first, c)?;
    }
    if let Some(positions) = positions {
        be.add_positions(SpanMut::new(out, 0..nc), Span::new(pa.get().master, positions), seq, c)?;
    }
    Ok(())
}

/// Elements of the head's scratch for `rows` rows in blocks of `block_floats`: a block of rows'
/// logits, or all rows' when the head runs a slice at a time.
pub fn head_scratch_len(head: &LmHead, slices: &[Range<usize>], rows: usize, block_floats: usize) -> usize {
    if slices.len() > 1 {
        rows * head.vocab
    } else {
        head.scratch_len_in(rows, block_floats)
    }
}

/// Asks for the final norm `norm` before it runs, with the head when the head is whole or a
/// tensor-parallel rank's part (it is read next, without asking again); a sliced head asks for its
/// slices itself.
pub fn need_final_norm<B: Backend>(pa: &mut dyn Params<B>, head: &LmHead, slices: &[Range<usize>], norm: Range<usize>) -> Result<()> {
    if slices.len() > 1 && !head.is_vocab_parallel() {
        pa.need(&[norm])
    } else {
        pa.need(&[norm, head.weight.range()])
    }
}

/// The head's loss over `h` (the final norm's output) against `targets`, the rows' losses
/// collected in `losses`: accumulates `scale ×` its weight gradient into `g` and writes the
/// hidden states' gradient into `dh`. The head's gradient is announced final unless it is tied
/// to the embedding (`untied` false: the embedding adds to it later), and `norm` is asked for
/// again, for the final norm's backward. A vocabulary-parallel head (on a rank of `tp`) runs
/// `LmHead::loss_vocab_parallel`, leaving in `dh` this rank's partial sum, which the caller sums
/// over the group (`hooks::scatter_seq`).
#[allow(clippy::too_many_arguments)]
pub fn head_loss<B: Backend>(
    be: &B,
    pa: &mut dyn Params<B>,
    tp: TpRank,
    head: &LmHead,
    slices: &[Range<usize>],
    untied: bool,
    h: &B::Act,
    targets: Ids<'_, B>,
    logits: &mut B::Act,
    losses: &mut B::Losses,
    g: &mut B::F32,
    dh: &mut B::Act,
    scale: f32,
    norm: Range<usize>,
) -> Result<()> {
    if head.is_vocab_parallel() {
        head.loss_vocab_parallel(be, pa, tp, h, targets, logits, losses, Some((&mut *g, dh, scale)))?;
        if untied {
            pa.grads_ready(g, head.weight.range())?;
        }
        return Ok(());
    }
    if slices.len() > 1 {
        head.loss_in_slices(be, pa, slices, h, targets, logits, losses, Some((g, dh, scale)), untied)?;
        return pa.need(&[norm]);
    }
    head.loss(be, pa.get(), h, targets, logits, losses, Some((&mut *g, dh, scale)))?;
    if untied {
        pa.grads_ready(g, head.weight.range())?;
    }
    Ok(())
}
