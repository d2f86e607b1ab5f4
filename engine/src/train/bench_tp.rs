//! `gantry bench --tp N`: training steps of a model cut across `N` tensor-parallel CPU ranks
//! (threads of this process, over loopback sockets, as the job's ranks would talk), reporting
//! what the layout costs: the step's time, the share of it spent in the tp group's collectives,
//! and each rank's memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bench::{median, BENCH_DATA_STREAM, BENCH_OPTIM};
use super::step::{self, State};
use super::update::Update;
use crate::backend::Cpu;
use crate::comm::{AsyncComm, Comm, DeviceMesh};
use crate::models::{Model, ModelConfig, TpRank};
use crate::parallel::TensorParallel;
use crate::params::{Chunking, ParamBuffers, DEFAULT_CHUNK_ELEMS};
use crate::rng::Rng;
use crate::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct TensorParallelBench {
    /// The whole model's parameters.
    pub params: usize,
    pub tp: usize,
    /// `none`, or `split_gather` (Megatron's sequence parallelism inside the tp group).
    pub sp_mode: &'static str,
    pub batch: usize,
    pub seq_len: usize,
    /// Tokens per second of the median step (of the job: every rank trains on the same tokens).
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Milliseconds of the median step spent in the tp group's collectives (all of them are
    /// waited for: they sit between the layers), and their share of the step.
    pub comm_ms: f64,
    pub comm_share: f64,
    /// Bytes each collective sent per step on rank 0 (all-reduces of the activations and their
    /// gradients, the head's statistics).
    pub comm_bytes_per_step: u64,
    /// The most parameters, gradients and optimizer state one rank holds, and its activations.
    pub mem_bytes: u64,
    pub activation_bytes: u64,
    /// One device's model state and activations, for the ratios.
    pub whole_mem_bytes: u64,
    pub whole_activation_bytes: u64,
    pub loss_first: f64,
    pub loss_last: f64,
}

/// One rank's timings: per timed step, the step and its communication in ms; the bytes sent;
/// its memory; the first and last loss.
struct RankRun {
    step_ms: Vec<f64>,
    comm_ms: Vec<f64>,
    sent: u64,
    mem_bytes: u64,
    activation_bytes: u64,
    losses: (f64, f64),
}

/// Times `steps` steps after `warmup` untimed ones of `config` cut across `tp` ranks (with
/// split_gather when `split_seq`) on batches of `batch` random sequences of `seq` tokens;
/// `on_step(i, ms)` sees rank 0's steps.
#[allow(clippy::too_many_arguments)]
pub fn bench_tensor_parallel(
    config: &ModelConfig,
    tp: usize,
    split_seq: bool,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    on_step: impl Fn(usize, f64) + Send + Sync + 'static,
) -> Result<TensorParallelBench> {
    let whole = Model::new(config.clone())?;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Comm { rank: None, message: e.to_string() })?;
        l.local_addr().map_err(|e| Error::Comm { rank: None, message: e.to_string() })?.to_string()
    };
    let on_step = Arc::new(on_step);
    let ranks: Vec<_> = (0..tp)
        .map(|rank| {
            let (config, addr, on_step) = (config.clone(), addr.clone(), on_step.clone());
            std::thread::spawn(move || -> Result<RankRun> {
                let comm = Comm::connect(rank, tp, &addr, Duration::from_secs(120))?;
                let model = Model::with_layout(config, Chunking::whole(DEFAULT_CHUNK_ELEMS), TpRank { rank, size: tp, split_seq })?;
                let mut group = TensorParallel::new(Arc::new(AsyncComm::new(comm)?), &DeviceMesh::new(tp, 1, 1, 1, tp)?, &model)?;
                run_rank(&model, &mut group, batch, seq, warmup, steps, seed, |i, ms| {
                    if rank == 0 {
                        on_step(i, ms)
                    }
                })
            })
        })
        .collect();
    let runs: Vec<RankRun> = ranks
        .into_iter()
        .map(|h| h.join().map_err(|_| Error::Comm { rank: None, message: "a benchmark rank panicked".into() })?)
        .collect::<Result<_>>()?;
    let r0 = &runs[0];
    let (mut step_ms, mut comm_ms) = (r0.step_ms.clone(), r0.comm_ms.clone());
    let (step_ms, comm_ms) = (median(&mut step_ms), median(&mut comm_ms));
    let tokens = (batch * seq) as f64;
    Ok(TensorParallelBench {
        params: whole.table.len(),
        tp,
        sp_mode: if split_seq { "split_gather" } else { "none" },
        batch,
        seq_len: seq,
        tokens_per_s: tokens / (step_ms / 1e3),
        step_ms,
        comm_ms,
        comm_share: comm_ms / step_ms,
        comm_bytes_per_step: r0.sent / (warmup + steps.max(1)) as u64,
        mem_bytes: runs.iter().map(|r| r.mem_bytes).max().unwrap_or(0),
        activation_bytes: runs.iter().map(|r| r.activation_bytes).max().unwrap_or(0),
        whole_mem_bytes: 16 * whole.table.len() as u64,
        whole_activation_bytes: whole.activation_bytes(batch, seq),
        loss_first: r0.losses.0,
        loss_last: r0.losses.1,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_rank(
    model: &Model,
    group: &mut TensorParallel,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    on_step: impl Fn(usize, f64),
) -> Result<RankRun> {
    let mut buf = ParamBuffers::zeros(&model.table);
    model.table.init(&mut buf.params, seed);
    let mut acts = model.activations(batch, seq)?;
    // Every rank draws the same tokens: a tp group trains on one batch.
    let mut rng = Rng::new(seed, BENCH_DATA_STREAM);
    let vocab = model.config.vocab as u64;
    let tokens = batch * seq;
    let mut windows = vec![0u32; batch * (seq + 1)];
    let (mut step_ms, mut comm_ms, mut losses) = (Vec::new(), Vec::new(), (0.0, 0.0));
    let sent_before = group.traffic()?;
    for i in 0..warmup + steps.max(1) {
        windows.iter_mut().for_each(|t| *t = rng.below(vocab) as u32);
        let u = Update { optim: &BENCH_OPTIM, table: &model.table, pieces: &buf.pieces, lr: 3e-4, step: i as u32 + 1, max_norm: 1.0 };
        let mut st = State {
            params: &mut buf.params[..],
            work: None,
            grads: &mut buf.grads[..],
            m: &mut buf.m[..],
            v: &mut buf.v[..],
            pieces: &buf.pieces,
            len: model.table.len(),
        };
        let t0 = Instant::now();
        let (loss, _) = step::step(&Cpu, model, group, &mut st, &mut acts, &[&windows], 1.0 / tokens as f32, &u, None)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let comm = group.take_comm_time().as_secs_f64() * 1e3;
        on_step(i, ms);
        let loss = loss / tokens as f64;
        if i == 0 {
            losses.0 = loss;
        }
        losses.1 = loss;
        if i >= warmup {
            step_ms.push(ms);
            comm_ms.push(comm);
        }
    }
    let sent = group.traffic()? - sent_before;
    Ok(RankRun { step_ms, comm_ms, sent, mem_bytes: buf.bytes(), activation_bytes: model.activation_bytes(batch, seq), losses })
}
