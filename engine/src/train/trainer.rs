use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::backend::Cpu;
use crate::checkpoint::{has_weights, load_weights, LossScaleState};
use crate::comm::{AsyncComm, Axis, Comm};
use crate::config::{Devices, GpuComm, ModelInit, Precision, SpMode, TpMode, TrainConfig};
use crate::data::{check_vocab, load_tokens, Sampler, Tokens};
use crate::models::{Activations, Model, ModelConfig, PpStage, SpRank, TpRank};
use crate::optim::{AdamW, LrSchedule};
use crate::parallel::{DataParallel, SequenceParallel, TensorParallel};
use crate::params::{Chunking, ParamBuffers};
use crate::pipeline::{plan_stages, PipelineTraining};
use crate::{Error, Result};

use super::checkpointing::{PendingCheckpoint, Snapshot};
use super::gpu::OnGpu;
use super::nonfinite::{NonFiniteSteps, StepOutcome};
use super::step::{self, Alone, Layout, State};
use super::update::{self, Summed, Update};

/// What one optimizer step reports (one line of `metrics.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepReport {
    /// 1-based optimizer step.
    pub step: u64,
    /// Mean next-token cross-entropy over the step's global batch.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The update was skipped: the gradients were not finite (NaN or infinite; the norm is then
    /// too), or fp16's overflowed at its loss scale. Parameters and optimizer state are as before
    /// the step, which still counts: it used its data, learning rate and AdamW step number.
    pub skipped: bool,
    pub tokens_per_s: f64,
    /// Bytes of parameters, gradients and optimizer state on this rank.
    pub mem_bytes: u64,
    pub step_ms: f64,
    /// Time this rank spent communicating during the step.
    pub comm_ms: f64,
    /// Of which the gradient collectives, and the part of those training waited for after
    /// backward (the rest was hidden behind backward).
    pub grad_comm_ms: f64,
    pub grad_comm_waited_ms: f64,
    /// Tokens the step trained on, across the job (the global batch).
    pub tokens: u64,
    /// Model FLOP utilisation: the model's FLOPs per second (6 per parameter per token plus
    /// attention, forward and backward) over the peak of the job's devices, when their peak is
    /// known (the GPUs Gantry has a data sheet for; not CPUs).
    pub mfu: Option<f64>,
    /// Under pipeline parallelism, each stage's share of the step spent idle (waiting for its
    /// neighbours: the bubble), in stage order; empty otherwise.
    pub stage_idle: Vec<f64>,
}

/// Model FLOPs per second over the devices' peak, at `tokens_per_s` with `flops_per_token`.
fn mfu(flops_per_token: f64, tokens_per_s: f64, peak_flops: Option<f64>) -> Option<f64> {
    peak_flops.filter(|p| *p > 0.0).map(|p| flops_per_token * tokens_per_s / p)
}

/// Builds the model of `dir` and its initial parameters as `init` asks.
pub fn load_model(dir: &Path, init: ModelInit, seed: u64) -> Result<(Model, Vec<f32>)> {
    load_model_part(dir, init, seed, TpRank::WHOLE)
}

/// As `load_model`, rank `tp.rank`'s part of the model cut across `tp.size` tensor-parallel
/// ranks: weights are read (or drawn) a tensor at a time and sliced, so no rank ever holds the
/// whole model, and the part equals those rows of the whole one.
pub fn load_model_part(dir: &Path, init: ModelInit, seed: u64, tp: TpRank) -> Result<(Model, Vec<f32>)> {
    let config = ModelConfig::from_dir(dir)?;
    let stage = PpStage::whole(config.layers);
    load_model_stage(config, dir, init, seed, tp, stage)
}

/// As `load_model_part`, the blocks of pipeline stage `stage` only (with the embedding on the
/// first stage, the head on the last): the stage reads (or draws) exactly the whole model's
/// values of what it holds.
fn load_model_stage(config: ModelConfig, dir: &Path, init: ModelInit, seed: u64, tp: TpRank, stage: PpStage) -> Result<(Model, Vec<f32>)> {
    let model = Model::with_stage(config, Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS), tp, SpRank::WHOLE, stage)?;
    let mut params = vec![0.0f32; model.table.len()];
    let pretrained = match init {
        ModelInit::Random => false,
        ModelInit::Pretrained => {
            if !has_weights(dir) {
                return Err(Error::Weights {
                    path: dir.into(),
                    message: "model.init = \"pretrained\" but the directory has no safetensors weights".into(),
                });
            }
            true
        }
        ModelInit::Auto => has_weights(dir),
    };
    if pretrained {
        load_weights(dir, &model.config, &model.table, &mut params)?;
    } else {
        model.table.init(&mut params, seed);
    }
    Ok((model, params))
}

