//! Which chunks of the gradient buffer a backward pass has finished: both data-parallel wrappers
//! (sockets on CPU ranks, NCCL on GPU ranks) start a chunk's collective the moment the model has
//! announced every gradient in it final, and check at the end that it announced them all.

use std::ops::Range;

use crate::{Error, Result};

/// The chunks of the flat buffer and, for this backward, the elements of each not final yet.
#[derive(Clone, Debug)]
pub struct FinalGrads {
    chunks: Vec<Range<usize>>,
    missing: Vec<usize>,
}

impl FinalGrads {
    pub fn new(chunks: Vec<Range<usize>>) -> Self {
        let missing = chunks.iter().map(|c| c.len()).collect();
        FinalGrads { chunks, missing }
    }

    pub fn chunks(&self) -> &[Range<usize>] {
        &self.chunks
    }

    /// The chunks `range` overlaps.
    pub fn chunks_of(&self, range: &Range<usize>) -> Range<usize> {
        let first = self.chunks.partition_point(|c| c.end <= range.start);
        let last = self.chunks.partition_point(|c| c.start < range.end);
        first..last.max(first)
    }

    /// Before a backward pass: nothing is final.
    pub fn reset(&mut self) {
        for (m, c) in self.missing.iter_mut().zip(&self.chunks) {
            *m = c.len();
        }
    }

    /// The gradients of `range` are final: the chunks this completes, in order. Announcing an
    /// element twice is an error (a model bug that would start a chunk's collective early).
    pub fn announce(&mut self, range: &Range<usize>) -> Result<Vec<usize>> {
        let mut done = Vec::new();
        for c in self.chunks_of(range) {
            let chunk = &self.chunks[c];
            let overlap = range.end.min(chunk.end).saturating_sub(range.start.max(chunk.start));
            if overlap == 0 {
                continue;
            }
            self.missing[c] = self.missing[c]
                .checked_sub(overlap)
                .ok_or_else(|| Error::Comm { rank: None, message: format!("the gradients of {range:?} were announced final twice") })?;
            if self.missing[c] == 0 {
                done.push(c);
            }
        }
        Ok(done)
    }

    /// After a backward pass: every gradient must have been announced.
    pub fn check_all_final(&self) -> Result<()> {
        if self.missing.iter().any(|m| *m != 0) {
            return Err(Error::Comm { rank: None, message: "the model did not announce every final gradient".into() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_completes_once_all_its_gradients_are_announced() {
        let mut f = FinalGrads::new(vec![0..10, 10..10, 10..25, 25..30]);
        assert_eq!(f.chunks_of(&(5..12)), 0..3);
        assert_eq!(f.announce(&(0..4)).unwrap(), Vec::<usize>::new());
        assert!(f.check_all_final().is_err());
        // Across a boundary: the rest of chunk 0 and the start of chunk 2.
        assert_eq!(f.announce(&(4..12)).unwrap(), vec![0]);
        assert_eq!(f.announce(&(12..30)).unwrap(), vec![2, 3]);
        // The empty chunk never holds anything back (it completes with no announcement).
        assert!(f.check_all_final().is_ok());
        let err = f.announce(&(20..21)).unwrap_err().to_string();
        assert!(err.contains("announced final twice"), "{err}");
        f.reset();
        assert!(f.check_all_final().is_err());
    }
}
