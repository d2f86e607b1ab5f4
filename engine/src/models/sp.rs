//! A model's place in a sequence-parallel group (DeepSpeed Ulysses, `parallel.sp_mode =
//! "all_to_all"`): each rank holds `1/size` of every sequence's tokens, consecutive, and runs
//! everything but attention on them alone (norms, projections, the MLP, the head: all are per
//! token). Around attention an all-to-all turns the sequence part into a head part (every
//! rank's tokens, the whole sequence, for `1/size` of the heads) and back, so attention sees
//! whole sequences. The parameters are whole on every rank; their gradients are each rank's part
//! and are summed over the ranks as data parallelism sums them (the trainer's dp group spans
//! dp × sp).

use std::ops::Range;

use crate::{Error, Result};

/// This rank's position in its sequence-parallel group (`size` 1: whole sequences).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpRank {
    pub rank: usize,
    pub size: usize,
}

impl Default for SpRank {
    fn default() -> Self {
        SpRank::WHOLE
    }
}

impl SpRank {
    pub const WHOLE: SpRank = SpRank { rank: 0, size: 1 };

    pub fn is_whole(&self) -> bool {
        self.size == 1
    }

    /// An error naming `parallel.sp` unless `heads` query and `kv_heads` key/value heads divide
    /// over the group.
    pub fn check_heads(&self, heads: usize, kv_heads: usize) -> Result<()> {
        if !heads.is_multiple_of(self.size) || !kv_heads.is_multiple_of(self.size) {
            return Err(Error::Unsupported {
                field: "parallel.sp".into(),
                message: format!(
                    "all_to_all gives each of {} ranks a share of the heads: the model's {heads} query and {kv_heads} key/value heads must divide by it",
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
