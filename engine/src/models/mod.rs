//! Transformer language models with explicit forward and backward passes.
//!
//! A model is its config, its [`ParamTable`] (the Hugging Face parameter names and shapes, so
//! loading and export are a copy) and its layers. Activations live in buffers sized once for a
//! batch shape and reused every step. Models know nothing of parallelism: the parallel wrappers
//! drive them from outside.

pub mod config;
mod gpt2;
pub mod hooks;
mod llama;
pub mod presets;
mod sliced;

pub use config::{Arch, ModelConfig};

use crate::nn::LmHead;
use crate::params::{Chunking, ParamTable};
use crate::{Error, Result};

/// A causal language model.
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    pub table: ParamTable,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

/// Activation buffers for one batch shape, reused every step.
#[derive(Debug)]
pub struct Activations {
    batch: usize,
    seq: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Sequences of the micro-batch loaded last (by `load`).
    loaded: usize,
    kind: ActsKind,
}

#[derive(Debug)]
enum ActsKind {
    Gpt2(gpt2::Acts),
    Llama(llama::Acts),
}

impl Activations {
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Splits `windows` (`[b, seq+1]` tokens) into inputs and targets; returns `b`.
    fn load(&mut self, windows: &[u32], vocab: usize) -> Result<usize> {
        self.loaded = split_windows(windows, self.seq, self.batch, vocab, &mut self.inputs, &mut self.targets)?;
        Ok(self.loaded)
    }

    /// Bytes held: the float buffers and the token ids.
    pub fn bytes(&self) -> u64 {
        let floats = match &self.kind {
            ActsKind::Gpt2(a) => a.elems(),
            ActsKind::Llama(a) => a.elems(),
        };
        4 * (floats + self.inputs.len() + self.targets.len()) as u64
    }
}

