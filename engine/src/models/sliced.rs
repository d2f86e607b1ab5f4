//! The token embedding and the head, as the models ask the hooks for them.
//!
//! Under ZeRO-3 a large embedding or head is cut into chunks of whole rows
//! (`ParamTable::slices`), and a chunk is gathered only while it is read. The embedding's forward
//! asks for one slice, copies the rows of the tokens it holds, and moves on; the head runs a
//! slice at a time too (`LmHead::loss_in_slices`). So no rank ever gathers the whole vocabulary
//! (a quarter of a 34M-parameter LLaMA with 16k tokens). Both models call these, whole or sliced.

use std::ops::Range;

use rayon::prelude::*;

use super::hooks::Params;
use crate::nn::LmHead;
use crate::params::ParamRef;
use crate::Result;

/// Writes the embedding rows of `tokens` into `out` (`[tokens, c]`), one slice of `wte` at a
/// time; `also` stays needed throughout (GPT-2's position table, added by the caller after).
/// The same values as `embedding_forward`: each row is a copy (positions are added after, as
/// the kernel adds them after its copy). A whole embedding is one slice.
pub fn embed_in_slices(
    pa: &mut dyn Params,
    slices: &[Range<usize>],
    wte: ParamRef,
    also: Option<Range<usize>>,
    out: &mut [f32],
    tokens: &[u32],
    c: usize,
) -> Result<()> {
    for s in slices {
        let want: Vec<Range<usize>> = std::iter::once(s.clone()).chain(also.clone()).collect();
        pa.need(&want)?;
        let rows = (s.start - wte.offset) / c..(s.end - wte.offset) / c;
        let p = pa.get();
        out.par_chunks_mut(c).zip(tokens.par_iter()).for_each(|(o, &t)| {
            let t = t as usize;
            if rows.contains(&t) {
                o.copy_from_slice(&p[wte.offset + t * c..][..c]);
            }
        });
    }
    Ok(())
}

/// Adds the position rows (`wpe`, `[positions, c]`) to `out` (`[b·seq, c]`), as
/// `embedding_forward` does after its copy.
pub fn add_positions(out: &mut [f32], wpe: &[f32], seq: usize, c: usize) {
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let p = &wpe[(r % seq) * c..][..c];
        for i in 0..c {
            o[i] += p[i];
        }
    });
}

/// Floats of the head's scratch for `rows` rows: a block of rows' logits, or all rows' when the
/// head runs a slice at a time.
pub fn head_scratch_len(head: &LmHead, slices: &[Range<usize>], rows: usize) -> usize {
    if slices.len() > 1 {
        rows * head.vocab
    } else {
        head.scratch_len(rows)
    }
}

/// Asks for the final norm `norm` before it runs, with the head when the head is whole (it is
/// read next, without asking again); a sliced head asks for its slices itself.
pub fn need_final_norm(pa: &mut dyn Params, head: &LmHead, slices: &[Range<usize>], norm: Range<usize>) -> Result<()> {
    if slices.len() > 1 {
        pa.need(&[norm])
    } else {
        pa.need(&[norm, head.weight.range()])
    }
}

/// The head's summed loss over `h` (the final norm's output) against `targets`: accumulates
/// `scale ×` its weight gradient into `g` and writes the hidden states' gradient into `dh`. The
/// head's gradient is announced final unless it is tied to the embedding (`untied` false: the
/// embedding adds to it later), and `norm` is asked for again, for the final norm's backward.
#[allow(clippy::too_many_arguments)]
pub fn head_loss(
    pa: &mut dyn Params,
    head: &LmHead,
    slices: &[Range<usize>],
    untied: bool,
    h: &[f32],
    targets: &[u32],
    logits: &mut [f32],
    g: &mut [f32],
    dh: &mut [f32],
    scale: f32,
    norm: Range<usize>,
) -> Result<f64> {
    if slices.len() > 1 {
        let loss = head.loss_in_slices(pa, slices, h, targets, logits, Some((g, dh, scale)), untied)?;
        pa.need(&[norm])?;
        return Ok(loss);
    }
    let loss = head.loss(pa.get(), h, targets, logits, Some((&mut *g, dh, scale)));
    if untied {
        pa.grads_ready(g, head.weight.range())?;
    }
    Ok(loss)
}
