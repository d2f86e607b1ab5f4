//! Tensor parallelism (Megatron's 1D layout) on CPU ranks: the collectives a model cut across a
//! tp group runs inside its layers (`models::hooks::TensorGroup`), what the update needs of the
//! group, and putting the ranks' parts back together for checkpoints and the final model.
//!
//! The model says which part of each layer a rank holds (`models::TpRank`) and when its partial
//! results are summed; this module runs the sums over the tp group of the mesh, on the
//! communication thread the job's other collectives use (so a tp × dp job's collectives keep one
//! order on every rank). For the update:
//!
//! - **Whole parameters** (norms, row-parallel biases, GPT-2's position table) get the same
//!   gradient on every rank (their inputs are the same after the sums), so the rank's updates
//!   agree without communication; the lead rank alone counts them in the gradient norm.
//! - **Sharded parameters** are each rank's own. A part held by several ranks (LLaMA's key/value
//!   heads when there are fewer than ranks) gets a partial gradient on each, summed over those
//!   ranks before the update (`reduce_shared`), or inside a dp wrapper as its gradient becomes
//!   final (`TensorGroup::grads_final`, so that ZeRO shards complete sums); the first of them
//!   counts it in the norm.
//! - Under split_gather the whole parameters see only a rank's tokens, and are summed alike.
//!
//! So the group's sum of the ranks' squares is the whole model's, and every rank clips alike.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_kernels::cpu::loss::{xent_combine, XENT_STATS};

use crate::backend::{Accumulate, Cpu, Span, SpanMut};
use crate::comm::{AsyncComm, Axis, DeviceMesh, Group, ReduceOp};
use crate::models::hooks::{TensorGroup, WithGroup};
use crate::models::{Activations, Model};
use crate::params::{assemble, ParamTable};
use crate::train::step::{Layout, State};
use crate::train::update::{self, LossScale, Outcome, Summed, Update};
use crate::Result;

pub struct TensorParallel {
    comm: Arc<AsyncComm>,
    group: Group,
    /// The whole model's table and every rank's, in group order.
    whole: ParamTable,
    tables: Vec<ParamTable>,
    /// Sharded parameters this rank holds alike with other ranks (their gradients are partial
    /// sums): the range, and the group of the ranks holding it.
    shared: Vec<(Range<usize>, Group)>,
    /// The parts of the flat buffer this rank counts in the gradient norm.
    norm: Vec<Range<usize>>,
    /// Time spent in the group's collectives since last taken.
    busy: Duration,
    /// Whether shared parts are summed as their gradients become final (inside a dp wrapper)
    /// rather than before the update (`reduce_shared`).
    sum_when_final: bool,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallel").field("group", &self.group).field("shared", &self.shared.len()).finish()
    }
}

impl TensorParallel {
    /// The tp group of `comm`'s rank in `mesh`, for `model` (this rank's part of it).
    pub fn new(comm: Arc<AsyncComm>, mesh: &DeviceMesh, model: &Model) -> Result<TensorParallel> {
        let group = mesh.group(Axis::Tp, comm.rank());
        let tp = model.tp;
        debug_assert_eq!((tp.rank, tp.size), (group.me, group.size()));
        let tables = model.group_tables()?;
        let whole = model.whole_table()?;
        let (mut shared, mut norm) = (Vec::new(), Vec::new());
        for (i, e) in model.table.entries().iter().enumerate() {
            let Some(shard) = &e.shard else {
                if tp.lead() {
                    norm.push(e.at.range());
                }
                // Under split_gather each rank's gradient of a whole parameter is its part of
                // each sequence's.
                if tp.splits_seq() {
                    shared.push((e.at.range(), group.clone()));
                }
                continue;
            };
            let holders: Vec<usize> =
                (0..tp.size).filter(|&r| tables[r].entries()[i].shard.as_ref().is_some_and(|s| s.range == shard.range)).collect();
            if holders[0] == tp.rank {
                norm.push(e.at.range());
            }
            if holders.len() > 1 {
                let me = holders.iter().position(|&r| r == tp.rank).expect("a rank holds its own part");
                shared.push((e.at.range(), Group { ranks: holders.iter().map(|&r| group.ranks[r]).collect(), me }));
            }
        }
        Ok(TensorParallel {
            comm,
            group,
            whole,
            tables,
            shared: merge_shared(shared),
            norm: merge(norm),
            busy: Duration::ZERO,
            sum_when_final: false,
        })
    }

