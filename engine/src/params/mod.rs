//! The flat parameter table.
//!
//! Every parameter of a model lives at a fixed offset of one flat `f32` buffer; gradients and the
//! optimizer's two moments are buffers of the same layout. The table also groups parameters into
//! *chunks* (contiguous ranges holding whole tensors), the unit that DDP buckets, ZeRO shards,
//! Gemini placement and checkpoint shards are made of.

mod shard;
mod table;

pub use shard::{assemble, cut, Shard};
pub use table::{data_parallel_chunking, Chunk, Chunking, Init, ParamEntry, ParamRef, ParamTable, ParamTableBuilder, DEFAULT_CHUNK_ELEMS};

/// The training state of one rank: parameters and gradients in the table's layout, and the AdamW
/// moments of the part of the table this rank updates (`shard`: all of it, or under ZeRO its
/// share of the flat buffer).
#[derive(Debug)]
pub struct ParamBuffers {
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    /// The parts of the flat buffer whose moments `m` and `v` hold, in order (`m` and `v` are
    /// their concatenation).
    pub pieces: Vec<std::ops::Range<usize>>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl ParamBuffers {
    pub fn zeros(table: &ParamTable) -> Self {
        Self::sharded(table, std::iter::once(0..table.len()).collect())
    }

    /// Full-size parameters and gradients, moments for `pieces` only.
    pub fn sharded(table: &ParamTable, pieces: Vec<std::ops::Range<usize>>) -> Self {
        let n = table.len();
        let s = pieces.iter().map(|p| p.len()).sum();
        ParamBuffers { params: vec![0.0; n], grads: vec![0.0; n], pieces, m: vec![0.0; s], v: vec![0.0; s] }
    }

    /// Bytes of parameters, gradients and optimizer state held.
    pub fn bytes(&self) -> u64 {
        4 * (self.params.len() + self.grads.len() + self.m.len() + self.v.len()) as u64
    }
}
