//! `gantry bench --tp N [--sp N --sp-mode M]`: training steps of a model cut across tensor- and
//! sequence-parallel CPU ranks (threads of this process, over loopback sockets, as the job's
//! ranks would talk), reporting what the layout costs: the step's time, the share of it spent in
//! the groups' collectives, and each rank's memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::bench::{median, BENCH_DATA_STREAM, BENCH_OPTIM};
use super::step::{self, Layout, State};
use super::update::Update;
use crate::backend::Cpu;
use crate::comm::{AsyncComm, Axis, Comm, DeviceMesh};
use crate::config::SpMode;
use crate::models::{Model, ModelConfig, SpRank, TpRank};
use crate::parallel::{DataParallel, SequenceParallel, TensorParallel};
use crate::params::{data_parallel_chunking, Chunking, ParamBuffers, DEFAULT_CHUNK_ELEMS};
use crate::rng::Rng;
use crate::{Error, Result};

/// The layout benchmarked: `tp` tensor-parallel ranks inside `sp` sequence-parallel ones.
#[derive(Clone, Copy, Debug)]
pub struct BenchLayout {
    pub tp: usize,
    pub sp: usize,
    pub sp_mode: SpMode,
}

#[derive(Clone, Debug, Serialize)]
pub struct TensorParallelBench {
    /// The whole model's parameters.
    pub params: usize,
    pub tp: usize,
    pub sp: usize,
    /// `none`, `split_gather` (inside the tp group), `all_to_all` or `ring_attn` (over sp).
    pub sp_mode: &'static str,
    pub batch: usize,
    pub seq_len: usize,
    /// Tokens per second of the median step (of the job: the ranks train on one batch).
    pub tokens_per_s: f64,
    pub step_ms: f64,
    /// Milliseconds of the median step spent in the groups' collectives (the tp and sp ones
    /// sit between the layers and are all waited for; of the gradient sum over sp, the part
    /// backward did not hide), and their share of the step.
    pub comm_ms: f64,
    pub comm_share: f64,
    /// Bytes rank 0 sent per step (all-reduces or reduce-scatters and all-gathers of the
    /// activations and their gradients, the head's statistics, all-to-alls or key/value blocks,
    /// the gradient sum).
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

/// A rank's groups: the tp group alone, or the gradient sum over sp with the tp and sp groups
/// inside.
enum RankGroups {
    Tp(Box<TensorParallel>),
    Dp(Box<DataParallel>),
}

impl RankGroups {
    fn layout(&mut self) -> &mut dyn Layout<Cpu> {
        match self {
            RankGroups::Tp(tp) => &mut **tp,
            RankGroups::Dp(dp) => &mut **dp,
        }
    }

    /// Communication the step waited for since the last call.
    fn take_comm_time(&mut self) -> Duration {
        match self {
            RankGroups::Tp(tp) => tp.take_comm_time(),
            RankGroups::Dp(dp) => {
                let exposed = dp.take_comm_time()[1];
                let tp = dp.tensor_parallel().map(|g| g.take_comm_time()).unwrap_or_default();
                let sp = dp.sequence_parallel().map(|g| g.take_comm_time()).unwrap_or_default();
                exposed + tp + sp
            }
        }
    }
}

/// Times `steps` steps after `warmup` untimed ones of `config` cut as `layout` says on batches
/// of `batch` random sequences of `seq` tokens; `on_step(i, ms)` sees rank 0's steps.
#[allow(clippy::too_many_arguments)]
pub fn bench_tensor_parallel(
    config: &ModelConfig,
    layout: BenchLayout,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    on_step: impl Fn(usize, f64) + Send + Sync + 'static,
) -> Result<TensorParallelBench> {
    let BenchLayout { tp, sp, sp_mode } = layout;
    let world = tp * sp;
    let whole = Model::new(config.clone())?;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Comm { rank: None, message: e.to_string() })?;
        l.local_addr().map_err(|e| Error::Comm { rank: None, message: e.to_string() })?.to_string()
    };
    let on_step = Arc::new(on_step);
    let ranks: Vec<_> = (0..world)
        .map(|rank| {
            let (config, addr, on_step) = (config.clone(), addr.clone(), on_step.clone());
            std::thread::spawn(move || -> Result<RankRun> {
                let comm = Arc::new(AsyncComm::new(Comm::connect(rank, world, &addr, Duration::from_secs(120))?)?);
                let mesh = DeviceMesh::new(world, 1, 1, sp, tp)?;
                let coords = mesh.coords(rank);
                let tp_rank = TpRank { rank: coords[3], size: tp, split_seq: sp_mode == SpMode::SplitGather };
                let sp_rank = SpRank { rank: coords[2], size: sp, ring: sp_mode == SpMode::RingAttn };
                let probe = Model::with_parallel(config.clone(), Chunking::whole(DEFAULT_CHUNK_ELEMS), tp_rank, sp_rank)?;
                let (model, groups) = if sp > 1 {
                    // The sp ranks' gradients are summed as data parallelism sums them.
                    let chunking = data_parallel_chunking(probe.table.len(), 0);
                    let model = Model::with_parallel(config, chunking, tp_rank, sp_rank)?;
                    let tpg = (tp > 1).then(|| TensorParallel::new(comm.clone(), &mesh, &model)).transpose()?;
                    let spg = SequenceParallel::new(comm.clone(), mesh.group(Axis::Sp, rank));
                    let replicas = mesh.group_over(&[Axis::Dp, Axis::Sp], rank);
                    let dp = DataParallel::new(comm.clone(), replicas, 0, &model.table, tpg, Some(spg))?;
                    (model, RankGroups::Dp(Box::new(dp)))
                } else {
                    let tpg = TensorParallel::new(comm.clone(), &mesh, &probe)?;
                    (probe, RankGroups::Tp(Box::new(tpg)))
                };
                run_rank(&model, groups, &comm, batch, seq, warmup, steps, seed, |i, ms| {
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
        sp,
        sp_mode: sp_mode.name(),
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
    mut groups: RankGroups,
    comm: &AsyncComm,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    on_step: impl Fn(usize, f64),
) -> Result<RankRun> {
    let mut buf = ParamBuffers::zeros(&model.table);
    model.table.init(&mut buf.params, seed);
    let sp = model.sp;
    let (local_batch, local_seq) = sp.local_batch(batch, seq);
    let mut acts = model.activations(local_batch, local_seq)?;
    // Every rank draws the same tokens (the ranks train on one batch); a sequence-parallel rank
    // keeps its part of each sequence.
    let mut rng = Rng::new(seed, BENCH_DATA_STREAM);
    let vocab = model.config.vocab as u64;
    let tokens = batch * seq;
    let mut windows = vec![0u32; batch * (seq + 1)];
    let (mut step_ms, mut comm_ms, mut losses) = (Vec::new(), Vec::new(), (0.0, 0.0));
    let traffic = || comm.run(|c| Ok(c.traffic().0));
    let sent_before = traffic()?;
    for i in 0..warmup + steps.max(1) {
        windows.iter_mut().for_each(|t| *t = rng.below(vocab) as u32);
        let mine = sp.windows(&windows, seq);
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
        let (loss, _) = step::step(&Cpu, model, groups.layout(), &mut st, &mut acts, &[&mine], 1.0 / tokens as f32, &u, None)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let comm = groups.take_comm_time().as_secs_f64() * 1e3;
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
    let sent = traffic()? - sent_before;
    let activation_bytes = model.activation_bytes(local_batch, local_seq);
    Ok(RankRun { step_ms, comm_ms, sent, mem_bytes: buf.bytes(), activation_bytes, losses })
}
