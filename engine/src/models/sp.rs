//! A model's place in a sequence-parallel group. DeepSpeed Ulysses (`parallel.sp_mode =
//! "all_to_all"`): each rank holds `1/size` of every sequence's tokens, consecutive, and runs
//! everything but attention on them alone (norms, projections, the MLP, the head: all are per
//! token). Around attention an all-to-all turns the sequence part into a head part (every
//! rank's tokens, the whole sequence, for `1/size` of the heads) and back, so attention sees
//! whole sequences. The parameters are whole on every rank; their gradients are each rank's part
//! and are summed over the ranks as data parallelism sums them (the trainer's dp group spans
//! dp × sp).
//!
//! Ring attention (`"ring_attn"`, `SpRank::ring`): each sequence is cut into `2·size` chunks and
//! rank r holds chunks r and `2·size−1−r` (zigzag, so the causal work is even), as two local
//! sequences of `T / 2·size` tokens each; attention runs over every rank's keys as they pass
//! around the ring (`models::hooks::SequenceGroup::ring_attention_forward`), with no head split.
//! Parameters and gradients are as under Ulysses.

use std::ops::Range;

use crate::{Error, Result};

/// This rank's position in its sequence-parallel group (`size` 1: whole sequences).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpRank {
    pub rank: usize,
    pub size: usize,
    /// Ring attention (zigzag chunks) rather than Ulysses' all-to-alls.
    pub ring: bool,
}

impl Default for SpRank {
    fn default() -> Self {
        SpRank::WHOLE
    }
}

impl SpRank {
    pub const WHOLE: SpRank = SpRank { rank: 0, size: 1, ring: false };

    /// Rank `rank` of `size` under Ulysses (all_to_all).
    pub fn ulysses(rank: usize, size: usize) -> SpRank {
        SpRank { rank, size, ring: false }
    }

    pub fn is_whole(&self) -> bool {
        self.size == 1
    }

    /// Whether attention's all-to-alls run (Ulysses on more than one rank).
    pub fn is_ulysses(&self) -> bool {
        !self.is_whole() && !self.ring
    }

    /// Whether attention runs around a ring (ring_attn on more than one rank).
    pub fn is_ring(&self) -> bool {
        !self.is_whole() && self.ring
    }

    /// The local micro-batch a rank runs for `batch` sequences of `seq` tokens: its part of each
    /// (Ulysses), or two zigzag chunks of each as sequences of their own (ring).
    pub fn local_batch(&self, batch: usize, seq: usize) -> (usize, usize) {
        if self.is_ring() {
            (2 * batch, seq / (2 * self.size))
        } else {
            (batch, seq / self.size)
        }
    }

    /// This rank's part of `windows` (`[b, seq+1]` tokens): its consecutive part of each window
    /// (Ulysses) or its two zigzag chunks as windows of their own (ring), each with the token
    /// after it (its last target). Whole windows on a rank of no sequence-parallel group.
    pub fn windows(&self, windows: &[u32], seq: usize) -> Vec<u32> {
        if self.is_whole() {
            return windows.to_vec();
        }
        let (b, part) = self.local_batch(1, seq);
        windows
            .chunks(seq + 1)
            .flat_map(|w| (0..b).flat_map(move |i| w[self.first_position(i, part)..][..part + 1].iter().copied()))
            .collect()
    }

    /// The first position of local sequence `i` (of `len` tokens) in its whole sequence: under
    /// ring attention its chunk's place, otherwise this rank's consecutive part.
    pub fn first_position(&self, i: usize, len: usize) -> usize {
        if self.is_ring() {
            gantry_kernels::cpu::ring_attention::zigzag_chunks(self.rank, self.size)[i % 2] * len
        } else {
            self.rank * len
        }
    }

    /// An error naming `parallel.sp` unless `heads` query and `kv_heads` key/value heads divide
    /// over the group.
    pub fn check_heads(&self, heads: usize, kv_heads: usize) -> Result<()> {
        if self.is_ulysses() && (!heads.is_multiple_of(self.size) || !kv_heads.is_multiple_of(self.size)) {
            return Err(Error::Unsupported {
                field: "parallel.sp".into(),
                message: format!(
                    "all_to_all gives each of {} ranks a share of the heads: the model's {heads} query and {kv_heads} key/value heads (on each tensor-parallel rank) must divide by it",
                    self.size
                ),
            });
        }
        Ok(())
    }
}

/// Which columns of a row belong to each rank's head group: for every `(start, width)` part,
/// rank j's columns are `start + j·width .. start + (j + 1)·width` (LLaMA's fused QKV row has
/// three parts, q, k and v; an attention output row one). A head group's columns are the parts'
/// concatenated, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadGroups {
    pub parts: Vec<(usize, usize)>,
}

impl HeadGroups {
    /// The width of one group's columns.
    pub fn width(&self) -> usize {
        self.parts.iter().map(|p| p.1).sum()
    }

    /// Rank `j`'s column ranges, in order.
    pub fn of(&self, j: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        self.parts.iter().map(move |&(start, w)| start + j * w..start + (j + 1) * w)
    }
}
