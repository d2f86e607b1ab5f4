//! Token (and learned position) embeddings.

use rayon::prelude::*;

/// `out[r] = wte[tokens[r]] (+ wpe[r % seq])`, rows of width `c`.
pub fn embedding_forward(out: &mut [f32], tokens: &[u32], wte: &[f32], wpe: Option<&[f32]>, seq: usize, c: usize) {
    debug_assert_eq!(out.len(), tokens.len() * c);
    out.par_chunks_mut(c).zip(tokens.par_iter()).enumerate().for_each(|(r, (o, &t))| {
        o.copy_from_slice(&wte[t as usize * c..][..c]);
        if let Some(wpe) = wpe {
            let p = &wpe[(r % seq) * c..][..c];
            for i in 0..c {
                o[i] += p[i];
            }
        }
    });
}

/// The rows of `tokens` bucketed by token (a counting sort), for the table rows
/// `first..first + vocab`: the rows holding token `first + v` are `order[starts[v]..starts[v + 1]]`,
/// in row order; tokens outside those rows (another rank's part of a vocabulary-parallel table)
/// are left out. Both embedding backwards (CPU, CUDA) sum each vocabulary row through it, in that
/// fixed order.
pub fn bucket_by_token(tokens: &[u32], first: usize, vocab: usize) -> (Vec<usize>, Vec<usize>) {
    let local = |t: u32| (t as usize).checked_sub(first).filter(|v| *v < vocab);
    let mut starts = vec![0usize; vocab + 1];
    for v in tokens.iter().filter_map(|&t| local(t)) {
        starts[v + 1] += 1;
    }
    for v in 0..vocab {
        starts[v + 1] += starts[v];
    }
    let mut fill = starts.clone();
    let mut order = vec![0usize; starts[vocab]];
    for (r, v) in tokens.iter().enumerate().filter_map(|(r, &t)| Some((r, local(t)?))) {
        order[fill[v]] = r;
        fill[v] += 1;
    }
    (starts, order)
}

/// `dwte[tokens[r] - first] += dout[r]` for the tokens among `dwte`'s rows (vocabulary rows
/// `first..`: the whole table, or a rank's slice of a vocabulary-parallel one), and
/// `dwpe[r % seq] += dout[r]`. The rows are bucketed by token first (a counting sort), then each
/// vocabulary row is summed by one thread in row order: the same bits for any thread count, and
/// no scratch copy of the table.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward(dwte: &mut [f32], dwpe: Option<&mut [f32]>, dout: &[f32], tokens: &[u32], first: usize, seq: usize, c: usize) {
    let (starts, order) = bucket_by_token(tokens, first, dwte.len() / c);
    dwte.par_chunks_mut(c).enumerate().for_each(|(v, d)| {
        for &r in &order[starts[v]..starts[v + 1]] {
            let src = &dout[r * c..][..c];
            for i in 0..c {
                d[i] += src[i];
            }
        }
    });
    if let Some(dwpe) = dwpe {
        dwpe[..seq * c].par_chunks_mut(c).enumerate().for_each(|(p, d)| {
            let mut r = p;
            while r < tokens.len() {
                for i in 0..c {
                    d[i] += dout[r * c + i];
                }
                r += seq;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{assert_close, seeded};

    #[test]
    fn backward_matches_scatter_oracle() {
        let (v, c, seq, rows) = (11, 130, 5, 15);
        let positions = 8; // more positions than the sequence uses
        let tokens: Vec<u32> = (0..rows).map(|r| (r * 7 % v) as u32).collect();
        let dout = seeded(rows * c, 1, 1.0);
        let mut dwte = seeded(v * c, 2, 1.0);
        let mut dwpe = seeded(positions * c, 3, 1.0);
        let (mut want_te, mut want_pe) = (dwte.clone(), dwpe.clone());
        for r in 0..rows {
            for i in 0..c {
                want_te[tokens[r] as usize * c + i] += dout[r * c + i];
                want_pe[(r % seq) * c + i] += dout[r * c + i];
            }
        }
        let (before_te, before_pe) = (dwte.clone(), dwpe.clone());
        embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tokens, 0, seq, c);
        assert_close(&dwte, &want_te, 1e-6);
        assert_close(&dwpe, &want_pe, 1e-6);
        // A vocabulary-parallel table in two slices (rows 0..4 and 4..11): each gets the rows of
        // its own tokens, exactly the whole table's.
        let (mut lo, mut hi) = (before_te[..4 * c].to_vec(), before_te[4 * c..].to_vec());
        let mut pe = before_pe.clone();
        embedding_backward(&mut lo, Some(&mut pe), &dout, &tokens, 0, seq, c);
        embedding_backward(&mut hi, None, &dout, &tokens, 4, seq, c);
        assert_eq!([lo, hi].concat(), dwte);
        assert_eq!(pe, dwpe);
        let (wte, wpe) = (seeded(v * c, 4, 1.0), seeded(seq * c, 5, 1.0));
        let mut out = vec![0.0; rows * c];
        embedding_forward(&mut out, &tokens, &wte, Some(&wpe), seq, c);
        for r in 0..rows {
            for i in 0..c {
                assert_eq!(out[r * c + i], wte[tokens[r] as usize * c + i] + wpe[(r % seq) * c + i]);
            }
        }
    }
}
