use std::ops::Range;

use super::Shard;
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
    /// The shape this rank holds: the global one, or its shard's.
    pub shape: Vec<usize>,
    /// The whole tensor's shape (as the checkpoint stores it).
    pub global_shape: Vec<usize>,
    /// The part of the global tensor this rank holds, when the tensor is cut across
    /// tensor-parallel ranks (`None`: the whole tensor, as every rank holds it).
    pub shard: Option<Shard>,
    pub at: ParamRef,
    pub init: Init,
    /// Whether weight decay applies: matrices yes, norms and biases no.
    pub decay: bool,
    /// The chunks holding it: one, or several for a tensor larger than a chunk.
    pub chunks: Range<usize>,
    /// Its place in the whole model's declaration order: the random stream its initial values
    /// come from, so a pipeline stage holding part of the model draws what the whole draws.
    pub stream: u64,
}

/// A contiguous range of the flat buffers: whole parameters, or whole rows of one parameter
/// larger than a chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub range: Range<usize>,
    /// Indices into the table's entries (of the parameters it holds, wholly or in part).
    pub params: Range<usize>,
}

/// The layout of a model's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamTable {
    entries: Vec<ParamEntry>,
    chunks: Vec<Chunk>,
    len: usize,
    /// Declaration index to entry index (`None`: declared, not held by this rank).
    slots: Vec<Option<usize>>,
    /// The names of the parameters declared but held by other ranks (other pipeline stages).
    elsewhere: Vec<String>,
}

/// Chunks hold at least this many elements (64 MiB of f32), or one whole tensor if larger, so
/// that the later communication and offload units are large enough to run at full bandwidth.
pub const DEFAULT_CHUNK_ELEMS: usize = 1 << 24;

/// How a table is cut into chunks: at most `elems` elements each, and whether a tensor larger
/// than that is cut into chunks of whole rows (`split_large`, for ZeRO-3, which gathers a chunk
/// at a time) or gets one chunk of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    pub elems: usize,
    pub split_large: bool,
}

impl Chunking {
    /// Chunks of whole tensors.
    pub fn whole(elems: usize) -> Chunking {
        Chunking { elems, split_large: false }
    }

    /// Large tensors cut into chunks of whole rows.
    pub fn split(elems: usize) -> Chunking {
        Chunking { elems, split_large: true }
    }
}

/// The chunks under data parallelism for a model of `elems` parameters at ZeRO stage `zero`:
/// about 1/64 of the model (at least 4 Ki elements), so that backward has chunks to overlap its
/// collectives with and ZeRO-3 holds a small part of the model gathered at a time (a block, the
/// chunk being prefetched and a few in flight: about a tenth of the model on a 6-layer LLaMA).
/// ZeRO-3 cuts large tensors too (the embedding and head then run a vocabulary slice at a
/// time, with the logits of all rows at once); the other stages keep them whole, whose head
/// needs only a block of rows' logits.
pub fn data_parallel_chunking(elems: usize, zero: u8) -> Chunking {
    let size = (elems / 64).max(1 << 12);
    if zero >= 3 {
        Chunking::split(size)
    } else {
        Chunking::whole(size)
    }
}

/// A declared parameter: its name, global shape, this rank's shard, init, and whether held.
type Pending = (String, Vec<usize>, Option<Shard>, Init, bool);

/// Collects parameters in the order a model declares them.
#[derive(Clone, Debug, Default)]
pub struct ParamTableBuilder {
    /// Declared parameters, with whether this rank holds them.
    pending: Vec<Pending>,
    /// Whether the parameters declared next are held (see `hold`).
    skipping: bool,
}

