//! A model's place in a tensor-parallel group (Megatron's 1D layout): which part of each layer
//! this rank holds.
//!
//! Column-parallel linears (the QKV projections, GPT-2's `c_fc`, LLaMA's gate and up) hold a
//! range of output features: attention heads, or MLP columns. Row-parallel linears (the attention
//! output, GPT-2's MLP `c_proj`, LLaMA's down) hold the matching input features and produce a
//! partial sum, which one all-reduce per block half completes; their bias is added once, by the
//! lead rank. Backward mirrors it: the input gradient of a column-parallel layer is partial and
//! is summed before the norm that precedes it. The token embedding and the head hold a range of
//! the vocabulary. Norms and the remaining biases are whole on every rank, with the same
//! gradients on each (their inputs are the same after the sums).

use std::ops::Range;

use crate::params::{cut, Shard};
use crate::{Error, Result};

/// This rank's position in its tensor-parallel group (`size` 1: a whole model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpRank {
    pub rank: usize,
    pub size: usize,
    /// Megatron's sequence parallelism (`parallel.sp_mode = "split_gather"`): between the
    /// tensor-parallel regions (norms, residuals, the embedding's output) each rank holds only
    /// its `1/size` of every sequence's tokens (see `models::hooks::gather_seq`).
    pub split_seq: bool,
}

impl Default for TpRank {
    fn default() -> Self {
        TpRank::WHOLE
    }
}

impl TpRank {
    pub const WHOLE: TpRank = TpRank { rank: 0, size: 1, split_seq: false };

    /// Rank `rank` of `size`, without sequence parallelism.
    pub fn new(rank: usize, size: usize) -> TpRank {
        TpRank { rank, size, split_seq: false }
    }

    /// Whether the sequence is split between the tensor-parallel regions (split_gather on a
    /// group of more than one rank).
    pub fn splits_seq(&self) -> bool {
        self.split_seq && self.size > 1
    }

    /// The parts each sequence is cut into between the tensor-parallel regions: `size` under
    /// split_gather, else 1.
    pub fn seq_parts(&self) -> usize {
        if self.splits_seq() {
            self.size
        } else {
            1
        }
    }

    pub fn is_whole(&self) -> bool {
        self.size == 1
    }

    /// The rank that adds what every rank would otherwise add once each: the residual stream
    /// and the biases of row-parallel layers.
    pub fn lead(&self) -> bool {
        self.rank == 0
    }

    /// This rank's part of `len` features.
    pub fn part(&self, len: usize) -> Range<usize> {
        cut(len, self.size, self.rank)
    }

    /// Rows `part(len)` of dimension `axis` (`None` for a whole model).
    pub fn rows(&self, axis: usize, len: usize) -> Option<Shard> {
        (!self.is_whole()).then(|| Shard::rows(axis, self.part(len)))
    }

    /// Features `range` of each of `parts` blocks of dimension `axis` (`None` for a whole model).
    pub fn blocks(&self, axis: usize, parts: usize, range: Range<usize>) -> Option<Shard> {
        (!self.is_whole()).then_some(Shard { axis, parts, range })
    }

    /// The attention heads this rank runs, of `heads`, each `dim` wide; an error unless they
    /// divide evenly.
    pub fn heads(&self, heads: usize) -> Result<Range<usize>> {
        if !heads.is_multiple_of(self.size) {
            return Err(Error::Unsupported {
                field: "parallel.tp".into(),
                message: format!("the model's {heads} attention heads do not divide over {} tensor-parallel ranks", self.size),
            });
        }
        let per = heads / self.size;
        Ok(self.rank * per..(self.rank + 1) * per)
    }

    /// The key/value heads this rank needs for its query heads: its share when they divide
    /// evenly, else (fewer KV heads than ranks) the one its query heads read, held by
    /// `size / kv_heads` ranks alike.
    pub fn kv_heads(&self, heads: usize, kv_heads: usize) -> Result<Range<usize>> {
        if kv_heads.is_multiple_of(self.size) {
            let per = kv_heads / self.size;
            return Ok(self.rank * per..(self.rank + 1) * per);
        }
        if !self.size.is_multiple_of(kv_heads) {
            return Err(Error::Unsupported {
                field: "parallel.tp".into(),
                message: format!(
                    "the model's {kv_heads} key/value heads neither divide over {} tensor-parallel ranks nor divide them",
                    self.size
                ),
            });
        }
        let q = self.heads(heads)?;
        let group = heads / kv_heads;
        Ok(q.start / group..q.start / group + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_heads_are_split_when_they_divide_and_shared_when_fewer() {
        let r = |rank| TpRank::new(rank, 4);
        // 8 query heads, 4 KV heads over 4 ranks: one each.
        assert_eq!((0..4).map(|i| r(i).kv_heads(8, 4).unwrap()).collect::<Vec<_>>(), vec![0..1, 1..2, 2..3, 3..4]);
        // 8 query heads, 2 KV heads over 4 ranks: ranks 0 and 1 read KV head 0, 2 and 3 head 1.
        assert_eq!((0..4).map(|i| r(i).kv_heads(8, 2).unwrap()).collect::<Vec<_>>(), vec![0..1, 0..1, 1..2, 1..2]);
        assert!(r(0).kv_heads(12, 3).unwrap_err().to_string().contains("3 key/value heads"));
        assert!(r(0).heads(6).unwrap_err().to_string().contains("6 attention heads"));
    }
}
