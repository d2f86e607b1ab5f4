//! Parameters cut across tensor-parallel ranks.
//!
//! A sharded entry keeps its global name and shape; its [`Shard`] says which part of the global
//! tensor this rank holds. Loading a Hugging Face checkpoint takes each rank's part of every
//! tensor (`ParamTable::take_shards`), and checkpoints and the final model put the ranks' parts
//! back together into the global tensors (`assemble`), so a checkpoint written under one layout
//! resumes under any other.

use std::ops::Range;

use super::ParamTable;

/// The part of a global tensor one rank holds: dimension `axis` is `parts` equal blocks
/// (GPT-2's fused QKV projection is three: q, k and v), and the rank holds `range` of each block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub axis: usize,
    pub parts: usize,
    pub range: Range<usize>,
}

impl Shard {
    /// Rows `range` of dimension `axis`, which is one block.
    pub fn rows(axis: usize, range: Range<usize>) -> Shard {
        Shard { axis, parts: 1, range }
    }

    /// The local tensor's shape.
    pub fn local_shape(&self, global: &[usize]) -> Vec<usize> {
        let mut s = global.to_vec();
        s[self.axis] = self.parts * self.range.len();
        s
    }

    /// `(outer, block, inner)`: the global tensor as `[outer, parts · block, inner]`.
    fn dims(&self, global: &[usize]) -> (usize, usize, usize) {
        let outer = global[..self.axis].iter().product();
        let inner = global[self.axis + 1..].iter().product();
        (outer, global[self.axis] / self.parts, inner)
    }

    /// For each contiguous run the shard holds: where it starts in the global tensor, where in
    /// the local one, and its length.
    fn runs(&self, global: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let (outer, block, inner) = self.dims(global);
        let (parts, r) = (self.parts, self.range.clone());
        let d = global[self.axis];
        let local_d = parts * r.len();
        (0..outer).flat_map(move |o| {
            let r = r.clone();
            (0..parts).map(move |p| ((o * d + p * block + r.start) * inner, (o * local_d + p * r.len()) * inner, r.len() * inner))
        })
    }

    /// Copies this rank's part of `global` (shaped `shape`) into `local`.
    pub fn take(&self, shape: &[usize], global: &[f32], local: &mut [f32]) {
        for (g, l, n) in self.runs(shape) {
            local[l..l + n].copy_from_slice(&global[g..g + n]);
        }
    }

    /// Writes `local` into its place in `global` (shaped `shape`).
    pub fn put(&self, shape: &[usize], local: &[f32], global: &mut [f32]) {
        for (g, l, n) in self.runs(shape) {
            global[g..g + n].copy_from_slice(&local[l..l + n]);
        }
    }
}

impl ParamTable {
    /// This rank's parameters from the whole model's (`global`, laid out by `whole`, the
    /// unsharded table of the same model): each sharded entry's part, the others whole.
    pub fn take_shards(&self, whole: &ParamTable, global: &[f32], out: &mut [f32]) {
        // By name: a tensor-parallel rank's table lists every tensor, a pipeline stage's only
        // those of its blocks.
        let by_name: std::collections::HashMap<&str, &super::ParamEntry> = whole.entries().iter().map(|w| (w.name.as_str(), w)).collect();
        for e in self.entries() {
            let w = by_name[e.name.as_str()];
            let src = w.at.get(global);
            let dst = e.at.get_mut(out);
            match &e.shard {
                Some(s) => s.take(&w.shape, src, dst),
                None => dst.copy_from_slice(src),
            }
        }
    }
}

/// The whole model's parameters (laid out by `whole`) from every rank's (`parts[r]`, laid out by
/// `tables[r]`): each sharded entry put together from its parts, the others taken from rank 0.
pub fn assemble(whole: &ParamTable, tables: &[ParamTable], parts: &[&[f32]], out: &mut [f32]) {
    for (i, w) in whole.entries().iter().enumerate() {
        let dst = w.at.get_mut(out);
        for (t, p) in tables.iter().zip(parts) {
            let e = &t.entries()[i];
            match &e.shard {
                Some(s) => s.put(&w.shape, e.at.get(p), dst),
                None => {
                    dst.copy_from_slice(e.at.get(p));
                    break;
                }
            }
        }
    }
}

/// Even cuts of `len` over `n` ranks, sizes differing by at most one (an MLP width of 172 over 4
/// ranks is 43 each; a vocabulary of 300 over 8 is 38 or 37).
pub fn cut(len: usize, n: usize, i: usize) -> Range<usize> {
    crate::comm::shard_range(len, n, i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fused_projection_takes_the_same_columns_of_each_block_and_puts_them_back() {
        // [2, 12] in three blocks of 4 columns (q, k, v); rank 1 of 2 holds columns 2..4 of each.
        let shape = [2, 12];
        let global: Vec<f32> = (0..24).map(|x| x as f32).collect();
        let s = Shard { axis: 1, parts: 3, range: 2..4 };
        assert_eq!(s.local_shape(&shape), vec![2, 6]);
        let mut local = vec![0.0; 12];
        s.take(&shape, &global, &mut local);
        assert_eq!(local, vec![2., 3., 6., 7., 10., 11., 14., 15., 18., 19., 22., 23.]);
        let mut back = vec![-1.0; 24];
        s.put(&shape, &local, &mut back);
        s_put_other(&shape, &global, &mut back);
        assert_eq!(back, global);
    }

    /// Fills what rank 0 of the fused test holds, so the two parts make the whole.
    fn s_put_other(shape: &[usize], global: &[f32], out: &mut [f32]) {
        let s = Shard { axis: 1, parts: 3, range: 0..2 };
        let mut local = vec![0.0; 12];
        s.take(shape, global, &mut local);
        s.put(shape, &local, out);
    }

    #[test]
    fn uneven_row_cuts_cover_the_rows() {
        let cuts: Vec<_> = (0..8).map(|i| cut(300, 8, i)).collect();
        assert_eq!(cuts.iter().map(|c| c.len()).sum::<usize>(), 300);
        assert!(cuts.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!((cut(172, 4, 3).len(), cut(300, 8, 0).len(), cut(300, 8, 7).len()), (43, 38, 37));
    }
}