/// Opens GPU `ordinal` for a job (builds with CUDA).
#[cfg(feature = "cuda")]
fn open_gpu(ordinal: usize) -> Result<OnGpu> {
    OnGpu::open(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn open_gpu(_ordinal: usize) -> Result<OnGpu> {
    unreachable!("check_supported refuses CUDA jobs in builds without CUDA")
}

/// The names of the files in `dir`.
/// Checks that the trainer can run `config`'s layout (devices, precision, parallelism) before
/// anything starts: `gantry train` calls it before it starts ranks, the daemon when a job is
/// submitted, and every rank again. The error names the job spec's field to change.
pub fn check_layout(config: &TrainConfig) -> Result<()> {
    crate::device::check_supported(&config.devices)?;
    let unsupported = |field: &str, message: String| Err(Error::Unsupported { field: field.into(), message });
    let on_gpu = config.on_gpu();
    if !on_gpu && config.precision != Precision::Fp32 {
        return unsupported(
            "train.precision",
            format!("{} needs a GPU (resources.devices = \"cuda:N\"); CPU training runs in fp32", config.precision.name()),
        );
    }
    let p = &config.plan;
    if p.pp == 0 {
        return unsupported("parallel.pp", "a job needs at least one pipeline stage".into());
    }
    if p.pp > 1 {
        let not_yet = |what: &str| format!("pipeline stages with {what} are not built yet");
        if on_gpu {
            return unsupported("parallel.pp", format!("{}: use CPU ranks, or parallel.pp = 1", not_yet("GPU ranks")));
        }
        if p.tp > 1 {
            return unsupported("parallel.tp", format!("{}: use parallel.tp = 1 with parallel.pp > 1", not_yet("tensor parallelism")));
        }
        if p.sp > 1 || p.sp_mode != SpMode::None {
            return unsupported("parallel.sp", format!("{}: use parallel.sp = 1 with parallel.pp > 1", not_yet("sequence parallelism")));
        }
        if p.zero > 1 {
            return unsupported(
                "parallel.zero",
                format!("ZeRO-{} shards gradients and parameters as backward goes, which pipeline stages do not allow: use parallel.zero = 0 or 1 with parallel.pp > 1", p.zero),
            );
        }
    }
    match p.sp_mode {
        SpMode::None if p.sp == 1 => {}
        SpMode::AllToAll if p.sp > 1 => {
            if on_gpu {
                return unsupported("parallel.sp_mode", "sequence parallelism on GPUs is not built yet: use CPU ranks".into());
            }
            if !config.data.seq_len.is_multiple_of(p.sp) {
                return unsupported(
                    "data.seq_len",
                    format!("{} tokens do not split into {} equal parts (parallel.sp)", config.data.seq_len, p.sp),
                );
            }
        }
        SpMode::SplitGather if p.tp > 1 && p.sp == 1 => {
            if on_gpu {
                return unsupported("parallel.sp_mode", "sequence parallelism on GPUs is not built yet: use CPU ranks".into());
            }
            if !config.data.seq_len.is_multiple_of(p.tp) {
                return unsupported(
                    "data.seq_len",
                    format!("split_gather cuts each sequence over the tp group: {} tokens do not split into {} equal parts (parallel.tp)", config.data.seq_len, p.tp),
                );
            }
        }
        SpMode::SplitGather => {
            return unsupported(
                "parallel.sp_mode",
                "\"split_gather\" splits the sequence inside the tp group: it needs parallel.tp > 1 and parallel.sp = 1".into(),
            )
        }
        SpMode::RingAttn if p.sp > 1 => {
            if on_gpu {
                return unsupported("parallel.sp_mode", "sequence parallelism on GPUs is not built yet: use CPU ranks".into());
            }
            if !config.data.seq_len.is_multiple_of(2 * p.sp) {
                return unsupported(
                    "data.seq_len",
                    format!(
                        "ring_attn cuts each sequence into 2 × parallel.sp = {} equal chunks: {} tokens do not divide",
                        2 * p.sp,
                        config.data.seq_len
                    ),
                );
            }
        }
        mode => {
            return unsupported(
                "parallel.sp_mode",
                format!(
                    "sequence parallelism \"{}\" needs its axis: \"all_to_all\" and \"ring_attn\" with parallel.sp > 1, \"split_gather\" with parallel.tp > 1, else \"none\"",
                    mode.name()
                ),
            )
        }
    }
    if p.tp_mode == TpMode::TwoD {
        return unsupported("parallel.tp_mode", "the 2d tensor-parallel layout is not built yet: use tp_mode = \"1d\"".into());
    }
    if p.tp > 1 && on_gpu {
        return unsupported("parallel.tp", "tensor parallelism on GPUs is not built yet: use CPU ranks, or parallel.tp = 1".into());
    }
    if p.zero > 3 {
        return unsupported("parallel.zero", format!("ZeRO stage {} does not exist: use 0, 1, 2 or 3", p.zero));
    }
    if on_gpu && p.zero >= 2 {
        return unsupported(
            "parallel.zero",
            format!(
                "ZeRO-{} on GPUs is not built yet (it needs the GPU model to release gradients and gather parameters as it goes); use parallel.zero = 0 or 1, or CPU ranks",
                p.zero
            ),
        );
    }
    if p.dp * p.sp == 1 && p.zero != 0 {
        return unsupported(
            "parallel.zero",
            "ZeRO shards across data-parallel ranks: it needs parallel.dp > 1 (or parallel.sp > 1)".into(),
        );
    }
    Ok(())
}

/// The tp group, inside the dp group or on its own (borrowed apart from the other fields).
pub(super) fn tp_group<'a>(dp: &'a mut Option<DataParallel>, tp: &'a mut Option<TensorParallel>) -> Option<&'a mut TensorParallel> {
    match dp {
        Some(dp) => dp.tensor_parallel(),
        None => tp.as_mut(),
    }
}

/// Checks that `model` can be cut as `config`'s layout asks (its heads, key/value heads,
/// vocabulary and MLP over the tp ranks), naming `parallel.tp` if not: `gantry train` and the
/// daemon call it before starting ranks.
pub fn check_model_layout(config: &TrainConfig, model: &ModelConfig) -> Result<()> {
    if config.plan.pp > 1 {
        // The schedule for the step's micro-batches, and the cut of the blocks into stages.
        plan_stages(model, &config.plan, config.data.seq_len, config.accumulation_steps())?;
    }
    let (tp, sp) = (config.plan.tp, config.plan.sp);
    if tp > 1 || sp > 1 {
        // Every rank's part is checked alike: rank 0's stands for them all.
        let whole = Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS);
        let ring = config.plan.sp_mode == SpMode::RingAttn;
        Model::with_parallel(model.clone(), whole, TpRank::new(0, tp), SpRank { rank: 0, size: sp, ring })?;
    }
    Ok(())
}

/// One rank's training state and its optimizer step. Checkpointing (start, poll, commit,
/// resume, the final model) is in `checkpointing.rs`; the loop over steps in `run.rs`.
#[derive(Debug)]
pub struct Trainer {
    pub config: TrainConfig,
    pub model: Model,
    pub buffers: ParamBuffers,
    pub(super) acts: Activations,
    pub(super) tokens: Tokens,
    pub(super) sampler: Sampler,
    pub(super) schedule: LrSchedule,
    pub(super) optim: AdamW,
    pub(super) tokenizer: Option<PathBuf>,
    /// This rank's position on the mesh's dp axis and its size: which slice of each global batch
    /// it trains on.
    data_rank: (usize, usize),
    /// This step's micro-batches (see `take_micro_batches`).
    batches: Vec<Vec<u32>>,
    /// The dp group and ZeRO, when the job has more than one dp rank (with the tp group inside
    /// when the model is cut across one too).
    pub(super) dp: Option<DataParallel>,
    /// The tp group of a job with tensor parallelism and no dp group.
    pub(super) tp: Option<TensorParallel>,
    /// The pp group of a job cut into pipeline stages.
    pub(super) pp: Option<PipelineTraining>,
    /// Rank 0's checkpoint being written in the background, if any, and the host copy for the
    /// next one.
    pub(super) pending: Option<PendingCheckpoint>,
    pub(super) snapshot: Option<Snapshot>,
    /// The GPU this rank trains on (`resources.devices = "cuda:N"`).
    pub(super) gpu: Option<OnGpu>,
    /// fp16 on a GPU: the loss scale of the checkpoint this run resumed from.
    pub(super) resumed_loss_scale: Option<LossScaleState>,
    /// Steps skipped in a row for non-finite gradients (too many stop the run).
    pub(super) nonfinite: NonFiniteSteps,
    /// Optimizer steps taken so far.
    pub step: u64,
}

impl Trainer {
    /// Loads the model, its weights and the data of `config` for a run on one rank.
    pub fn new(config: TrainConfig) -> Result<Trainer> {
        Self::with_comm(config, None)
    }

    /// As `new`, for one rank of a run on `comm.world()` ranks (`plan.dp` of them).
    pub fn with_comm(config: TrainConfig, comm: Option<Comm>) -> Result<Trainer> {
        check_layout(&config)?;
        let unsupported = |field: &str, message: String| Err(Error::Unsupported { field: field.into(), message });
        let world = comm.as_ref().map_or(1, Comm::world);
        let rank = comm.as_ref().map_or(0, Comm::rank);
        // `gantry train` hands every rank the job's GPU list (rank r takes the r-th); a daemon
        // worker's spec names only its own GPU.
        let gpu_ordinal = match &config.devices {
            Devices::Cuda(ids) if ids.len() == world => ids.get(rank).map(|&i| i as usize),
            Devices::Cuda(ids) if ids.len() == 1 => Some(ids[0] as usize),
            Devices::Cuda(ids) => {
                return unsupported(
                    "resources.devices",
                    format!("{} GPUs listed for a job of {world} ranks: list one GPU per rank", ids.len()),
                )
            }
            Devices::Cpu(_) => None,
        };
        let p = config.plan.clone();
        if p.world() != Some(world) {
            return unsupported(
                "parallel",
                format!(
                    "parallel.dp × parallel.pp × parallel.sp × parallel.tp = {} × {} × {} × {} but the job runs on {world} ranks",
                    p.dp, p.pp, p.sp, p.tp
                ),
            );
        }
        let mesh = p.mesh(world)?;
        let coords = mesh.coords(rank);
        let split_seq = p.sp_mode == SpMode::SplitGather;
        let (tp_rank, sp_rank) = (
            TpRank { rank: coords[3], size: p.tp, split_seq },
            SpRank { rank: coords[2], size: p.sp, ring: p.sp_mode == SpMode::RingAttn },
        );
        let mut gpu = match gpu_ordinal {
            Some(ordinal) => Some(open_gpu(ordinal)?),
            None => None,
        };
        let mut comm = comm;
        if let (Some(g), Some(c), GpuComm::Nccl) = (&mut gpu, &mut comm, p.gpu_comm) {
            let timeout = c.timeout();
            g.connect_nccl(c, timeout)?;
        }
        let model_dir = config.model.path.clone();
        let model_config = ModelConfig::from_dir(&model_dir)?;
        // The pipeline's schedule and every stage's blocks (one stage holding every block
        // without pipeline parallelism).
        let pipeline =
            if p.pp > 1 { Some(plan_stages(&model_config, &p, config.data.seq_len, config.accumulation_steps())?) } else { None };
        let stage = pipeline.as_ref().map_or_else(|| PpStage::whole(model_config.layers), |(_, stages)| stages[coords[1]].clone());
        // This rank's part of the model (all of it without tensor or pipeline parallelism).
        let (mut model, params) = load_model_stage(model_config, &model_dir, config.model.init, config.seed, tp_rank, stage.clone())?;
        let comm = comm.map(|c| AsyncComm::new(c).map(std::sync::Arc::new)).transpose()?;
        // The ranks holding the same parameters: dp × sp (sequence-parallel ranks train on parts
        // of the same sequences, and their gradients are summed as data parallelism's are).
        let replicas = mesh.group_over(&[Axis::Dp, Axis::Sp], rank);
        // Chunks are the unit of communication and sharding (see the function); they do not move
        // any parameter.
        let chunking = if replicas.size() > 1 {
            crate::params::data_parallel_chunking(model.table.len(), p.zero)
        } else {
            Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS)
        };
        model = Model::with_stage(model.config.clone(), chunking, tp_rank, sp_rank, stage)?;
        let pp = match (&comm, pipeline) {
            (Some(c), Some((schedule, stages))) => {
                Some(PipelineTraining::new(c.clone(), mesh.group(Axis::Pp, rank), schedule, stages, &model)?)
            }
            _ => None,
        };
        let mut tp = match &comm {
            Some(c) if p.tp > 1 => Some(TensorParallel::new(c.clone(), &mesh, &model)?),
            _ => None,
        };
        let sp = match &comm {
            Some(c) if p.sp > 1 => Some(SequenceParallel::new(c.clone(), mesh.group(Axis::Sp, rank))),
            _ => None,
        };
        let dp = match &comm {
            Some(c) if replicas.size() > 1 => Some(DataParallel::new(c.clone(), replicas, p.zero, &model.table, tp.take(), sp)?),
            _ => None,
        };
        let data_path = config.data.train.clone();
        let tokenizer = match &config.data.tokenizer {
            Some(path) => {
                // Checked now even for token data (which does not need it): every checkpoint and
                // the final model copy it, and a missing one would fail them all, late.
                crate::data::load_tokenizer(path)?;
                Some(path.clone())
            }
            None => Some(model_dir.join("tokenizer.json")).filter(|p| p.is_file()),
        };
        let tokens = load_tokens(&data_path, tokenizer.as_deref())?;
        check_vocab(&tokens, model.config.vocab, &data_path)?;
        let seq = config.data.seq_len;
        let sampler = Sampler::new(tokens.len(), seq, config.seed).ok_or_else(|| Error::Data {
            path: data_path.clone(),
            message: format!("{} tokens hold no window of data.seq_len + 1 = {}", tokens.len(), seq + 1),
        })?;
        // A sequence-parallel rank runs its part of each sequence.
        let (local_batch, local_seq) = sp_rank.local_batch(config.optim.micro_batch, seq);
        let acts = model.activations(local_batch, local_seq)?;
        let pieces = dp.as_ref().map_or_else(|| std::iter::once(0..model.table.len()).collect(), |d| d.pieces());
        let mut buffers = ParamBuffers::sharded(&model.table, pieces);
        buffers.params = params;
        let mut dp = dp;
        if let Some(d) = &mut dp {
            d.setup(&mut buffers.params);
        }
        // Rank 0 of a job that saves checkpoints keeps a host copy for the asynchronous writer
        // (ZeRO, and tensor parallelism, gather into fresh buffers instead).
        let lead = dp.as_ref().is_none_or(|d| d.rank() == 0 && d.zero() == 0) && tp_rank.is_whole() && pp.is_none();
        // (A GPU job copies into page-locked memory instead.)
        let snapshot = (config.checkpoint_every > 0 && lead && gpu.is_none()).then(|| Snapshot::new(buffers.params.len(), buffers.m.len()));
        let t = &config.optim;
        let schedule = LrSchedule { lr: t.lr, min_lr: t.min_lr, warmup_steps: t.warmup_steps, total_steps: t.steps, kind: t.schedule };
        let optim = AdamW { beta1: t.beta1 as f32, beta2: t.beta2 as f32, eps: t.eps as f32, weight_decay: t.weight_decay as f32 };
        Ok(Trainer {
            config,
            model,
            buffers,
            acts,
            tokens,
            sampler,
            schedule,
            optim,
            tokenizer,
            batches: Vec::new(),
            data_rank: (coords[0], p.dp),
            dp,
            tp,
            pp,
            pending: None,
            snapshot,
            gpu,
            resumed_loss_scale: None,
            nonfinite: NonFiniteSteps::default(),
            step: 0,
        })
    }

    pub fn tokens_in_data(&self) -> usize {
        self.tokens.len()
    }

    /// The dense peak FLOP/s of the job's devices, when known: a GPU's from its data sheet, times
    /// the ranks (each has a GPU of the same kind). A CPU's is not known reliably (its clock and
    /// vector units vary with load and model), so CPU runs report no MFU.
    pub fn peak_flops(&self) -> Option<f64> {
        let world = self.dp.as_ref().map_or(1, DataParallel::size) as f64;
        self.gpu.as_ref().and_then(|g| g.peak_flops(self.config.precision)).map(|p| p * world)
    }

    /// This rank's position in the dp group (0 on one rank).
    pub fn dp_rank(&self) -> usize {
        self.dp.as_ref().map_or(0, DataParallel::rank)
    }

    /// The rank's tp group, when the model is cut across one.
    pub fn tensor_parallel(&mut self) -> Option<&mut TensorParallel> {
        tp_group(&mut self.dp, &mut self.tp)
    }

    /// Whether this rank writes the run's files (metrics, checkpoints, the final model): rank 0
    /// of the dp group and of the tp group.
    pub fn is_lead(&self) -> bool {
        self.dp_rank() == 0 && self.model.tp.lead() && self.pp_rank() == 0
    }

    /// This rank's position in the pp group (0 without pipeline parallelism).
    pub fn pp_rank(&self) -> usize {
        self.pp.as_ref().map_or(0, PipelineTraining::rank)
    }

    /// Whether this rank holds only a part of the model (tensor or pipeline parallelism): its
    /// checkpoints and final model are put together with the other parts'.
    pub fn holds_part(&self) -> bool {
        !self.model.tp.is_whole() || self.pp.is_some()
    }

    /// Puts this rank's micro-batches of the current step into `self.batches` (their buffers
    /// reused from step to step) and hands them out: the rank takes its slice of the global
    /// batch, the same windows whatever the layout. (Give them back with `self.batches = …`.)
    fn take_micro_batches(&mut self) -> Vec<Vec<u32>> {
        let (global, micro) = (self.config.optim.global_batch, self.config.optim.micro_batch);
        let (rank, ranks) = self.data_rank;
        let sp = self.model.sp;
        let mut batches = std::mem::take(&mut self.batches);
        batches.resize_with(self.config.accumulation_steps(), Vec::new);
        for (k, b) in batches.iter_mut().enumerate() {
            let first = rank * (global / ranks) + k * micro;
            self.sampler.fill(&self.tokens, self.step, global, first..first + micro, b);
            if !sp.is_whole() {
                // A sequence-parallel rank keeps its part of each window.
                *b = sp.windows(b, self.config.data.seq_len);
            }
        }
        batches
    }

    /// Runs one optimizer step (all its micro-batches; on several ranks, this rank's share).
    pub fn train_step(&mut self) -> Result<StepReport> {
        if self.gpu.is_some() {
            return self.train_step_gpu();
        }
        if self.pp.is_some() {
            return self.train_step_pipeline();
        }
        let start = Instant::now();
        let (global, seq) = (self.config.optim.global_batch, self.config.data.seq_len);
        let scale = 1.0 / (global * seq) as f32;
        let batches = self.take_micro_batches();
        let refs: Vec<&[u32]> = batches.iter().map(Vec::as_slice).collect();
        // A skipped step (below) still uses up its number, as an fp16 step skipped for overflow
        // does on a GPU (see `GpuTrainer::step`): the data, the learning rate and AdamW's bias
        // corrections all follow the step number, so a run resumed from a checkpoint takes the
        // steps the uninterrupted run took. (PyTorch's `GradScaler` leaves Adam's count behind
        // instead, which a checkpoint would have to record.)
        // The number is taken once the step has run: a step that fails leaves it as it was.
        let number = self.step + 1;
        let lr = self.schedule.at(number);
        let table_len = self.model.table.len();
        let b = &mut self.buffers;
        let u = Update {
            optim: &self.optim,
            table: &self.model.table,
            pieces: &b.pieces,
            lr: lr as f32,
            step: number as u32,
            max_norm: self.config.optim.grad_clip,
        };
        let mut st = State {
            params: &mut b.params[..],
            work: None,
            grads: &mut b.grads[..],
            m: &mut b.m[..],
            v: &mut b.v[..],
            pieces: &b.pieces,
            len: table_len,
        };
        // The one step of both backends (`train::step`), with this rank's layout.
        let mut alone = Alone;
        let layout: &mut dyn Layout<Cpu> = match (&mut self.dp, &mut self.tp) {
            (Some(dp), _) => dp,
            (None, Some(tp)) => tp,
            (None, None) => &mut alone,
        };
        let (loss_sum, outcome) = step::step(&Cpu, &self.model, layout, &mut st, &mut self.acts, &refs, scale, &u, None)?;
        self.batches = batches;
        self.step = number;
        let (mem_bytes, mut comm) = match &mut self.dp {
            Some(dp) => {
                // The most held in backward or the update, plus the shards always there.
                let moments = 4 * (b.m.len() + b.v.len()) as u64;
                let shard_grads = 4 * dp.grad_shard.len() as u64;
                (dp.take_step_peak() + shard_grads + moments, dp.take_comm_time())
            }
            None => (b.bytes(), Default::default()),
        };
        // The tp and sp groups' collectives run inside the layers: all of their time is waited for.
        let mut inside = self.tensor_parallel().map(|tp| tp.take_comm_time()).unwrap_or_default();
        inside += self.dp.as_mut().and_then(DataParallel::sequence_parallel).map(|sp| sp.take_comm_time()).unwrap_or_default();
        comm[0] += inside;
        comm[1] += inside;
        self.cpu_report(start, lr, loss_sum, outcome.grad_norm, mem_bytes, comm, Vec::new())
    }

    /// A CPU step's report, once the step has run (`self.step` is its number): records whether
    /// its update was applied (too many non-finite steps in a row stop the run).
    #[allow(clippy::too_many_arguments)]
    fn cpu_report(
        &mut self,
        start: Instant,
        lr: f64,
        loss_sum: f64,
        grad_norm: f64,
        mem_bytes: u64,
        comm: [std::time::Duration; 4],
        stage_idle: Vec<f64>,
    ) -> Result<StepReport> {
        let skipped = !grad_norm.is_finite();
        let lead = self.is_lead();
        self.nonfinite.record(self.step, if skipped { StepOutcome::NonFinite } else { StepOutcome::Applied }, lead)?;
        let secs = start.elapsed().as_secs_f64();
        let seq = self.config.data.seq_len;
        let tokens = (self.config.optim.global_batch * seq) as u64;
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        Ok(StepReport {
            step: self.step,
            loss: loss_sum / tokens as f64,
            lr,
            grad_norm,
            skipped,
            tokens_per_s: tokens as f64 / secs,
            mem_bytes,
            step_ms: secs * 1e3,
            comm_ms: ms(comm[0]),
            grad_comm_ms: ms(comm[2]),
            grad_comm_waited_ms: ms(comm[3]),
            tokens,
            mfu: mfu(self.model.flops_per_token(seq), tokens as f64 / secs, self.peak_flops()),
            stage_idle,
        })
    }

    /// One optimizer step of a pipeline stage: the schedule's passes over the step's
    /// micro-batches (the tied embedding's gradient summed between the ends), the gradients
    /// summed over the dp group, the loss and the gradient norm over the pp group, then the
    /// update of what this stage holds.
    fn train_step_pipeline(&mut self) -> Result<StepReport> {
        let start = Instant::now();
        let (global, micro, seq) = (self.config.optim.global_batch, self.config.optim.micro_batch, self.config.data.seq_len);
        let scale = 1.0 / (global * seq) as f32;
        let batches = self.take_micro_batches();
        let refs: Vec<&[u32]> = batches.iter().map(Vec::as_slice).collect();
        // (The step number is taken once the step has run, as in `train_step`.)
        let number = self.step + 1;
        let lr = self.schedule.at(number);
        let b = &mut self.buffers;
        let pp = self.pp.as_mut().expect("called for pipeline jobs only");
        b.grads.iter_mut().for_each(|g| *g = 0.0);
        let loss = pp.run(&self.model, &b.params, &mut b.grads, &refs, (micro, seq), scale)?;
        let mut loss = pp.sum(loss)?;
        if let Some(dp) = &mut self.dp {
            dp.reduce_all(&mut b.grads)?;
            loss = dp.sum(loss)?;
        }
        let u = Update {
            optim: &self.optim,
            table: &self.model.table,
            pieces: &b.pieces,
            lr: lr as f32,
            step: number as u32,
            max_norm: self.config.optim.grad_clip,
        };
        // Every dp rank holds the same summed gradients; the stages add their squares.
        let norm = pp.norm_spans().to_vec();
        let summed = Summed::Full { grads: &mut b.grads[..], norm: &norm };
        let mut sum = |x: f64| pp.sum(x);
        let outcome = update::apply(&Cpu, &u, &mut b.params[..], None, summed, &mut b.m[..], &mut b.v[..], Some(&mut sum), None)?;
        if let Some(dp) = &mut self.dp {
            if outcome.skipped {
                dp.skip_step(&mut b.params)?;
            } else {
                dp.bring_back_params(&mut b.params)?;
            }
        }
        self.batches = batches;
        self.step = number;
        let stage_idle = pp.stage_idle()?;
        let pp_wait = pp.take_comm_time();
        let (mem_bytes, mut comm) = match &mut self.dp {
            Some(dp) => (dp.take_peak(&b.params, &b.grads) + 4 * (b.m.len() + b.v.len()) as u64, dp.take_comm_time()),
            None => (b.bytes(), Default::default()),
        };
        comm[0] += pp_wait;
        comm[1] += pp_wait;
        self.cpu_report(start, lr, loss, outcome.grad_norm, mem_bytes, comm, stage_idle)
    }

    /// One optimizer step on the GPU: the same data, schedule and clipping as on CPU.
    #[cfg(feature = "cuda")]
    fn train_step_gpu(&mut self) -> Result<StepReport> {
        let start = Instant::now();
        let (global, micro, seq) = (self.config.optim.global_batch, self.config.optim.micro_batch, self.config.data.seq_len);
        let batches = self.take_micro_batches();
        let refs: Vec<&[u32]> = batches.iter().map(Vec::as_slice).collect();
        self.step += 1;
        let lr = self.schedule.at(self.step);
        let gpu = self.gpu.as_mut().expect("called for GPU jobs only");
        let steps_before = self.step - 1;
        let r = gpu.step(
            self.config.precision,
            &self.model,
            &self.buffers,
            steps_before,
            self.resumed_loss_scale,
            (micro, seq),
            self.optim,
            &refs,
            lr as f32,
            self.config.optim.grad_clip,
            self.dp.as_mut(),
        )?;
        self.batches = batches;
        let comm = self.dp.as_mut().map(DataParallel::take_comm_time).unwrap_or_default();
        // The GPU trainer skipped the update itself (on every rank alike); only the steps a lower
        // loss scale cannot rescue count towards stopping the run.
        let outcome = match (r.skipped, r.nonfinite) {
            (false, _) => StepOutcome::Applied,
            (true, false) => StepOutcome::ScaleOverflow,
            (true, true) => StepOutcome::NonFinite,
        };
        let lead = self.is_lead();
        self.nonfinite.record(self.step, outcome, lead)?;
        let gpu = self.gpu.as_ref().expect("called for GPU jobs only");
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        let secs = start.elapsed().as_secs_f64();
        let tokens = (global * seq) as u64;
        Ok(StepReport {
            step: self.step,
            loss: r.loss,
            lr,
            grad_norm: r.grad_norm,
            skipped: r.skipped,
            tokens_per_s: tokens as f64 / secs,
            mem_bytes: gpu.state_bytes(),
            step_ms: secs * 1e3,
            comm_ms: ms(comm[0]),
            grad_comm_ms: ms(comm[2]),
            grad_comm_waited_ms: ms(comm[3]),
            tokens,
            mfu: mfu(self.model.flops_per_token(seq), tokens as f64 / secs, self.peak_flops()),
            stage_idle: Vec::new(),
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn train_step_gpu(&mut self) -> Result<StepReport> {
        unreachable!("check_supported refuses CUDA jobs in builds without CUDA")
    }

    /// Brings the host buffers up to date with the GPU's state (a no-op on CPU).
    pub(super) fn sync_host(&mut self) -> Result<()> {
        match &mut self.gpu {
            Some(g) => g.sync_host(&mut self.buffers),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mfu;

    #[test]
    fn mfu_is_the_model_flops_over_the_known_peak() {
        // 1 GFLOP per token at 100k tokens/s on a 1 PFLOP/s device: a tenth of its peak.
        let got = mfu(1e9, 1e5, Some(1e15)).unwrap();
        assert!((got - 0.1).abs() < 1e-12, "{got}");
        assert_eq!(mfu(1e9, 1e5, None), None, "no peak, no MFU");
        assert_eq!(mfu(1e9, 1e5, Some(0.0)), None, "a zero peak is not a peak");
    }
}
