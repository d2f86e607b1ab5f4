//! A model's place in a pipeline (`parallel.pp`): which blocks this rank holds. A rank holds one
//! contiguous range of blocks per virtual stage (one under gpipe and 1f1b, several under
//! interleaved and zbv), the token embedding when it holds block 0, and the final norm and the
//! head when it holds the last block (with a copy of a tied embedding, whose gradient the runner
//! sums with the first stage's). Its blocks are numbered locally in order; the parameter table
//! keeps the global names and each parameter's random stream, so a stage draws and loads exactly
//! the whole model's values for what it holds.

use std::ops::Range;

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PpStage {
    /// The blocks held, as ascending disjoint global ranges: one per chunk (virtual stage).
    pub chunks: Vec<Range<usize>>,
    /// The model's blocks in all.
    pub layers: usize,
}

impl PpStage {
    /// Every block: a model that is not cut into stages.
    pub fn whole(layers: usize) -> PpStage {
        PpStage { chunks: std::iter::once(0..layers).collect(), layers }
    }

    /// `chunks` of a model of `layers` blocks; an error naming `parallel.pp_layers` unless they
    /// are non-empty, ascending and disjoint.
    pub fn new(chunks: Vec<Range<usize>>, layers: usize) -> Result<PpStage> {
        let ordered = chunks.windows(2).all(|w| w[0].end <= w[1].start);
        if chunks.is_empty() || !ordered || chunks.iter().any(|r| r.is_empty() || r.end > layers) {
            return Err(Error::Unsupported {
                field: "parallel.pp_layers".into(),
                message: format!("{chunks:?} are not ascending non-empty block ranges of a model of {layers} blocks"),
            });
        }
        Ok(PpStage { chunks, layers })
    }

    pub fn is_whole(&self) -> bool {
        self.chunks.len() == 1 && self.chunks[0] == (0..self.layers)
    }

    pub fn holds(&self, block: usize) -> bool {
        self.chunks.iter().any(|r| r.contains(&block))
    }

    /// Holds block 0, and so the embedding.
    pub fn first(&self) -> bool {
        self.holds(0)
    }

    /// Holds the last block, and so the final norm and the head.
    pub fn last(&self) -> bool {
        self.layers > 0 && self.holds(self.layers - 1)
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.chunks.iter().map(|r| r.len()).sum()
    }

    /// Chunk `c`'s blocks in the local numbering.
    pub fn local(&self, c: usize) -> Range<usize> {
        let start: usize = self.chunks[..c].iter().map(|r| r.len()).sum();
        start..start + self.chunks[c].len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_numbers_its_chunks_locally_and_knows_its_ends() {
        let s = PpStage::new(vec![1..3, 5..6], 6).unwrap();
        assert_eq!((s.local(0), s.local(1), s.blocks()), (0..2, 2..3, 3));
        assert!(!s.first() && s.last() && s.holds(2) && !s.holds(3));
        assert!(PpStage::whole(4).is_whole() && PpStage::whole(4).first());
        assert!(PpStage::new(vec![2..4, 1..2], 6).unwrap_err().to_string().contains("pp_layers"));
    }
}
