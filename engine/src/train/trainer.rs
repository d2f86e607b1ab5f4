use std::path::{Path, PathBuf};
use std::time::Instant;

use gantry_api::{JobSpec, ModelInit, Precision};
use serde::Serialize;

use crate::checkpoint::{has_weights, load_training_checkpoint, load_weights, save_hf_dir, save_training_checkpoint, TrainingState};
use crate::comm::{Comm, DeviceMesh};
use crate::data::{check_vocab, load_tokens, Sampler};
use crate::models::{Activations, Model, ModelConfig};
use crate::optim::{clip_grad_norm, AdamW, LrSchedule};
use crate::parallel::DataParallel;
use crate::params::ParamBuffers;
use crate::{Error, Result};

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
    pub tokens_per_s: f64,
    /// Bytes of parameters, gradients and optimizer state on this rank.
    pub mem_bytes: u64,
    pub step_ms: f64,
    /// Time this rank spent communicating during the step.
    pub comm_ms: f64,
    pub tokens: u64,
}

/// Builds the model of `dir` and its initial parameters as `init` asks.
pub fn load_model(dir: &Path, init: ModelInit, seed: u64) -> Result<(Model, Vec<f32>)> {
    let config = ModelConfig::from_dir(dir)?;
    let model = Model::new(config)?;
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

/// One rank's training state and loop.
#[derive(Debug)]
pub struct Trainer {
    pub spec: JobSpec,
    pub model: Model,
    pub buffers: ParamBuffers,
    acts: Activations,
    tokens: Vec<u32>,
    sampler: Sampler,
    schedule: LrSchedule,
    optim: AdamW,
    tokenizer: Option<PathBuf>,
    batch: Vec<u32>,
    /// The dp group and ZeRO, when the job runs on more than one rank.
    dp: Option<DataParallel>,
    /// Optimizer steps taken so far.
    pub step: u64,
}

impl Trainer {
    /// Loads the model, its weights and the data of `spec`, with paths relative to `base`, for a
    /// job on one rank.
    pub fn new(spec: JobSpec, base: &Path) -> Result<Trainer> {
        Self::with_comm(spec, base, None)
    }

    /// As `new`, for one rank of a job on `comm.world()` ranks (`parallel.dp` of them).
    pub fn with_comm(spec: JobSpec, base: &Path, comm: Option<Comm>) -> Result<Trainer> {
        crate::device::check_supported(&spec.resources.devices)?;
        let unsupported = |field: &str, message: String| Err(Error::Unsupported { field: field.into(), message });
        if spec.train.precision != Precision::Fp32 {
            return unsupported(
                "train.precision",
                format!("{:?} needs the CUDA backend; CPU training runs in fp32", spec.train.precision).to_lowercase(),
            );
        }
        let p = &spec.parallel;
        if p.tp != 1 || p.pp != 1 {
            return unsupported("parallel", "tensor and pipeline parallelism are not built yet: tp and pp must be 1".into());
        }
        let world = comm.as_ref().map_or(1, Comm::world);
        if p.dp != world {
            return unsupported("parallel.dp", format!("parallel.dp = {} but the job runs on {world} ranks", p.dp));
        }
        if comm.is_none() && p.zero != 0 {
            return unsupported("parallel.zero", "ZeRO shards across data-parallel ranks: it needs parallel.dp > 1".into());
        }
        let dp = match comm {
            Some(c) => Some(DataParallel::new(c, &DeviceMesh::new(world, p.dp, 1, 1, 1)?, p.zero)?),
            None => None,
        };
        let model_dir = base.join(&spec.model.path);
        let (model, params) = load_model(&model_dir, spec.model.init, spec.train.seed)?;
        let data_path = base.join(&spec.data.train);
        let tokenizer = match &spec.data.tokenizer {
            Some(t) => Some(base.join(t)),
            None => Some(model_dir.join("tokenizer.json")).filter(|p| p.is_file()),
        };
        let tokens = load_tokens(&data_path, tokenizer.as_deref())?;
        check_vocab(&tokens, model.config.vocab, &data_path)?;
        let seq = spec.data.seq_len;
        let sampler = Sampler::new(tokens.len(), seq, spec.train.seed).ok_or_else(|| Error::Data {
            path: data_path.clone(),
            message: format!("{} tokens hold no window of data.seq_len + 1 = {}", tokens.len(), seq + 1),
        })?;
        let acts = model.activations(spec.micro_batch_size(), seq)?;
        let shard = dp.as_ref().map_or(0..model.table.len(), |d| d.shard(model.table.len()));
        let mut buffers = ParamBuffers::sharded(&model.table, shard);
        buffers.params = params;
        let t = &spec.train;
        let schedule = LrSchedule { lr: t.lr, min_lr: t.min_lr(), warmup_steps: t.warmup_steps, total_steps: t.steps, kind: t.schedule };
        let optim = AdamW { beta1: t.beta1 as f32, beta2: t.beta2 as f32, eps: t.eps as f32, weight_decay: t.weight_decay as f32 };
        Ok(Trainer { spec, model, buffers, acts, tokens, sampler, schedule, optim, tokenizer, batch: Vec::new(), dp, step: 0 })
    }

    pub fn tokens_in_data(&self) -> usize {
        self.tokens.len()
    }

    /// This rank's position in the dp group (0 on one rank): rank 0 writes the run's files.
    pub fn dp_rank(&self) -> usize {
        self.dp.as_ref().map_or(0, DataParallel::rank)
    }

    /// Runs one optimizer step (all its micro-batches; on several ranks, this rank's share).
    pub fn train_step(&mut self) -> Result<StepReport> {
        let start = Instant::now();
        let (global, micro, seq) = (self.spec.train.global_batch_size, self.spec.micro_batch_size(), self.spec.data.seq_len);
        let (rank, ranks) = self.dp.as_ref().map_or((0, 1), |d| (d.rank(), d.size()));
        let per_rank = global / ranks;
        let scale = 1.0 / (global * seq) as f32;
        gantry_kernels::cpu::vec::zero(&mut self.buffers.grads);
        let mut loss_sum = 0.0;
        for k in 0..self.spec.accumulation_steps() {
            let first = rank * per_rank + k * micro;
            self.sampler.fill(&self.tokens, self.step, global, first..first + micro, &mut self.batch);
            loss_sum += self.model.forward_backward(&self.buffers.params, &mut self.buffers.grads, &mut self.acts, &self.batch, scale)?;
        }
        if let Some(dp) = &mut self.dp {
            loss_sum = dp.sum(loss_sum)?;
            dp.sync_grads(&mut self.buffers.grads)?;
        }
        // Every rank now holds the global gradient: the norm and the clipping agree everywhere.
        let grad_norm = clip_grad_norm(&mut self.buffers.grads, self.spec.train.grad_clip);
        self.step += 1;
        let lr = self.schedule.at(self.step);
        self.optim.step(&self.model.table, &mut self.buffers, lr as f32, self.step as u32);
        let mut comm_ms = 0.0;
        if let Some(dp) = &mut self.dp {
            dp.gather_params(&mut self.buffers.params)?;
            comm_ms = dp.take_comm_time().as_secs_f64() * 1e3;
        }
        let secs = start.elapsed().as_secs_f64();
        let tokens = (global * seq) as u64;
        Ok(StepReport {
            step: self.step,
            loss: loss_sum / tokens as f64,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / secs,
            mem_bytes: self.buffers.bytes(),
            step_ms: secs * 1e3,
            comm_ms,
            tokens,
        })
    }

    /// Writes the current model as a Hugging Face directory.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        save_hf_dir(dir, &self.model.config, &self.model.table, &self.buffers.params, self.tokenizer.as_deref())
    }

    /// Writes a training checkpoint (weights, AdamW moments, step) to `dir`, atomically. Every
    /// rank calls it (ZeRO's moment shards are gathered); rank 0 writes and gets `true`.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<bool> {
        let len = self.model.table.len();
        let (m, v) = match &mut self.dp {
            Some(dp) if dp.zero() >= 1 => (Some(dp.gather_shards(&self.buffers.m, len)?), Some(dp.gather_shards(&self.buffers.v, len)?)),
            _ => (None, None),
        };
        if self.dp_rank() != 0 {
            return Ok(false);
        }
        let state = TrainingState {
            params: &self.buffers.params,
            m: m.as_deref().unwrap_or(&self.buffers.m),
            v: v.as_deref().unwrap_or(&self.buffers.v),
            step: self.step,
        };
        save_training_checkpoint(dir, &self.model.config, &self.model.table, state, self.tokenizer.as_deref())?;
        Ok(true)
    }

    /// Continues from a training checkpoint: the following steps are those the run that wrote it
    /// would have taken (the data order depends only on the seed and the step).
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        self.step = load_training_checkpoint(dir, &self.model.config, &self.model.table, &mut self.buffers)?;
        if self.step > self.spec.train.steps {
            return Err(Error::Config {
                path: dir.into(),
                message: format!("the checkpoint is at step {}, past train.steps = {}", self.step, self.spec.train.steps),
            });
        }
        Ok(())
    }
}
