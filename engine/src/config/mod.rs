//! The engine's own configuration: what one training run needs, in the engine's types.
//!
//! The wire contract (`gantry_api::JobSpec`, its TOML and JSON forms, its defaults and its
//! validation) belongs to the API crate; the daemon and the CLI convert a validated spec into a
//! [`TrainConfig`] at the edge (`daemon/src/engine_config.rs`). The compute crate therefore does
//! not depend on the API crate (nor on the protos, tonic and prost it carries), and the wire shape
//! can change without touching the engine.

mod plan;

use std::path::PathBuf;

pub use plan::{GpuComm, ParallelPlan, SpMode, TpMode};

pub use crate::device::Devices;
pub use crate::optim::Schedule;
pub use crate::pipeline::ScheduleKind;

/// Where a run's initial weights come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModelInit {
    /// The directory's weights if it has any, else a seeded random init.
    #[default]
    Auto,
    /// A seeded random init, ignoring any weights.
    Random,
    /// The directory's weights; an error if there are none.
    Pretrained,
}

/// Arithmetic precision of the forward and backward passes (master weights are always f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    /// The name users write (`train.precision`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The model to train.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSource {
    /// A Hugging Face model directory.
    pub path: PathBuf,
    pub init: ModelInit,
}

/// The training data.
#[derive(Clone, Debug, PartialEq)]
pub struct DataConfig {
    /// Token (`.bin`, `.u32`) or text (`.txt`, `.jsonl`) file.
    pub train: PathBuf,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// `tokenizer.json` for text data; `None`: the model directory's, if it has one.
    pub tokenizer: Option<PathBuf>,
}

/// The optimizer (AdamW), its schedule and the batch it steps on.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimConfig {
    /// Optimizer steps of the whole run.
    pub steps: u64,
    /// Sequences per optimizer step, across the data-parallel ranks.
    pub global_batch: usize,
    /// Sequences per forward/backward pass on one rank.
    pub micro_batch: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

/// One training run, as the engine sees it. Paths are used as they are: the edge resolves them
/// (against the spec file's folder, or the daemon's working directory).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub model: ModelSource,
    pub data: DataConfig,
    pub optim: OptimConfig,
    /// Seed of the random init and of the data order.
    pub seed: u64,
    pub precision: Precision,
    pub plan: ParallelPlan,
    pub devices: Devices,
    /// Save a training checkpoint every N optimizer steps (0: only the final model). The trainer
    /// keeps a host copy for the writer only when this is set.
    pub checkpoint_every: u64,
}

impl TrainConfig {
    /// A run of `model` on `data` on one CPU rank, with the job spec's defaults otherwise (for
    /// callers that build a config by hand: tests and benchmarks). The daemon and the CLI build
    /// theirs from a job spec instead.
    pub fn new(model: impl Into<PathBuf>, data: impl Into<PathBuf>) -> TrainConfig {
        TrainConfig {
            model: ModelSource { path: model.into(), init: ModelInit::Auto },
            data: DataConfig { train: data.into(), seq_len: 256, tokenizer: None },
            optim: OptimConfig {
                steps: 100,
                global_batch: 8,
                micro_batch: 8,
                lr: 6e-4,
                // As the spec derives it: a tenth of the peak.
                min_lr: 6e-4 / 10.0,
                warmup_steps: 0,
                schedule: Schedule::Cosine,
                weight_decay: 0.1,
                grad_clip: 1.0,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
            },
            seed: 1337,
            precision: Precision::Fp32,
            plan: ParallelPlan::default(),
            devices: Devices::Cpu(1),
            checkpoint_every: 0,
        }
    }

    /// The same run laid out as `plan` on `devices`, with the per-rank micro-batch the global
    /// batch divided by `plan.dp` (no accumulation) unless `micro_batch` says otherwise.
    pub fn with_plan(mut self, plan: ParallelPlan, devices: Devices, micro_batch: Option<usize>) -> TrainConfig {
        self.optim.micro_batch = micro_batch.unwrap_or(self.optim.global_batch / plan.dp.max(1));
        self.plan = plan;
        self.devices = devices;
        self
    }

    /// Micro-batches per optimizer step on one rank.
    pub fn accumulation_steps(&self) -> usize {
        self.optim.global_batch / (self.optim.micro_batch * self.plan.dp).max(1)
    }

    pub fn on_gpu(&self) -> bool {
        matches!(self.devices, Devices::Cuda(_))
    }
}