    pub fn rank(&self) -> usize {
        self.group.me
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// The whole model's parameter table (checkpoints and exports are laid out by it).
    pub fn whole_table(&self) -> &ParamTable {
        &self.whole
    }

    /// The parts of the flat buffer this rank counts in the gradient norm.
    pub fn norm_spans(&self) -> &[Range<usize>] {
        &self.norm
    }

    /// Time spent in the group's collectives since last taken.
    pub fn take_comm_time(&mut self) -> Duration {
        std::mem::take(&mut self.busy)
    }

    fn run<T: Send + 'static>(&mut self, f: impl FnOnce(&mut crate::comm::Comm, &Group) -> Result<T> + Send + 'static) -> Result<T> {
        let start = Instant::now();
        let g = self.group.clone();
        let r = self.comm.run(move |c| f(c, &g));
        self.busy += start.elapsed();
        r
    }

    /// Bytes this rank has sent so far (over every group of its communicator).
    pub fn traffic(&mut self) -> Result<u64> {
        self.comm.run(|c| Ok(c.traffic().0))
    }

    /// The group's sum of a per-rank value, in f64.
    pub fn sum(&mut self, x: f64) -> Result<f64> {
        self.run(move |c, g| {
            let mut v = [x];
            c.all_reduce_f64(g, &mut v)?;
            Ok(v[0])
        })
    }

    /// Sums the gradients of the parts several ranks hold over those ranks (once, after the
    /// last micro-batch's backward: the sum is linear).
    pub fn reduce_shared(&mut self, grads: &mut [f32]) -> Result<()> {
        for (range, g) in self.shared.clone() {
            let buf = grads[range.clone()].to_vec();
            let start = Instant::now();
            let buf = self.comm.run(move |c| {
                let mut buf = buf;
                c.all_reduce(&g, &mut buf, ReduceOp::Sum)?;
                Ok(buf)
            })?;
            self.busy += start.elapsed();
            grads[range].copy_from_slice(&buf);
        }
        Ok(())
    }

    /// Whether this backward sums shared parts as their gradients become final
    /// (`TensorGroup::grads_final`): a dp wrapper turns it on for the backward passes whose
    /// gradients it communicates.
    pub fn sum_shared_when_final(&mut self, on: bool) {
        self.sum_when_final = on;
    }

    /// As `reduce_shared`, for the shared parts inside `range` only.
    fn reduce_shared_in(&mut self, grads: &mut [f32], range: &Range<usize>) -> Result<()> {
        let inside: Vec<_> = self.shared.iter().filter(|(r, _)| range.start <= r.start && r.end <= range.end).cloned().collect();
        for (r, g) in inside {
            let buf = grads[r.clone()].to_vec();
            let start = Instant::now();
            let buf = self.comm.run(move |c| {
                let mut buf = buf;
                c.all_reduce(&g, &mut buf, ReduceOp::Sum)?;
                Ok(buf)
            })?;
            self.busy += start.elapsed();
            grads[r].copy_from_slice(&buf);
        }
        Ok(())
    }

    /// The whole model's values of a buffer in this rank's table layout (`local`: parameters or
    /// a moment), put together from every rank's; every rank takes part, `keep` ranks get it.
    pub fn assemble(&mut self, local: &[f32], keep: bool) -> Result<Option<Vec<f32>>> {
        // One all-gather of every rank's buffer, padded to the longest.
        let longest = self.tables.iter().map(ParamTable::len).max().unwrap_or(0);
        let n = self.size();
        let mut all = vec![0.0f32; longest * n];
        all[self.rank() * longest..][..local.len()].copy_from_slice(local);
        let all = self.run(move |c, g| {
            let mut all = all;
            c.all_gather(g, &mut all)?;
            Ok(all)
        })?;
        if !keep {
            return Ok(None);
        }
        let parts: Vec<&[f32]> = self.tables.iter().enumerate().map(|(r, t)| &all[r * longest..][..t.len()]).collect();
        let mut whole = vec![0.0; self.whole.len()];
        assemble(&self.whole, &self.tables, &parts, &mut whole);
        Ok(Some(whole))
    }
}

