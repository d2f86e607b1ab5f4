//! `gantry bench --pp N --pp-schedule S [--pp-chunks V] [--micro-batches M]`: one step's
//! forward and backward passes run by the pipeline runner on N CPU ranks (threads of this
//! process, each with its own share of the cores, over loopback sockets as a job's ranks would
//! talk), and the bubble measured from the stages' own timelines: the share of the step each
//! stage sat idle (waiting for a message), averaged over the stages, beside the schedule's
//! ideal.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{split_stages, PipelineRank, Run, Schedule, ScheduleKind};
use crate::comm::{AsyncComm, Comm, Group};
use crate::models::{Model, ModelConfig, PpStage, SpRank, TpRank};
use crate::params::Chunking;
use crate::rng::Rng;
use crate::{Error, Result};

/// What `bench_pipeline` is asked to run.
#[derive(Clone, Copy, Debug)]
pub struct PipelineBenchSpec {
    pub pp: usize,
    pub kind: ScheduleKind,
    pub chunks: usize,
    pub micro_batches: usize,
    /// Sequences per micro-batch, and tokens per sequence.
    pub batch: usize,
    pub seq: usize,
    /// Cores shared by the ranks (each gets `threads / pp`, at least one).
    pub threads: usize,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PipelineBench {
    pub pp: usize,
    pub pp_schedule: &'static str,
    pub pp_chunks: usize,
    pub micro_batches: usize,
    /// Each rank's blocks (global ranges, one per chunk).
    pub stages: Vec<Vec<std::ops::Range<usize>>>,
    /// The share of the step the stages sat idle, measured (the median step's, averaged over
    /// the stages), and the schedule's ideal with equal passes.
    pub bubble_fraction: f64,
    pub bubble_theory: f64,
    /// Each stage's idle share of the median step.
    pub stage_idle: Vec<f64>,
    /// Micro-batches whose activations were alive at once, per stage.
    pub peak_in_flight: Vec<usize>,
    pub step_ms: f64,
    /// The mean loss of the first step's micro-batches (the same data and weights under every
    /// schedule, so the same number).
    pub loss_first: f64,
}

/// Runs `spec` on a random model of `config`: `warmup + steps` steps of forward and backward
/// passes (no update: the bubble is the passes'), reporting the median timed step.
pub fn bench_pipeline(config: &ModelConfig, spec: PipelineBenchSpec) -> Result<PipelineBench> {
    let s = spec;
    let schedule = Schedule::new(s.kind, s.pp, s.chunks, s.micro_batches)?;
    schedule.check()?;
    let cut = split_stages(config, s.pp * s.chunks, s.seq, None)?;
    let stages: Vec<Vec<_>> = (0..s.pp).map(|r| (0..s.chunks).map(|c| cut[schedule.stage(r, c)].clone()).collect()).collect();
    if s.steps == 0 {
        return Err(Error::Unsupported { field: "steps".into(), message: "at least one timed step".into() });
    }
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Comm { rank: None, message: e.to_string() })?;
        l.local_addr().map_err(|e| Error::Comm { rank: None, message: e.to_string() })?.to_string()
    };
    let total = s.warmup + s.steps;
    // The same windows for every rank: micro-batch k of step i.
    let mut rng = Rng::new(s.seed, 7);
    let data: Vec<Vec<Vec<u32>>> = (0..total)
        .map(|_| {
            (0..s.micro_batches).map(|_| (0..s.batch * (s.seq + 1)).map(|_| rng.below(config.vocab as u64) as u32).collect()).collect()
        })
        .collect();
    let data = Arc::new(data);
    let per_rank = (s.threads / s.pp).max(1);
    let handles: Vec<_> = (0..s.pp)
        .map(|rank| {
            let (config, addr, data, schedule, chunks) =
                (config.clone(), addr.clone(), data.clone(), schedule.clone(), stages[rank].clone());
            std::thread::spawn(move || -> Result<Vec<Run>> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(per_rank)
                    .build()
                    .map_err(|e| Error::Unsupported { field: "threads".into(), message: e.to_string() })?;
                let stage = PpStage::new(chunks, config.layers)?;
                let model =
                    Model::with_stage(config, Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS), TpRank::WHOLE, SpRank::WHOLE, stage)?;
                let mut params = vec![0.0; model.table.len()];
                model.table.init(&mut params, s.seed);
                let mut grads = vec![0.0; params.len()];
                let comm = Arc::new(AsyncComm::new(Comm::connect(rank, s.pp, &addr, Duration::from_secs(120))?)?);
                let group = Group { ranks: (0..s.pp).collect(), me: rank };
                let mut pr = PipelineRank::new(comm.clone(), group.clone());
                let scale = 1.0 / (s.micro_batches * s.batch * s.seq) as f32;
                let mut runs = Vec::with_capacity(total);
                for step in data.iter() {
                    let g = group.clone();
                    comm.run(move |c| c.barrier(&g))?;
                    let refs: Vec<&[u32]> = step.iter().map(Vec::as_slice).collect();
                    grads.iter_mut().for_each(|g| *g = 0.0);
                    runs.push(pool.install(|| pr.run(&schedule, &model, &params, &mut grads, &refs, (s.batch, s.seq), scale))?);
                }
                Ok(runs)
            })
        })
        .collect();
    let mut ranks = Vec::with_capacity(s.pp);
    for h in handles {
        ranks.push(h.join().map_err(|_| Error::Unsupported { field: "parallel.pp".into(), message: "a stage panicked".into() })??);
    }
    // The median timed step by the longest stage's span.
    let mut timed: Vec<usize> = (s.warmup..total).collect();
    let span = |i: usize| ranks.iter().map(|r| r[i].span).fold(0.0, f64::max);
    timed.sort_by(|a, b| span(*a).total_cmp(&span(*b)));
    let mid = timed[timed.len() / 2];
    let stage_idle: Vec<f64> = ranks.iter().map(|r| r[mid].idle_fraction()).collect();
    Ok(PipelineBench {
        pp: s.pp,
        pp_schedule: s.kind.name(),
        pp_chunks: s.chunks,
        micro_batches: s.micro_batches,
        stages,
        bubble_fraction: stage_idle.iter().sum::<f64>() / s.pp as f64,
        bubble_theory: schedule.bubble_theory(),
        stage_idle,
        peak_in_flight: ranks.iter().map(|r| r[mid].peak_in_flight).collect(),
        step_ms: span(mid) * 1e3,
        loss_first: ranks.iter().map(|r| r[0].loss).sum::<f64>() / (s.micro_batches * s.batch * s.seq) as f64,
    })
}
