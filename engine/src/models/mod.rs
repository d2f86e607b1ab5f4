//! Transformer language models with explicit forward and backward passes, each written once
//! over the two backends (`crate::backend`).
//!
//! A model is its config, its [`ParamTable`] (the Hugging Face parameter names and shapes, so
//! loading and export are a copy) and its layers. Activations live in buffers sized once for a
//! batch shape and reused every step, on the backend that runs them. Models know nothing of
//! parallelism: the parallel wrappers drive them from outside, through the parameter hooks.

pub mod config;
mod gpt2;
pub mod hooks;
mod llama;
pub mod presets;
mod sliced;
mod sp;
mod stage;
mod tp;

pub use config::{Arch, ModelConfig};
pub use sp::{HeadGroups, SpRank};
pub use stage::PpStage;
pub use tp::TpRank;

use std::ops::Range;

use crate::backend::{Backend, Cpu, Ids, Span, SpanMut, Weights};
use crate::params::{Chunking, ParamTable};
use crate::{Error, Result};

/// A causal language model.
#[derive(Clone, Debug)]
pub struct Model {
    pub config: ModelConfig,
    pub table: ParamTable,
    /// The part of the model this rank holds (`TpRank::WHOLE`: all of it).
    pub tp: TpRank,
    /// The part of each sequence this rank runs (`SpRank::WHOLE`: all of it).
    pub sp: SpRank,
    /// The blocks this rank holds (`PpStage::whole`: all of them; see `models::stage`).
    pub stage: PpStage,
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Kind {
    Gpt2(gpt2::Gpt2),
    Llama(llama::Llama),
}

/// Activation buffers for one batch shape on backend `B`, reused every step: one micro-batch's
/// saved activations (several can be alive at once, each its own value).
pub struct Activations<B: Backend = Cpu> {
    batch: usize,
    seq: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The inputs and targets where the backend's kernels read them.
    dev_inputs: B::Tokens,
    dev_targets: B::Tokens,
    /// Sequences of the micro-batch loaded last (by `load`).
    loaded: usize,
    kind: ActsKind<B>,
}

impl<B: Backend> std::fmt::Debug for Activations<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activations").field("batch", &self.batch).field("seq", &self.seq).field("loaded", &self.loaded).finish()
    }
}

enum ActsKind<B: Backend> {
    Gpt2(gpt2::Acts<B>),
    Llama(llama::Acts<B>),
}

/// What a forward pass leaves for the head: the final hidden states, the head, and the buffers
/// it runs on (its logits scratch and the rows' losses).
type Hidden<'a, B> = (&'a <B as Backend>::Act, crate::nn::LmHead, &'a mut <B as Backend>::Act, &'a mut <B as Backend>::Losses);

/// A loaded micro-batch as the layers see it.
pub(crate) struct Batch<'a, B: Backend> {
    /// Sequences, and tokens per sequence.
    pub b: usize,
    pub seq: usize,
    pub inputs: Ids<'a, B>,
    pub targets: Ids<'a, B>,
}

impl<B: Backend> Batch<'_, B> {
    /// Rows of activations: one per token.
    pub fn rows(&self) -> usize {
        self.b * self.seq
    }
}

impl<B: Backend> Activations<B> {
    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Splits `windows` (`[b, seq+1]` tokens) into inputs and targets, on the host and the
    /// backend; returns `b`.
    fn load(&mut self, be: &B, windows: &[u32], vocab: usize) -> Result<usize> {
        self.loaded = split_windows(windows, self.seq, self.batch, vocab, &mut self.inputs, &mut self.targets)?;
        let n = self.loaded * self.seq;
        be.load_tokens(&mut self.dev_inputs, &self.inputs[..n])?;
        be.load_tokens(&mut self.dev_targets, &self.targets[..n])?;
        Ok(self.loaded)
    }

    /// The loaded micro-batch and the activations, borrowed apart.
    fn split(&mut self) -> (Batch<'_, B>, &mut ActsKind<B>) {
        let n = self.loaded * self.seq;
        let batch = Batch {
            b: self.loaded,
            seq: self.seq,
            inputs: Ids { host: &self.inputs[..n], dev: &self.dev_inputs, at: 0 },
            targets: Ids { host: &self.targets[..n], dev: &self.dev_targets, at: 0 },
        };
        (batch, &mut self.kind)
    }
}

