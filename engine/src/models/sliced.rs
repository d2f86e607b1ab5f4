//! The token embedding run one vocabulary slice at a time.
//!
//! Under data parallelism a large embedding or head is cut into chunks of whole rows
//! (`ParamTable::slices`), and ZeRO-3 gathers a chunk only while it is read. The embedding's
//! forward asks for one slice, copies the rows of the tokens it holds, and moves on, so no rank
//! ever gathers the whole vocabulary (a quarter of a 34M-parameter LLaMA with 16k tokens).

use std::ops::Range;

use rayon::prelude::*;

use super::hooks::Params;
use crate::params::ParamRef;
use crate::Result;

/// Writes the embedding rows of `tokens` into `out` (`[tokens, c]`), one slice of `wte` at a
/// time; `also` stays needed throughout (GPT-2's position table, added by the caller after).
/// The same values as `embedding_forward` without positions: each row is a copy.
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
