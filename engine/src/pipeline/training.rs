//! A pipeline rank of a training job: its stage of the model, the schedule it runs, and what
//! the optimizer step needs of the pp group beyond the passes themselves.
//!
//! - **The loss** is known on the rank running the head: the group sums it (every other rank
//!   adds 0), so every stage reports the step's loss.
//! - **The gradient norm** is the whole model's: each stage adds the squares of the tensors it
//!   counts, and the group sums them. A tensor two stages hold (a tied embedding on the first and
//!   the last stage, its gradient summed between them) is counted once, by the lower rank.
//! - **Checkpoints and the final model** are the whole model's: every stage's parameters and
//!   moments are gathered on the group's first rank and put together by name, so a checkpoint
//!   written under one pipeline layout resumes under any other (pp = 1 included), and the final
//!   model loads in `transformers` as it is.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::{split_stages, PipelineRank, Run, Schedule};
use crate::comm::{AsyncComm, Group};
use crate::config::ParallelPlan;
use crate::models::{Model, ModelConfig, PpStage, SpRank, TpRank};
use crate::params::{Chunking, ParamTable};
use crate::Result;

/// The schedule of `plan` (its pp ranks, chunks and schedule) with `micro_batches` per step, and
/// each pp rank's blocks: `parallel.pp_layers` when given (one count per virtual stage, in
/// order), else the cut that balances the estimated cost at sequence length `seq`.
pub fn plan_stages(config: &ModelConfig, plan: &ParallelPlan, seq: usize, micro_batches: usize) -> Result<(Schedule, Vec<PpStage>)> {
    let schedule = Schedule::new(plan.pp_schedule, plan.pp, plan.pp_chunks, micro_batches)?;
    let cut = split_stages(config, plan.pp * plan.pp_chunks, seq, plan.pp_layers.as_deref())?;
    let stages = (0..plan.pp)
        .map(|r| PpStage::new((0..plan.pp_chunks).map(|c| cut[schedule.stage(r, c)].clone()).collect(), config.layers))
        .collect::<Result<Vec<_>>>()?;
    Ok((schedule, stages))
}

/// One rank of the pp group of a training job.
pub struct PipelineTraining {
    comm: Arc<AsyncComm>,
    group: Group,
    runner: PipelineRank,
    pub schedule: Schedule,
    /// Every pp rank's blocks, in the group's order.
    pub stages: Vec<PpStage>,
    /// Every pp rank's table (this rank's is its model's), and the whole model's.
    tables: Vec<ParamTable>,
    whole: ParamTable,
    /// Tensors held by the first and the last stage both (a tied embedding): their ranges in this
    /// rank's table when it is one of the two.
    tied: Vec<Range<usize>>,
    /// The ranges of this rank's buffer the gradient norm counts.
    norm: Vec<Range<usize>>,
    /// Time spent summing over the group outside the passes.
    busy: Duration,
    /// The last step's passes on this rank.
    pub last: Run,
}

impl std::fmt::Debug for PipelineTraining {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineTraining").field("group", &self.group).field("stages", &self.stages).finish_non_exhaustive()
    }
}