impl Model {
    pub fn new(config: ModelConfig) -> Result<Model> {
        Self::with_chunks(config, Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS))
    }

    /// As `new`, with the parameter table cut into chunks as `chunking` says: the unit of DDP
    /// buckets and ZeRO shards. A model whose embedding or head is split across chunks runs it a
    /// vocabulary slice at a time.
    pub fn with_chunks(config: ModelConfig, chunking: Chunking) -> Result<Model> {
        let (table, kind) = match config.arch {
            Arch::Gpt2 => {
                let (t, m) = gpt2::Gpt2::new(&config, chunking);
                (t, Kind::Gpt2(m))
            }
            Arch::Llama => {
                let (t, m) = llama::Llama::new(&config, chunking);
                (t, Kind::Llama(m))
            }
        };
        Ok(Model { config, table, kind })
    }

    /// The bytes `activations(batch, seq)` would allocate, computed without allocating them;
    /// `u64::MAX` for a shape whose buffers could not even be sized (their lengths would
    /// overflow).
    pub fn activation_bytes(&self, batch: usize, seq: usize) -> u64 {
        // Every buffer is at most (layers + 1) × tokens × the widest row (a layer's activations,
        // the MLP, the fused QKV, a block of logits): if that fits, so does every length.
        let c = &self.config;
        let widest = [c.hidden * 3, c.intermediate, c.vocab, (c.heads + 2 * c.kv_heads) * c.head_dim].into_iter().max().unwrap_or(1);
        let fits = batch
            .checked_mul(seq)
            .and_then(|n| n.checked_mul(c.layers + 1))
            .and_then(|n| n.checked_mul(widest))
            .and_then(|n| n.checked_mul(64));
        if fits.is_none() {
            return u64::MAX;
        }
        let floats = match &self.kind {
            Kind::Gpt2(m) => m.acts_elems(batch, seq),
            Kind::Llama(m) => m.acts_elems(batch, seq),
        };
        4 * (floats + 2 * batch * seq) as u64
    }

    /// Buffers for batches of up to `batch` sequences of `seq` tokens.
    pub fn activations(&self, batch: usize, seq: usize) -> Result<Activations> {
        if seq == 0 || batch == 0 {
            return Err(Error::Unsupported { field: "data.seq_len".into(), message: "batch and sequence length must be positive".into() });
        }
        if seq > self.config.max_positions {
            return Err(Error::Unsupported {
                field: "data.seq_len".into(),
                message: format!("{seq} exceeds the model's {} positions", self.config.max_positions),
            });
        }
        let kind = match &self.kind {
            Kind::Gpt2(m) => ActsKind::Gpt2(m.acts(batch, seq)),
            Kind::Llama(m) => ActsKind::Llama(m.acts(batch, seq)),
        };
        let n = batch * seq;
        Ok(Activations { batch, seq, inputs: vec![0; n], targets: vec![0; n], loaded: 0, kind })
    }

    /// Forward and backward over `windows` (`[b, seq+1]` tokens): accumulates `grad_scale ×
    /// ∂(summed loss)/∂params` into `grads` and returns the summed loss in nats.
    pub fn forward_backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        acts: &mut Activations,
        windows: &[u32],
        grad_scale: f32,
    ) -> Result<f64> {
        let mut view = params;
        self.run_forward_backward(&mut view, grads, acts, windows, grad_scale)
    }

    /// As `forward_backward`, telling `hooks` which parameters are about to be read and which
    /// gradients are final (parallel wrappers gather and communicate there).
    pub fn forward_backward_hooked(
        &self,
        params: &mut [f32],
        grads: &mut [f32],
        acts: &mut Activations,
        windows: &[u32],
        grad_scale: f32,
        hooks: &mut dyn hooks::ParamHooks,
    ) -> Result<f64> {
        self.run_forward_backward(&mut hooks::Hooked { params, hooks }, grads, acts, windows, grad_scale)
    }

    fn run_forward_backward(
        &self,
        pa: &mut dyn hooks::Params,
        grads: &mut [f32],
        acts: &mut Activations,
        windows: &[u32],
        grad_scale: f32,
    ) -> Result<f64> {
        let b = acts.load(windows, self.config.vocab)?;
        let (seq, inputs, targets) = (acts.seq, &acts.inputs, &acts.targets);
        match (&self.kind, &mut acts.kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => m.forward_backward(pa, grads, a, b, seq, inputs, targets, grad_scale),
            (Kind::Llama(m), ActsKind::Llama(a)) => m.forward_backward(pa, grads, a, b, seq, inputs, targets, grad_scale),
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// Pipeline stages and activation checkpointing run a micro-batch through the model a part at
    /// a time: `embed`, `forward_blocks` over consecutive block ranges, `head_backward`,
    /// `backward_blocks` over the same ranges in reverse, `embed_backward`. Together they compute
    /// exactly what `forward_backward` does. A micro-batch's saved activations are its own
    /// `Activations`, so several micro-batches can be between forward and backward at once.
    pub fn embed(&self, params: &[f32], acts: &mut Activations, windows: &[u32]) -> Result<()> {
        let b = acts.load(windows, self.config.vocab)?;
        let (mut pa, seq, inputs) = (params, acts.seq, &acts.inputs);
        match (&self.kind, &mut acts.kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => m.embed(&mut pa, a, b, seq, inputs),
            (Kind::Llama(m), ActsKind::Llama(a)) => m.embed(&mut pa, a, b, seq, inputs),
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// Blocks `range` forward for the micro-batch `embed` loaded into `acts` (see `embed`).
    pub fn forward_blocks(&self, params: &[f32], acts: &mut Activations, range: std::ops::Range<usize>) -> Result<()> {
        let (b, seq) = self.loaded(acts, &range)?;
        let mut pa = params;
        match (&self.kind, &mut acts.kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => m.blocks_forward(&mut pa, a, b, seq, range),
            (Kind::Llama(m), ActsKind::Llama(a)) => m.blocks_forward(&mut pa, a, b, seq, range),
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// The final norm and the head, forward and backward, after every block ran forward: returns
    /// the summed loss and accumulates `grad_scale ×` the head's gradients (see `embed`).
    pub fn head_backward(&self, params: &[f32], grads: &mut [f32], acts: &mut Activations, grad_scale: f32) -> Result<f64> {
        let (b, seq) = self.loaded(acts, &(0..0))?;
        let (mut pa, targets) = (params, &acts.targets);
        match (&self.kind, &mut acts.kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => {
                m.final_norm(&mut pa, a, b, seq)?;
                m.head_backward(&mut pa, grads, a, b, seq, targets, grad_scale)
            }
            (Kind::Llama(m), ActsKind::Llama(a)) => {
                m.final_norm(&mut pa, a, b, seq)?;
                m.head_backward(&mut pa, grads, a, b, seq, targets, grad_scale)
            }
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// Blocks `range` backward (see `embed`).
    pub fn backward_blocks(&self, params: &[f32], grads: &mut [f32], acts: &mut Activations, range: std::ops::Range<usize>) -> Result<()> {
        let (b, seq) = self.loaded(acts, &range)?;
        let mut pa = params;
        match (&self.kind, &mut acts.kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => m.blocks_backward(&mut pa, grads, a, b, seq, range),
            (Kind::Llama(m), ActsKind::Llama(a)) => m.blocks_backward(&mut pa, grads, a, b, seq, range),
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// The token embedding's gradient, after every block ran backward (see `embed`).
    pub fn embed_backward(&self, params: &[f32], grads: &mut [f32], acts: &mut Activations) -> Result<()> {
        let (b, seq) = self.loaded(acts, &(0..0))?;
        let (mut pa, inputs) = (params, &acts.inputs);
        match (&self.kind, &mut acts.kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => m.embed_backward(&mut pa, grads, a, b, seq, inputs),
            (Kind::Llama(m), ActsKind::Llama(a)) => m.embed_backward(&mut pa, grads, a, b, seq, inputs),
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// The micro-batch `acts` holds (sequences, length), checking `range` names blocks.
    fn loaded(&self, acts: &Activations, range: &std::ops::Range<usize>) -> Result<(usize, usize)> {
        if acts.loaded == 0 {
            return Err(Error::Unsupported {
                field: "blocks".into(),
                message: "no micro-batch was embedded into these activations".into(),
            });
        }
        if range.start > range.end || range.end > self.config.layers {
            return Err(Error::Unsupported {
                field: "blocks".into(),
                message: format!("blocks {range:?} of a model of {} blocks", self.config.layers),
            });
        }
        Ok((acts.loaded, acts.seq))
    }

    /// Summed loss (nats) over `windows`, forward only.
    pub fn loss(&self, params: &[f32], acts: &mut Activations, windows: &[u32]) -> Result<f64> {
        let b = acts.load(windows, self.config.vocab)?;
        let Activations { seq, inputs, targets, kind, .. } = acts;
        let (h, head, scratch) = self.hidden(params, kind, b, *seq, inputs);
        Ok(head.loss(params, h, &targets[..b * *seq], scratch, None))
    }

    /// Logits `[b, seq, vocab]` for `windows` (`[b, seq+1]` tokens; the last token of each window
    /// is not read).
    pub fn logits(&self, params: &[f32], acts: &mut Activations, windows: &[u32]) -> Result<Vec<f32>> {
        let b = acts.load(windows, self.config.vocab)?;
        let Activations { seq, inputs, kind, .. } = acts;
        let (h, head, _) = self.hidden(params, kind, b, *seq, inputs);
        let mut out = vec![0.0; b * *seq * self.config.vocab];
        head.logits(params, h, b * *seq, &mut out);
        Ok(out)
    }

    /// Runs the blocks: the final hidden states, the head, and the head's scratch.
    fn hidden<'a>(
        &self,
        params: &[f32],
        kind: &'a mut ActsKind,
        b: usize,
        seq: usize,
        inputs: &[u32],
    ) -> (&'a [f32], LmHead, &'a mut [f32]) {
        match (&self.kind, kind) {
            (Kind::Gpt2(m), ActsKind::Gpt2(a)) => m.hidden(params, a, b, seq, inputs),
            (Kind::Llama(m), ActsKind::Llama(a)) => m.hidden(params, a, b, seq, inputs),
            _ => unreachable!("activations belong to the model that made them"),
        }
    }

    /// Model FLOPs per trained token at sequence length `seq`.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        self.config.flops_per_token(self.table.len(), seq)
    }
}

/// Splits `windows` (`[b, seq+1]` tokens, `b` from 1 to `max_batch`) into `inputs` and `targets`
/// (`[b, seq]` each, the targets shifted by one); returns `b`. Refuses a ragged batch and tokens
/// outside the vocabulary, naming them. (The GPU model loads its batches through this too.)
pub(crate) fn split_windows(
    windows: &[u32],
    seq: usize,
    max_batch: usize,
    vocab: usize,
    inputs: &mut [u32],
    targets: &mut [u32],
) -> Result<usize> {
    let w = seq + 1;
    let b = windows.len() / w;
    if !windows.len().is_multiple_of(w) || b == 0 || b > max_batch {
        return Err(Error::Unsupported {
            field: "batch".into(),
            message: format!("got {} tokens: expected 1 to {max_batch} windows of {w}", windows.len()),
        });
    }
    if let Some(t) = windows.iter().find(|t| **t as usize >= vocab) {
        return Err(Error::Unsupported {
            field: "data".into(),
            message: format!("token id {t} is outside the model's vocabulary of {vocab}"),
        });
    }
    for (i, win) in windows.chunks(w).enumerate() {
        inputs[i * seq..(i + 1) * seq].copy_from_slice(&win[..seq]);
        targets[i * seq..(i + 1) * seq].copy_from_slice(&win[1..]);
    }
    Ok(b)
}

/// The `l`-th of a layer-major stack of buffers, each `stride` long, first `len` elements.
#[inline]
fn layer(buf: &[f32], l: usize, stride: usize, len: usize) -> &[f32] {
    &buf[l * stride..l * stride + len]
}

#[inline]
fn layer_mut(buf: &mut [f32], l: usize, stride: usize, len: usize) -> &mut [f32] {
    &mut buf[l * stride..l * stride + len]
}

#[cfg(test)]
mod tests;
