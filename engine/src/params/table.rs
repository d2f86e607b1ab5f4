use std::ops::Range;

use crate::rng::Rng;

/// Where one parameter lives in the flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamRef {
    pub offset: usize,
    pub len: usize,
}

impl ParamRef {
    #[inline]
    pub fn get<'a>(&self, buf: &'a [f32]) -> &'a [f32] {
        &buf[self.offset..self.offset + self.len]
    }

    #[inline]
    pub fn get_mut<'a>(&self, buf: &'a mut [f32]) -> &'a mut [f32] {
        &mut buf[self.offset..self.offset + self.len]
    }

    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// How a parameter is initialised when no weights are loaded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Normal { std: f32 },
    Ones,
    Zeros,
}

/// One named parameter (named as in the Hugging Face checkpoint).
#[derive(Clone, Debug, PartialEq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub at: ParamRef,
    pub init: Init,
    /// Whether weight decay applies: matrices yes, norms and biases no.
    pub decay: bool,
    pub chunk: usize,
}

/// A contiguous range of the flat buffers holding whole parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub range: Range<usize>,
    /// Indices into the table's entries.
    pub params: Range<usize>,
}

/// The layout of a model's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTable {
    entries: Vec<ParamEntry>,
    chunks: Vec<Chunk>,
    len: usize,
}

/// Chunks hold at least this many elements (64 MiB of f32), or one whole tensor if larger, so
/// that the later communication and offload units are large enough to run at full bandwidth.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 24;

/// Collects parameters in the order a model declares them.
#[derive(Debug, Default)]
pub struct ParamTableBuilder {
    pending: Vec<(String, Vec<usize>, Init)>,
}

impl ParamTableBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a parameter; its [`ParamRef`] is known once the table is built, so the builder
    /// returns the index to look it up by.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> usize {
        self.pending.push((name.into(), shape.to_vec(), init));
        self.pending.len() - 1
    }

    pub fn build(self, chunk_elems: usize) -> ParamTable {
        // A tensor larger than a chunk gets a chunk of its own (chunks always hold whole tensors).
        let cap = chunk_elems.max(1);
        let mut entries = Vec::with_capacity(self.pending.len());
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut offset = 0;
        for (i, (name, shape, init)) in self.pending.into_iter().enumerate() {
            let len: usize = shape.iter().product();
            let open = chunks.last().is_some_and(|c| c.range.end - c.range.start + len <= cap);
            if !open {
                chunks.push(Chunk { range: offset..offset, params: i..i });
            }
            let c = chunks.last_mut().expect("a chunk was just opened");
            c.range.end += len;
            c.params.end = i + 1;
            let decay = shape.len() >= 2;
            entries.push(ParamEntry { name, shape, at: ParamRef { offset, len }, init, decay, chunk: chunks.len() - 1 });
            offset += len;
        }
        ParamTable { entries, chunks, len: offset }
    }
}

impl ParamTable {
    /// Total elements.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// The parameter declared `index`-th (as returned by [`ParamTableBuilder::add`]).
    pub fn at(&self, index: usize) -> ParamRef {
        self.entries[index].at
    }

    pub fn find(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Fills `params` with the seeded initial values. Each parameter draws from its own stream
    /// (keyed by its index), so the values do not depend on the thread count or the layout.
    pub fn init(&self, params: &mut [f32], seed: u64) {
        use rayon::prelude::*;
        let mut slices: Vec<(&ParamEntry, &mut [f32])> = Vec::with_capacity(self.entries.len());
        let mut rest = params;
        for e in &self.entries {
            let (head, tail) = rest.split_at_mut(e.at.len);
            slices.push((e, head));
            rest = tail;
        }
        slices.into_par_iter().enumerate().for_each(|(i, (e, out))| match e.init {
            Init::Ones => out.fill(1.0),
            Init::Zeros => out.fill(0.0),
            Init::Normal { std } => {
                let mut rng = Rng::new(seed, i as u64);
                for v in out.iter_mut() {
                    *v = (rng.normal() * std as f64) as f32;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_whole_tensors_and_cover_the_buffer() {
        let mut b = ParamTableBuilder::new();
        b.add("a", &[10, 10], Init::Normal { std: 0.02 });
        b.add("b", &[10], Init::Zeros);
        b.add("c", &[300], Init::Ones);
        b.add("d", &[50, 2], Init::Normal { std: 1.0 });
        let t = b.build(150);
        assert_eq!(t.len(), 510);
        let ranges: Vec<_> = t.chunks().iter().map(|c| c.range.clone()).collect();
        assert_eq!(ranges, vec![0..110, 110..410, 410..510]);
        assert!(t.find("b").is_some_and(|e| !e.decay && e.chunk == 0));
        assert!(t.find("d").is_some_and(|e| e.decay && e.chunk == 2));
        let mut p = vec![0.0; t.len()];
        t.init(&mut p, 1);
        assert!(p[100..110].iter().all(|v| *v == 0.0) && p[110..410].iter().all(|v| *v == 1.0));
        let std = (p[..100].iter().map(|v| v * v).sum::<f32>() / 100.0).sqrt();
        assert!((0.01..0.03).contains(&std), "std {std}");
    }
}