/// Adjacent ranges merged.
fn merge(ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// Adjacent ranges summed over the same group merged (one collective each).
fn merge_shared(ranges: Vec<(Range<usize>, Group)>) -> Vec<(Range<usize>, Group)> {
    let mut out: Vec<(Range<usize>, Group)> = Vec::with_capacity(ranges.len());
    for (r, g) in ranges {
        match out.last_mut() {
            Some((last, lg)) if last.end == r.start && lg.ranks == g.ranks => last.end = r.end,
            _ => out.push((r, g)),
        }
    }
    out
}

fn seq_shape_error(what: String) -> crate::Error {
    crate::Error::Unsupported { field: "parallel.sp_mode".into(), message: what }
}

impl TensorGroup<Cpu> for TensorParallel {
    fn all_reduce(&mut self, x: SpanMut<'_, [f32]>) -> Result<()> {
        let range = x.range.clone();
        let buf = x.buf[range.clone()].to_vec();
        let sum = self.run(move |c, g| {
            let mut buf = buf;
            c.all_reduce(g, &mut buf, ReduceOp::Sum)?;
            Ok(buf)
        })?;
        x.buf[range].copy_from_slice(&sum);
        Ok(())
    }

    fn combine_xent(&mut self, stats: &mut [f32], rows: usize) -> Result<()> {
        let (k, n) = (rows * XENT_STATS, self.size());
        let mut all = vec![0.0f32; k * n];
        all[self.rank() * k..][..k].copy_from_slice(&stats[..k]);
        let all = self.run(move |c, g| {
            let mut all = all;
            c.all_gather(g, &mut all)?;
            Ok(all)
        })?;
        let parts: Vec<&[f32]> = all.chunks(k).collect();
        xent_combine(&parts, &mut stats[k..2 * k]);
        Ok(())
    }

    fn grads_final(&mut self, grads: &mut [f32], range: Range<usize>) -> Result<()> {
        if self.sum_when_final {
            self.reduce_shared_in(grads, &range)?;
        }
        Ok(())
    }

    fn gather_seq(&mut self, local: Span<'_, [f32]>, b: usize, full: SpanMut<'_, [f32]>) -> Result<()> {
        let (n, k) = (self.size(), local.len());
        if b == 0 || !k.is_multiple_of(b) || full.len() != n * k {
            return Err(seq_shape_error(format!("{k} elements of {b} sequences into {} over {n} ranks", full.len())));
        }
        let mut all = vec![0.0f32; k * n];
        all[self.rank() * k..][..k].copy_from_slice(&local.buf[local.range]);
        let all = self.run(move |c, g| {
            let mut all = all;
            c.all_gather(g, &mut all)?;
            Ok(all)
        })?;
        // Rank i's block holds its part (`k / b` elements) of each sequence: part i of it.
        let part = k / b;
        let out = &mut full.buf[full.range];
        for i in 0..n {
            for s in 0..b {
                out[(s * n + i) * part..][..part].copy_from_slice(&all[i * k + s * part..][..part]);
            }
        }
        Ok(())
    }

    fn scatter_seq(&mut self, full: Span<'_, [f32]>, b: usize, local: SpanMut<'_, [f32]>, acc: Accumulate) -> Result<()> {
        let (n, k) = (self.size(), local.len());
        if b == 0 || !k.is_multiple_of(b) || full.len() != n * k {
            return Err(seq_shape_error(format!("{} elements over {n} ranks into {k} of {b} sequences", full.len())));
        }
        // Rank-major: block i is rank i's part of each sequence, which the reduce-scatter sums
        // and leaves with rank i.
        let (part, src) = (k / b, &full.buf[full.range]);
        let mut send = vec![0.0f32; k * n];
        for i in 0..n {
            for s in 0..b {
                send[i * k + s * part..][..part].copy_from_slice(&src[(s * n + i) * part..][..part]);
            }
        }
        let (send, mine) = self.run(move |c, g| {
            let mut send = send;
            let mine = c.reduce_scatter(g, &mut send)?;
            Ok((send, mine))
        })?;
        let out = &mut local.buf[local.range];
        match acc {
            Accumulate::Overwrite => out.copy_from_slice(&send[mine]),
            Accumulate::Add => out.iter_mut().zip(&send[mine]).for_each(|(o, x)| *o += x),
        }
        Ok(())
    }
}

/// A tensor-parallel rank with no data parallelism, as a step's layout (see `train::step`).
impl Layout<Cpu> for TensorParallel {
    fn forward_backward(
        &mut self,
        be: &Cpu,
        model: &Model,
        st: &mut State<'_, Cpu>,
        acts: &mut Activations,
        windows: &[u32],
        scale: f32,
        _: usize,
        _: usize,
    ) -> Result<f64> {
        let mut w = State::weights(be, st.params, None)?;
        model.forward_backward_on(be, &mut WithGroup { inner: &mut w, tp: Some(self), sp: None }, st.grads, acts, windows, scale)
    }

    /// Every rank of the group has the whole loss already (the head combines it).
    fn sum(&mut self, x: f64) -> Result<f64> {
        Ok(x)
    }

    fn update(&mut self, be: &Cpu, u: &Update<'_>, st: &mut State<'_, Cpu>, scaler: Option<&mut LossScale>) -> Result<Outcome> {
        self.reduce_shared(st.grads)?;
        let norm = self.norm.clone();
        let summed = Summed::Full { grads: &mut *st.grads, norm: &norm };
        let mut sum = |x: f64| self.sum(x);
        update::apply(be, u, st.params, None, summed, st.m, st.v, Some(&mut sum), scaler)
    }

    fn after_update(&mut self, _: &Cpu, _: &mut State<'_, Cpu>, _: bool) -> Result<()> {
        Ok(())
    }
}