impl PipelineTraining {
    /// Rank `group.me` of the pp group `group`, running `schedule` with `model` (its stage,
    /// `stages[group.me]`).
    pub fn new(comm: Arc<AsyncComm>, group: Group, schedule: Schedule, stages: Vec<PpStage>, model: &Model) -> Result<PipelineTraining> {
        let me = group.me;
        let tables = stages
            .iter()
            .enumerate()
            .map(|(r, s)| {
                if r == me {
                    return Ok(model.table.clone());
                }
                let whole = Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS);
                Ok(Model::with_stage(model.config.clone(), whole, TpRank::WHOLE, SpRank::WHOLE, s.clone())?.table)
            })
            .collect::<Result<Vec<_>>>()?;
        let whole = model.whole_table()?;
        let held = |r: usize, name: &str| tables[r].find(name).is_some_and(|e| e.at.len > 0);
        let (first, _) = schedule.place(0);
        let (last, _) = schedule.place(schedule.last_stage());
        let mut tied = Vec::new();
        let mut norm: Vec<Range<usize>> = Vec::new();
        for e in model.table.entries() {
            if first != last && (me == first || me == last) && held(first, &e.name) && held(last, &e.name) {
                tied.push(e.at.range());
            }
            // Counted by the lowest rank holding it.
            if (0..me).any(|r| held(r, &e.name)) {
                continue;
            }
            match norm.last_mut() {
                Some(n) if n.end == e.at.offset => n.end = e.at.range().end,
                _ => norm.push(e.at.range()),
            }
        }
        let runner = PipelineRank::new(comm.clone(), group.clone());
        Ok(PipelineTraining {
            comm,
            group,
            runner,
            schedule,
            stages,
            tables,
            whole,
            tied,
            norm,
            busy: Duration::ZERO,
            last: Run::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.group.me
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// The whole model's table (what `assemble` lays its result out by).
    pub fn whole_table(&self) -> &ParamTable {
        &self.whole
    }

    /// The ranges of this rank's buffer that its part of the gradient norm counts.
    pub fn norm_spans(&self) -> &[Range<usize>] {
        &self.norm
    }

    /// This rank's passes of one step over `batches` (see `PipelineRank::run`), then the tied
    /// tensors' gradients summed between the first and the last stage: this rank's part of the
    /// summed loss (the head's rank holds it all).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        model: &Model,
        params: &[f32],
        grads: &mut [f32],
        batches: &[&[u32]],
        shape: (usize, usize),
        scale: f32,
    ) -> Result<f64> {
        self.last = self.runner.run(&self.schedule, model, params, grads, batches, shape, scale)?;
        let start = std::time::Instant::now();
        for r in self.tied.clone() {
            self.runner.tie(&self.schedule, grads, r)?;
        }
        self.busy += start.elapsed();
        Ok(self.last.loss)
    }

    /// The group's sum of a per-rank value.
    pub fn sum(&mut self, x: f64) -> Result<f64> {
        let g = self.group.clone();
        let start = std::time::Instant::now();
        let v = self.comm.run(move |c| {
            let mut v = [x];
            c.all_reduce_f64(&g, &mut v)?;
            Ok(v[0])
        })?;
        self.busy += start.elapsed();
        Ok(v)
    }

    /// Each stage's idle share of the last step, in the group's order (every rank gets them).
    pub fn stage_idle(&mut self) -> Result<Vec<f64>> {
        let (g, n, me) = (self.group.clone(), self.size(), self.rank());
        let mut v = vec![0.0f64; n];
        v[me] = self.last.idle_fraction();
        self.comm.run(move |c| {
            c.all_reduce_f64(&g, &mut v)?;
            Ok(v)
        })
    }

    /// The time this rank waited in the last step (for messages between its passes, and for the
    /// group's sums) since the last call.
    pub fn take_comm_time(&mut self) -> Duration {
        let busy: f64 = self.last.timeline.iter().map(|(_, a, b)| b - a).sum();
        let waited = Duration::from_secs_f64((self.last.span - busy).max(0.0));
        std::mem::take(&mut self.busy) + waited
    }

    /// The whole model's values of a buffer in this rank's table layout (`local`: the
    /// parameters or a moment), put together from every stage's by name; every rank takes part,
    /// `keep` ranks get it.
    pub fn assemble(&mut self, local: &[f32], keep: bool) -> Result<Option<Vec<f32>>> {
        let longest = self.tables.iter().map(ParamTable::len).max().unwrap_or(0);
        let (n, me) = (self.size(), self.rank());
        let mut all = vec![0.0f32; longest * n];
        all[me * longest..][..local.len()].copy_from_slice(local);
        let g = self.group.clone();
        let all = self.comm.run(move |c| {
            c.all_gather(&g, &mut all)?;
            Ok(all)
        })?;
        if !keep {
            return Ok(None);
        }
        let mut whole = vec![0.0f32; self.whole.len()];
        for w in self.whole.entries() {
            let from = (0..n).find_map(|r| self.tables[r].find(&w.name).filter(|e| e.at.len > 0).map(|e| (r, e.at)));
            if let Some((r, at)) = from {
                w.at.get_mut(&mut whole).copy_from_slice(at.get(&all[r * longest..][..self.tables[r].len()]));
            }
        }
        Ok(Some(whole))
    }
}