impl ParamTableBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a parameter; its [`ParamRef`] is known once the table is built, so the builder
    /// returns the index to look it up by.
    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init) -> usize {
        self.add_sharded(name, shape, None, init)
    }

    /// Declares a parameter of global shape `shape` of which this rank holds `shard` (all of it
    /// when `None`).
    pub fn add_sharded(&mut self, name: impl Into<String>, shape: &[usize], shard: Option<Shard>, init: Init) -> usize {
        self.pending.push((name.into(), shape.to_vec(), shard, init, !self.skipping));
        self.pending.len() - 1
    }

    /// Whether the parameters declared from now on are held by this rank (a pipeline stage holds
    /// its blocks' only). One not held keeps its place in the declaration order (its random
    /// stream) but takes no space: its [`ParamRef`] is empty.
    pub fn hold(&mut self, held: bool) {
        self.skipping = !held;
    }

    /// Lays the parameters out in declaration order and groups them into chunks of at most
    /// `chunking.elems` elements. Small tensors share chunks (never split). A tensor larger than a
    /// chunk gets a chunk of its own, or with `split_large` is cut into chunks of whole rows (its
    /// first dimension), of equal size but for the last, so that ZeRO-3 never gathers more than
    /// a chunk of it at once, and the embedding and head run one row range (a slice of the
    /// vocabulary) at a time.
    pub fn build(self, chunking: Chunking) -> ParamTable {
        let cap = chunking.elems.max(1);
        let mut entries = Vec::with_capacity(self.pending.len());
        let mut chunks: Vec<Chunk> = Vec::new();
        // Whether the last chunk takes more tensors (not after the pieces of a split one).
        let mut open = false;
        let mut offset = 0;
        let mut slots = Vec::with_capacity(self.pending.len());
        let mut elsewhere = Vec::new();
        for (stream, (name, global_shape, shard, init, held)) in self.pending.into_iter().enumerate() {
            if !held {
                slots.push(None);
                elsewhere.push(name);
                continue;
            }
            let i = entries.len();
            slots.push(Some(i));
            let shape = shard.as_ref().map_or_else(|| global_shape.clone(), |s| s.local_shape(&global_shape));
            let len: usize = shape.iter().product();
            let first = chunks.len();
            if len > cap && chunking.split_large {
                let row = shape.iter().skip(1).product::<usize>().max(1);
                let rows = len / row;
                let pieces = len.div_ceil(cap);
                let per = rows.div_ceil(pieces).max(1) * row;
                let mut at = offset;
                while at < offset + len {
                    let end = (at + per).min(offset + len);
                    chunks.push(Chunk { range: at..end, params: i..i + 1 });
                    at = end;
                }
                open = false;
            } else {
                if !(open && chunks.last().is_some_and(|c| c.range.len() + len <= cap)) {
                    // (A tensor larger than a chunk, not split, opens one of its own.)
                    chunks.push(Chunk { range: offset..offset, params: i..i });
                    open = true;
                }
                let c = chunks.last_mut().expect("a chunk was just opened");
                c.range.end += len;
                c.params.end = i + 1;
            }
            let decay = shape.len() >= 2;
            let held = first.min(chunks.len() - 1)..chunks.len();
            let stream = stream as u64;
            entries.push(ParamEntry { name, shape, global_shape, shard, at: ParamRef { offset, len }, init, decay, chunks: held, stream });
            offset += len;
        }
        ParamTable { entries, chunks, len: offset, slots, elsewhere }
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
        match self.slots.get(index) {
            Some(Some(i)) => self.entries[*i].at,
            Some(None) => ParamRef { offset: 0, len: 0 },
            None => self.entries[index].at,
        }
    }

    /// `at`'s range cut at chunk boundaries: one range for a tensor inside a chunk, one per chunk
    /// (of whole rows) for a tensor split across chunks. Code that runs such a tensor a slice at
    /// a time asks for the parameters and announces the gradients of one slice at a time.
    pub fn slices(&self, at: ParamRef) -> Vec<Range<usize>> {
        let r = at.range();
        let first = self.chunks.partition_point(|c| c.range.end <= r.start);
        self.chunks[first..]
            .iter()
            .take_while(|c| c.range.start < r.end)
            .map(|c| c.range.start.max(r.start)..c.range.end.min(r.end))
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Whether `name` is a parameter of the model that another rank holds (a tensor of another
    /// pipeline stage, which a stage reading a checkpoint passes over).
    pub fn held_elsewhere(&self, name: &str) -> bool {
        self.elsewhere.iter().any(|n| n == name)
    }

    pub fn find(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Fills `params` with the seeded initial values. Each parameter draws from its own stream
    /// (keyed by its index), so the values do not depend on the thread count or the layout: a
    /// shard draws the whole tensor and keeps its part.
    pub fn init(&self, params: &mut [f32], seed: u64) {
        use rayon::prelude::*;
        let mut slices: Vec<(&ParamEntry, &mut [f32])> = Vec::with_capacity(self.entries.len());
        let mut rest = params;
        for e in &self.entries {
            let (head, tail) = rest.split_at_mut(e.at.len);
            slices.push((e, head));
            rest = tail;
        }
        slices.into_par_iter().for_each(|(e, out)| match e.init {
            Init::Ones => out.fill(1.0),
            Init::Zeros => out.fill(0.0),
            Init::Normal { std } => {
                let mut rng = Rng::new(seed, e.stream);
                let mut draw = |out: &mut [f32]| out.iter_mut().for_each(|v| *v = (rng.normal() * std as f64) as f32);
                match &e.shard {
                    Some(s) => {
                        let mut whole = vec![0.0; e.global_shape.iter().product()];
                        draw(&mut whole);
                        s.take(&e.global_shape, &whole, out);
                    }
                    None => draw(out),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_whole_small_tensors_and_cover_the_buffer() {
        let mut b = ParamTableBuilder::new();
        b.add("a", &[10, 10], Init::Normal { std: 0.02 });
        b.add("b", &[10], Init::Zeros);
        b.add("c", &[300], Init::Ones);
        b.add("d", &[50, 2], Init::Normal { std: 1.0 });
        let whole = b.clone().build(Chunking::whole(150));
        let whole_ranges: Vec<_> = whole.chunks().iter().map(|c| c.range.clone()).collect();
        assert_eq!(whole_ranges, vec![0..110, 110..410, 410..510], "a large tensor not split has a chunk of its own");
        let t = b.build(Chunking::split(150));
        assert_eq!(t.len(), 510);
        let ranges: Vec<_> = t.chunks().iter().map(|c| c.range.clone()).collect();
        // "c" (300 elements) is larger than a chunk: two chunks of its own.
        assert_eq!(ranges, vec![0..110, 110..260, 260..410, 410..510]);
        assert!(t.find("b").is_some_and(|e| !e.decay && e.chunks == (0..1)));
        assert!(t.find("c").is_some_and(|e| !e.decay && e.chunks == (1..3)));
        assert!(t.find("d").is_some_and(|e| e.decay && e.chunks == (3..4)));
        let mut p = vec![0.0; t.len()];
        t.init(&mut p, 1);
        assert!(p[100..110].iter().all(|v| *v == 0.0) && p[110..410].iter().all(|v| *v == 1.0));
        let std = (p[..100].iter().map(|v| v * v).sum::<f32>() / 100.0).sqrt();
        assert!((0.01..0.03).contains(&std), "std {std}");
    }

    #[test]
    fn a_tensor_larger_than_a_chunk_is_cut_into_chunks_of_whole_rows() {
        let mut b = ParamTableBuilder::new();
        b.add("norm", &[8], Init::Ones);
        b.add("embed", &[10, 7], Init::Normal { std: 0.02 }); // 70 elements over chunks of 30
        b.add("bias", &[5], Init::Zeros);
        b.add("w", &[4, 5], Init::Normal { std: 0.02 });
        let t = b.build(Chunking::split(30));
        let ranges: Vec<_> = t.chunks().iter().map(|c| c.range.clone()).collect();
        // 70 elements need 3 chunks: 4 rows (28), 4 rows, 2 rows; then the small ones share.
        assert_eq!(ranges, vec![0..8, 8..36, 36..64, 64..78, 78..103]);
        let embed = t.find("embed").unwrap();
        assert_eq!(embed.chunks, 1..4);
        assert_eq!(t.slices(embed.at), vec![8..36, 36..64, 64..78]);
        assert!(t.slices(embed.at).iter().all(|s| s.len() % 7 == 0), "whole rows");
        assert_eq!(t.slices(t.find("w").unwrap().at), vec![83..103]);
        assert_eq!(t.find("bias").unwrap().chunks, 4..5);
        assert_eq!(t.chunks()[1].params, 1..2);
        assert_eq!(t.chunks()[4].params, 2..4);
        assert!(t.chunks().iter().all(|c| c.range.len() <= 30));
    }
}