impl Activations<Cpu> {
    /// Bytes held: the float buffers and the token ids.
    pub fn bytes(&self) -> u64 {
        let floats = match &self.kind {
            ActsKind::Gpt2(a) => a.elems(),
            ActsKind::Llama(a) => a.elems(),
        };
        4 * (floats + self.inputs.len() + self.targets.len()) as u64
    }
}

/// Runs `$body` with `$m` the architecture's model and `$a` its activations.
macro_rules! with_arch {
    ($kind:expr, $acts:expr, |$m:ident, $a:ident| $body:expr) => {
        match ($kind, $acts) {
            (Kind::Gpt2($m), ActsKind::Gpt2($a)) => $body,
            (Kind::Llama($m), ActsKind::Llama($a)) => $body,
            _ => unreachable!("activations belong to the model that made them"),
        }
    };
}

impl Model {
    pub fn new(config: ModelConfig) -> Result<Model> {
        Self::with_chunks(config, Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS))
    }

    /// As `new`, with the parameter table cut into chunks as `chunking` says: the unit of DDP
    /// buckets and ZeRO shards. A model whose embedding or head is split across chunks runs it a
    /// vocabulary slice at a time.
    pub fn with_chunks(config: ModelConfig, chunking: Chunking) -> Result<Model> {
        Self::with_layout(config, chunking, TpRank::WHOLE)
    }

    /// Rank `tp.rank`'s part of the model cut across `tp.size` tensor-parallel ranks (see
    /// `models::tp`); an error naming `parallel.tp` if the model does not divide so.
    pub fn with_layout(config: ModelConfig, chunking: Chunking, tp: TpRank) -> Result<Model> {
        Self::with_parallel(config, chunking, tp, SpRank::WHOLE)
    }

    /// As `with_layout`, on rank `sp.rank` of a sequence-parallel group of `sp.size` (each rank
    /// runs `1/sp.size` of every sequence: see `models::sp`).
    pub fn with_parallel(config: ModelConfig, chunking: Chunking, tp: TpRank, sp: SpRank) -> Result<Model> {
        let stage = PpStage::whole(config.layers);
        Self::with_stage(config, chunking, tp, sp, stage)
    }

    /// As `with_parallel`, holding only `stage`'s blocks (a pipeline rank: see `models::stage`).
    pub fn with_stage(config: ModelConfig, chunking: Chunking, tp: TpRank, sp: SpRank, stage: PpStage) -> Result<Model> {
        if stage.layers != config.layers {
            return Err(Error::Unsupported {
                field: "parallel.pp_layers".into(),
                message: format!("a stage of a model of {} blocks for one of {}", stage.layers, config.layers),
            });
        }
        if sp.size == 0 || sp.rank >= sp.size {
            return Err(Error::Unsupported {
                field: "parallel.sp".into(),
                message: format!("rank {} of {} sequence-parallel ranks", sp.rank, sp.size),
            });
        }
        if tp.size == 0 || tp.rank >= tp.size {
            return Err(Error::Unsupported {
                field: "parallel.tp".into(),
                message: format!("rank {} of {} tensor-parallel ranks", tp.rank, tp.size),
            });
        }
        if config.vocab < tp.size || config.intermediate < tp.size {
            return Err(Error::Unsupported {
                field: "parallel.tp".into(),
                message: format!(
                    "a vocabulary of {} and an MLP width of {} cannot be cut across {} ranks",
                    config.vocab, config.intermediate, tp.size
                ),
            });
        }
        let (table, kind) = match config.arch {
            Arch::Gpt2 => {
                let (t, m) = gpt2::Gpt2::new(&config, chunking, tp, sp, &stage)?;
                (t, Kind::Gpt2(m))
            }
            Arch::Llama => {
                let (t, m) = llama::Llama::new(&config, chunking, tp, sp, &stage)?;
                (t, Kind::Llama(m))
            }
        };
        Ok(Model { config, table, tp, sp, stage, kind })
    }

    /// The parameter table of the whole model (this one's, if it is whole): the layout
    /// checkpoints and exports hold the parameters in.
    pub fn whole_table(&self) -> Result<ParamTable> {
        if self.tp.is_whole() && self.stage.is_whole() {
            return Ok(self.table.clone());
        }
        Ok(Self::with_chunks(self.config.clone(), Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS))?.table)
    }

    /// The tables of every rank of this model's tensor-parallel group, in rank order.
    pub fn group_tables(&self) -> Result<Vec<ParamTable>> {
        (0..self.tp.size)
            .map(|rank| {
                Ok(Self::with_layout(self.config.clone(), Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS), TpRank { rank, ..self.tp })?
                    .table)
            })
            .collect()
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

    /// Buffers on the CPU for batches of up to `batch` sequences of `seq` tokens.
    pub fn activations(&self, batch: usize, seq: usize) -> Result<Activations> {
        self.activations_on(&Cpu, batch, seq)
    }

    /// Buffers on backend `be` for batches of up to `batch` sequences of `seq` tokens.
    pub fn activations_on<B: Backend>(&self, be: &B, batch: usize, seq: usize) -> Result<Activations<B>> {
        if seq == 0 || batch == 0 {
            return Err(Error::Unsupported { field: "data.seq_len".into(), message: "batch and sequence length must be positive".into() });
        }
        if seq > self.config.max_positions {
            return Err(Error::Unsupported {
                field: "data.seq_len".into(),
                message: format!("{seq} exceeds the model's {} positions", self.config.max_positions),
            });
        }
        if !seq.is_multiple_of(self.tp.seq_parts()) {
            return Err(Error::Unsupported {
                field: "data.seq_len".into(),
                message: format!("split_gather cuts each sequence over {} tp ranks: {seq} tokens do not split evenly", self.tp.size),
            });
        }
        let kind = match &self.kind {
            Kind::Gpt2(m) => ActsKind::Gpt2(m.acts(be, batch, seq)?),
            Kind::Llama(m) => ActsKind::Llama(m.acts(be, batch, seq)?),
        };
        let n = batch * seq;
        Ok(Activations {
            batch,
            seq,
            inputs: vec![0; n],
            targets: vec![0; n],
            dev_inputs: be.alloc_tokens(n)?,
            dev_targets: be.alloc_tokens(n)?,
            loaded: 0,
            kind,
        })
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
        self.forward_backward_on(&Cpu, &mut view, grads, acts, windows, grad_scale)
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
        self.forward_backward_on(&Cpu, &mut hooks::Hooked { params, hooks }, grads, acts, windows, grad_scale)
    }

    /// Forward and backward on backend `be`, the parameters read through `pa` (its hooks told of
    /// every use), the gradients (f32, the table's layout) accumulated into `grads`.
    pub fn forward_backward_on<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn hooks::Params<B>,
        grads: &mut B::F32,
        acts: &mut Activations<B>,
        windows: &[u32],
        grad_scale: f32,
    ) -> Result<f64> {
        self.check_whole_stage()?;
        acts.load(be, windows, self.config.vocab)?;
        let (x, kind) = acts.split();
        let all = 0..self.config.layers;
        with_arch!(&self.kind, kind, |m, a| {
            m.embed(be, pa, a, &x)?;
            m.blocks_forward(be, pa, a, &x, all.clone())?;
            m.final_norm(be, pa, a, &x)?;
            let loss = m.head_backward(be, pa, grads, a, &x, grad_scale)?;
            m.blocks_backward(be, pa, grads, a, &x, all)?;
            m.embed_backward(be, pa, grads, a, &x)?;
            Ok(loss)
        })
    }

    /// Forward only over the loaded micro-batch: what the head needs.
    fn forward_to_head<'a, B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn hooks::Params<B>,
        kind: &'a mut ActsKind<B>,
        x: &Batch<'_, B>,
    ) -> Result<Hidden<'a, B>> {
        let all = 0..self.config.layers;
        with_arch!(&self.kind, kind, |m, a| {
            m.embed(be, pa, a, x)?;
            m.blocks_forward(be, pa, a, x, all)?;
            m.final_norm(be, pa, a, x)?;
            Ok(m.head_input(a))
        })
    }

    /// Pipeline stages and activation checkpointing run a micro-batch through the model a part at
    /// a time: `embed`, `forward_blocks` over consecutive block ranges, `head_backward`,
    /// `backward_blocks` over the same ranges in reverse, `embed_backward`. Together they compute
    /// exactly what `forward_backward` does. A micro-batch's saved activations are its own
    /// `Activations`, so several micro-batches can be between forward and backward at once.
    pub fn embed(&self, params: &[f32], acts: &mut Activations, windows: &[u32]) -> Result<()> {
        self.embed_on(&Cpu, &mut { params }, acts, windows)
    }

    /// `embed` on backend `be`.
    pub fn embed_on<B: Backend>(&self, be: &B, pa: &mut dyn hooks::Params<B>, acts: &mut Activations<B>, windows: &[u32]) -> Result<()> {
        acts.load(be, windows, self.config.vocab)?;
        let (x, kind) = acts.split();
        with_arch!(&self.kind, kind, |m, a| m.embed(be, pa, a, &x))
    }

    /// Blocks `range` forward for the micro-batch `embed` loaded into `acts` (see `embed`).
    pub fn forward_blocks(&self, params: &[f32], acts: &mut Activations, range: Range<usize>) -> Result<()> {
        self.forward_blocks_on(&Cpu, &mut { params }, acts, range)
    }

    pub fn forward_blocks_on<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn hooks::Params<B>,
        acts: &mut Activations<B>,
        range: Range<usize>,
    ) -> Result<()> {
        self.check_loaded(acts, &range)?;
        let (x, kind) = acts.split();
        with_arch!(&self.kind, kind, |m, a| m.blocks_forward(be, pa, a, &x, range))
    }

    /// The final norm and the head, forward and backward, after every block ran forward: returns
    /// the summed loss and accumulates `grad_scale ×` the head's gradients (see `embed`).
    pub fn head_backward(&self, params: &[f32], grads: &mut [f32], acts: &mut Activations, grad_scale: f32) -> Result<f64> {
        self.head_backward_on(&Cpu, &mut { params }, grads, acts, grad_scale)
    }

    pub fn head_backward_on<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn hooks::Params<B>,
        grads: &mut B::F32,
        acts: &mut Activations<B>,
        grad_scale: f32,
    ) -> Result<f64> {
        self.check_loaded(acts, &(0..0))?;
        let (x, kind) = acts.split();
        with_arch!(&self.kind, kind, |m, a| {
            m.final_norm(be, pa, a, &x)?;
            m.head_backward(be, pa, grads, a, &x, grad_scale)
        })
    }

    /// Blocks `range` backward (see `embed`).
    pub fn backward_blocks(&self, params: &[f32], grads: &mut [f32], acts: &mut Activations, range: Range<usize>) -> Result<()> {
        self.backward_blocks_on(&Cpu, &mut { params }, grads, acts, range)
    }

    pub fn backward_blocks_on<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn hooks::Params<B>,
        grads: &mut B::F32,
        acts: &mut Activations<B>,
        range: Range<usize>,
    ) -> Result<()> {
        self.check_loaded(acts, &range)?;
        let (x, kind) = acts.split();
        with_arch!(&self.kind, kind, |m, a| m.blocks_backward(be, pa, grads, a, &x, range))
    }

    /// The token embedding's gradient, after every block ran backward (see `embed`).
    pub fn embed_backward(&self, params: &[f32], grads: &mut [f32], acts: &mut Activations) -> Result<()> {
        self.embed_backward_on(&Cpu, &mut { params }, grads, acts)
    }

    pub fn embed_backward_on<B: Backend>(
        &self,
        be: &B,
        pa: &mut dyn hooks::Params<B>,
        grads: &mut B::F32,
        acts: &mut Activations<B>,
    ) -> Result<()> {
        self.check_loaded(acts, &(0..0))?;
        let (x, kind) = acts.split();
        with_arch!(&self.kind, kind, |m, a| m.embed_backward(be, pa, grads, a, &x))
    }

    /// A whole pass needs every block: a pipeline stage runs its part through the runner.
    fn check_whole_stage(&self) -> Result<()> {
        if self.stage.is_whole() {
            return Ok(());
        }
        Err(Error::Unsupported {
            field: "parallel.pp".into(),
            message: format!("a pass over the whole model on a stage holding blocks {:?}", self.stage.chunks),
        })
    }

    /// Loads a micro-batch into `acts` without embedding it: a pipeline stage after the first
    /// receives its input instead, and needs the batch's shape (and the last, its targets).
    pub fn load(&self, acts: &mut Activations, windows: &[u32]) -> Result<()> {
        acts.load(&Cpu, windows, self.config.vocab).map(|_| ())
    }

    /// The residual stream before local block `l` (`l` = the blocks held: after the last) of
    /// the loaded micro-batch: what a stage sends on, or receives into.
    pub fn residual<'a>(&self, acts: &'a mut Activations, l: usize) -> Result<&'a mut [f32]> {
        self.check_loaded(acts, &(l..l))?;
        let (rows, c) = (acts.loaded * acts.seq / self.tp.seq_parts(), self.config.hidden);
        let stride = acts.batch * acts.seq / self.tp.seq_parts() * c;
        let res = match &mut acts.kind {
            ActsKind::Gpt2(a) => a.residual_mut(),
            ActsKind::Llama(a) => a.residual_mut(),
        };
        Ok(&mut res[l * stride..l * stride + rows * c])
    }

    /// The loss's gradient at the residual stream where the backward pass stands: after a
    /// stage's `head_backward` or `backward_blocks`, what it sends back; before them (on a
    /// stage that does not hold the head), where it receives.
    pub fn residual_grad<'a>(&self, acts: &'a mut Activations) -> Result<&'a mut [f32]> {
        self.check_loaded(acts, &(0..0))?;
        let n = acts.loaded * acts.seq / self.tp.seq_parts() * self.config.hidden;
        let d = match &mut acts.kind {
            ActsKind::Gpt2(a) => a.residual_grad_mut(),
            ActsKind::Llama(a) => a.residual_grad_mut(),
        };
        Ok(&mut d[..n])
    }

    /// Forward-only passes (`loss`, `logits`) run a whole model over whole sequences: a rank's
    /// part of one would need its group, which they are not given.
    fn check_whole(&self, what: &str) -> Result<()> {
        self.check_whole_stage()?;
        let field = if !self.tp.is_whole() {
            "parallel.tp"
        } else if !self.sp.is_whole() {
            "parallel.sp"
        } else {
            return Ok(());
        };
        Err(Error::Unsupported {
            field: field.into(),
            message: format!("{what} of a model cut across ranks is not built: use the whole model"),
        })
    }

    /// Checks that `acts` holds a micro-batch and `range` names blocks.
    fn check_loaded<B: Backend>(&self, acts: &Activations<B>, range: &Range<usize>) -> Result<()> {
        if acts.loaded == 0 {
            return Err(Error::Unsupported {
                field: "blocks".into(),
                message: "no micro-batch was embedded into these activations".into(),
            });
        }
        if range.start > range.end || range.end > self.stage.blocks() {
            return Err(Error::Unsupported {
                field: "blocks".into(),
                message: format!("blocks {range:?} of a model (or stage) of {} blocks", self.stage.blocks()),
            });
        }
        Ok(())
    }

    /// Summed loss (nats) over `windows`, forward only.
    pub fn loss(&self, params: &[f32], acts: &mut Activations, windows: &[u32]) -> Result<f64> {
        self.loss_on(&Cpu, Weights { w: params, master: params }, acts, windows)
    }

    /// `loss` on backend `be`.
    pub fn loss_on<B: Backend>(&self, be: &B, p: Weights<'_, B>, acts: &mut Activations<B>, windows: &[u32]) -> Result<f64> {
        self.check_whole("the loss alone")?;
        acts.load(be, windows, self.config.vocab)?;
        let (x, kind) = acts.split();
        let rows = x.rows();
        let mut pa = p;
        let (h, head, scratch, losses) = self.forward_to_head(be, &mut pa, kind, &x)?;
        head.loss(be, p, h, x.targets, scratch, losses, None)?;
        be.loss_sum(losses, rows)
    }

    /// Logits `[b, seq, vocab]` for `windows` (`[b, seq+1]` tokens; the last token of each window
    /// is not read).
    pub fn logits(&self, params: &[f32], acts: &mut Activations, windows: &[u32]) -> Result<Vec<f32>> {
        self.check_whole("logits")?;
        acts.load(&Cpu, windows, self.config.vocab)?;
        let (x, kind) = acts.split();
        let rows = x.rows();
        let mut pa = params;
        let (h, head, _, _) = self.forward_to_head(&Cpu, &mut pa, kind, &x)?;
        let mut out = vec![0.0; rows * self.config.vocab];
        head.logits(&Cpu, Weights { w: params, master: params }, h, rows, &mut out)?;
        Ok(out)
    }

    /// Model FLOPs per trained token at sequence length `seq`.
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        self.config.flops_per_token(self.table.len(), seq)
    }
}

/// Splits `windows` (`[b, seq+1]` tokens, `b` from 1 to `max_batch`) into `inputs` and `targets`
/// (`[b, seq]` each, the targets shifted by one); returns `b`. Refuses a ragged batch and tokens
/// outside the vocabulary, naming them.
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
fn at<X: ?Sized>(buf: &X, l: usize, stride: usize, len: usize) -> Span<'_, X> {
    Span::at(buf, l * stride, len)
}

#[inline]
fn at_mut<X: ?Sized>(buf: &mut X, l: usize, stride: usize, len: usize) -> SpanMut<'_, X> {
    SpanMut::at(buf, l * stride, len)
}

#[cfg(test)]
mod tests;
