//! Data parallelism over the parameter table's chunks, with ZeRO stages 1-3.
//!
//! Every rank of the dp group trains on its slice of each global batch (the data order does not
//! depend on how the batch is split). The chunks of the parameter table are the unit of
//! everything here: each chunk is split evenly across the ranks (`shard_range`), and rank r owns
//! piece r of every chunk, so shards stay balanced and a chunk's communication is one collective.
//!
//! - **DDP (ZeRO-0):** as soon as backward announces that a chunk's gradients are final, a copy of
//!   the chunk is all-reduced on the communication thread while backward goes on; with gradient
//!   accumulation only the last micro-batch communicates.
//! - **ZeRO-1:** the same gradients; AdamW's moments and the update exist only for the rank's
//!   pieces, and an all-gather per chunk brings back the updated parameters.
//! - **ZeRO-2:** each finished chunk is reduce-scattered instead, the rank keeps its summed piece,
//!   and the chunk's gradient pages are returned to the OS: the full gradient buffer is never
//!   resident at once.
//! - **ZeRO-3:** parameters too live as pieces: a chunk is gathered just before the model reads it
//!   (the next one prefetched in the direction of travel) and released when the model moves on.
//!
//! Clipping is exact at every stage: the norm comes from the summed gradient (full, or the pieces'
//! squares summed across the group). The same norm decides, on every rank alike, that a step whose
//! gradients are not finite is skipped (`skip_step`).

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pages;
use super::{FinalGrads, SequenceParallel, TensorParallel};
use crate::backend::Cpu;
use crate::comm::{shard_range, AsyncComm, Group, Pending, ReduceOp};
use crate::models::hooks::{Hooked, ParamHooks, SequenceGroup, TensorGroup, WithGroup};
use crate::models::{Activations, Model};
use crate::params::ParamTable;
use crate::train::step::{Layout, State};
use crate::train::update::{self, LossScale, Outcome, Summed, Update};
use crate::{Error, Result};

pub struct DataParallel {
    comm: Arc<AsyncComm>,
    group: Group,
    zero: u8,
    /// The tp group of a tp × dp job (ZeRO 0 or 1): each dp rank's model is a part of the
    /// whole, and the dp group holds the replicas of the same part.
    tp: Option<TensorParallel>,
    /// The sp group of a job with sequence parallelism: the dp group spans dp × sp (every rank
    /// of it holds the same parameters, with the gradients of its own tokens).
    sp: Option<SequenceParallel>,
    chunks: Vec<Range<usize>>,
    /// This rank's piece of each chunk (absolute ranges of the flat buffer).
    pieces: Vec<Range<usize>>,
    /// Where each piece starts in the rank's shard arrays (moments, ZeRO-2/3 gradients).
    piece_at: Vec<usize>,
    /// Which chunks this backward has finished.
    finals: FinalGrads,
    /// Whether this backward's gradients are communicated (the last micro-batch, or every one
    /// under ZeRO-2/3).
    communicate: bool,
    inflight: Vec<(usize, Pending<Vec<f32>>)>,
    /// Bytes of gradient copies queued or in flight (counted in the memory figures).
    inflight_bytes: u64,
    /// ZeRO-2/3: the summed gradients of this rank's pieces.
    pub grad_shard: Vec<f32>,
    /// ZeRO-3: which chunks are gathered now, and the one being prefetched.
    gathered: Vec<bool>,
    prefetch: Option<(usize, Pending<Vec<f32>>)>,
    /// ZeRO-3: whether the model is going down the table (backward), judged from the first chunk
    /// of its last two requests.
    descending: bool,
    last_first: Option<usize>,
    /// Communication-thread busy time and the part the trainer waited for, since last taken.
    comm_busy: Duration,
    exposed: Duration,
    /// The gradient collectives alone: busy time, and the part training waited for after backward.
    grad_busy: Duration,
    grad_exposed: Duration,
    /// Bytes of gradient copies allowed in flight at once (two of the largest chunk): backward
    /// waits for the oldest collective beyond that, so a burst of final gradients (a whole
    /// embedding) never holds more than that in copies.
    inflight_cap: u64,
    /// Resident bytes of the parameter and gradient buffers when last measured (each changes
    /// only at the hooks and in the step: releases, gathers, the model's writes before
    /// `grads_ready`).
    params_bytes: u64,
    grads_bytes: u64,
    /// The most bytes held at once since last taken: parameters and gradients resident, copies
    /// in flight, the chunk being prefetched and any gather buffer.
    peak: u64,
    /// The most held in the last step's backward or update (see `take_step_peak`).
    step_peak: u64,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel").field("group", &self.group).field("zero", &self.zero).field("chunks", &self.chunks.len()).finish()
    }
}

impl DataParallel {
    /// Data parallelism over `group` (the ranks holding the same parameters: the mesh's dp
    /// axis, times its sp axis), over `table` (this rank's model), at ZeRO stage `zero`; `tp` is
    /// the rank's tp group when the model is cut across one, `sp` its sp group when it runs a
    /// part of each sequence.
    pub fn new(
        comm: Arc<AsyncComm>,
        group: Group,
        zero: u8,
        table: &ParamTable,
        tp: Option<TensorParallel>,
        sp: Option<SequenceParallel>,
    ) -> Result<DataParallel> {
        if zero > 3 {
            return Err(Error::Unsupported { field: "parallel.zero".into(), message: format!("ZeRO stage {zero} does not exist") });
        }
        let (n, me) = (group.size(), group.me);
        let chunks: Vec<Range<usize>> = table.chunks().iter().map(|c| c.range.clone()).collect();
        let pieces: Vec<Range<usize>> = chunks
            .iter()
            .map(|c| {
                let r = shard_range(c.len(), n, me);
                c.start + r.start..c.start + r.end
            })
            .collect();
        let mut piece_at = Vec::with_capacity(pieces.len());
        let mut at = 0;
        for p in &pieces {
            piece_at.push(at);
            at += p.len();
        }
        let grad_shard = if zero >= 2 { vec![0.0; at] } else { Vec::new() };
        let max_chunk = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        Ok(DataParallel {
            comm,
            group,
            zero,
            tp,
            sp,
            finals: FinalGrads::new(chunks.clone()),
            gathered: vec![true; chunks.len()],
            chunks,
            pieces,
            piece_at,
            communicate: false,
            inflight: Vec::new(),
            inflight_bytes: 0,
            grad_shard,
            prefetch: None,
            descending: false,
            last_first: None,
            comm_busy: Duration::ZERO,
            exposed: Duration::ZERO,
            grad_busy: Duration::ZERO,
            grad_exposed: Duration::ZERO,
            inflight_cap: 2 * 4 * max_chunk as u64,
            params_bytes: 0,
            grads_bytes: 0,
            peak: 0,
            step_peak: 0,
        })
    }

    /// The rank's tp group, when its model is cut across one.
    pub fn tensor_parallel(&mut self) -> Option<&mut TensorParallel> {
        self.tp.as_mut()
    }

    /// The rank's sp group, when it runs a part of each sequence.
    pub fn sequence_parallel(&mut self) -> Option<&mut SequenceParallel> {
        self.sp.as_mut()
    }

    /// This rank's position in the dp group.
    pub fn rank(&self) -> usize {
        self.group.me
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    pub fn zero(&self) -> u8 {
        self.zero
    }

    /// The parts of the flat buffer whose optimizer state this rank holds.
    pub fn pieces(&self) -> Vec<Range<usize>> {
        if self.zero >= 1 {
            self.pieces.clone()
        } else {
            std::iter::once(0..self.chunks.last().map_or(0, |c| c.end)).collect()
        }
    }

    /// Once, before training: under ZeRO-3 the rank keeps only its pieces of the parameters.
    pub fn setup(&mut self, params: &mut [f32]) {
        if self.zero >= 3 {
            for c in 0..self.chunks.len() {
                self.release_chunk(params, c);
            }
        }
        self.measure(Some(params), None);
    }

    /// Before each micro-batch's forward and backward.
    pub fn begin_micro_batch(&mut self, last: bool) {
        self.communicate = last || self.zero >= 2;
        self.descending = false;
        self.last_first = None;
        self.finals.reset();
    }

    /// After each micro-batch's backward: waits for its communication and puts the results in
    /// place (summed chunks into `grads`, or summed pieces into `grad_shard`).
    pub fn end_micro_batch(&mut self, grads: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        self.collect(grads, true)?;
        self.exposed += start.elapsed();
        self.grad_exposed += start.elapsed();
        self.finals.check_all_final()
    }

    /// The gradients of a step whose backward passes ran without the hooks (a pipeline stage's,
    /// whose micro-batches' backward passes interleave with forward ones): all of them
    /// communicated at once, as the hooks would have after the last micro-batch (ZeRO-0 and 1).
    pub fn reduce_all(&mut self, grads: &mut [f32]) -> Result<()> {
        self.begin_micro_batch(true);
        let len = grads.len();
        ParamHooks::grads_ready(self, grads, 0..len)?;
        self.end_micro_batch(grads)
    }

    /// Applies finished gradient collectives in order: all of them (`block`), or those already
    /// done. Applying early frees their buffers while backward goes on.
    fn collect(&mut self, grads: &mut [f32], block: bool) -> Result<()> {
        while !self.inflight.is_empty() {
            let (c, pending) = self.inflight.remove(0);
            let (buf, busy) = if block {
                pending.wait()?
            } else {
                match pending.try_wait() {
                    Ok(r) => r?,
                    Err(p) => {
                        self.inflight.insert(0, (c, p));
                        break;
                    }
                }
            };
            self.apply(grads, c, buf, busy);
        }
        Ok(())
    }

    /// Waits for the oldest gradient collectives until `bytes` more fit under the cap on copies
    /// in flight.
    fn make_room(&mut self, grads: &mut [f32], bytes: u64) -> Result<()> {
        while !self.inflight.is_empty() && self.inflight_bytes + bytes > self.inflight_cap {
            let (c, pending) = self.inflight.remove(0);
            let start = Instant::now();
            let (buf, busy) = pending.wait()?;
            self.exposed += start.elapsed();
            self.grad_exposed += start.elapsed();
            self.apply(grads, c, buf, busy);
        }
        Ok(())
    }

    /// Puts chunk `c`'s finished collective in place.
    fn apply(&mut self, grads: &mut [f32], c: usize, buf: Vec<f32>, busy: Duration) {
        self.comm_busy += busy;
        self.grad_busy += busy;
        self.inflight_bytes -= 4 * self.chunks[c].len() as u64;
        if self.zero >= 2 {
            // The job handed back only this rank's summed piece.
            let at = self.piece_at[c];
            for (d, s) in self.grad_shard[at..at + buf.len()].iter_mut().zip(&buf) {
                *d += *s;
            }
        } else {
            grads[self.chunks[c].clone()].copy_from_slice(&buf);
        }
    }

    /// The chunks `range` overlaps.
    fn chunks_of(&self, range: &Range<usize>) -> Range<usize> {
        self.finals.chunks_of(range)
    }

    /// The group's sum of a per-rank value.
    pub fn sum(&mut self, x: f64) -> Result<f64> {
        let g = self.group.clone();
        let start = Instant::now();
        let v = self.comm.run(move |c| {
            let mut v = [x];
            c.all_reduce_f64(&g, &mut v)?;
            Ok(v[0])
        })?;
        self.exposed += start.elapsed();
        self.comm_busy += start.elapsed();
        Ok(v)
    }

    /// After this rank's update of its pieces: whatever brings every rank the parameters it
    /// needs next (each chunk gathered from its owners under ZeRO-1 and 2; under ZeRO-3 the
    /// gathered copies, stale now, are released).
    pub fn bring_back_params(&mut self, params: &mut [f32]) -> Result<()> {
        match self.zero {
            1 | 2 => {
                for c in 0..self.chunks.len() {
                    let chunk = self.chunks[c].clone();
                    let full = self.gather_chunk(&params[chunk.clone()])?;
                    params[chunk].copy_from_slice(&full);
                }
            }
            3 => self.release_gathered(params)?,
            _ => {}
        }
        self.end_step();
        Ok(())
    }

    /// In place of `bring_back_params` for a step whose gradient norm is not finite (every rank
    /// calls one or the other alike, see `update`): the parameters and moments stay as they are,
    /// and the group is left as after an update, ready for the next step. Nothing is gathered:
    /// every rank's parameters are those it had, which are the group's.
    pub fn skip_step(&mut self, params: &mut [f32]) -> Result<()> {
        if self.zero >= 3 {
            // Still current, but released as after an update, so that a step holds the same
            // memory whether it was skipped or not.
            self.release_gathered(params)?;
        }
        self.end_step();
        Ok(())
    }

    /// After the update (or its skipping): the next step's reduce-scatters add into an empty
    /// gradient shard.
    fn end_step(&mut self) {
        if self.zero >= 2 {
            self.grad_shard.iter_mut().for_each(|x| *x = 0.0);
        }
    }

    /// ZeRO-3: keeps only this rank's pieces of the parameters (after any prefetch has landed).
    pub fn release_gathered(&mut self, params: &mut [f32]) -> Result<()> {
        self.drain_prefetch()?;
        for c in 0..self.chunks.len() {
            if self.gathered[c] {
                self.release_chunk(params, c);
            }
        }
        Ok(())
    }

    /// All-gathers chunk `c` given this rank's copy of it (its own piece filled in).
    fn gather_chunk(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        let start = Instant::now();
        let (buf, busy) = self.submit_gather(local.to_vec()).wait()?;
        self.comm_busy += busy;
        self.exposed += start.elapsed();
        Ok(buf)
    }

    fn submit_gather(&self, mut buf: Vec<f32>) -> Pending<Vec<f32>> {
        let g = self.group.clone();
        self.comm.submit(move |comm| {
            comm.all_gather(&g, &mut buf)?;
            Ok(buf)
        })
    }

    /// The chunks of the flat buffer: the units of communication and sharding.
    pub fn chunks(&self) -> &[Range<usize>] {
        &self.chunks
    }

    /// For ranks whose buffers live elsewhere (GPU ranks on the host-staged communicator): sums
    /// `buf` across the group. (The bulk methods do not count their time: see `record_comm`.)
    pub fn all_reduce_vec(&mut self, buf: Vec<f32>) -> Result<Vec<f32>> {
        let g = self.group.clone();
        self.comm.run(move |comm| {
            let mut buf = buf;
            comm.all_reduce(&g, &mut buf, ReduceOp::Sum)?;
            Ok(buf)
        })
    }

    /// As `all_reduce_vec` for ZeRO: every chunk of `buf` (the whole flat buffer) is
    /// reduce-scattered, so this rank's piece of each holds the group's sum; the rest is scratch.
    pub fn reduce_scatter_vec(&mut self, buf: Vec<f32>) -> Result<Vec<f32>> {
        self.per_chunk_vec(buf, true)
    }

    /// As `all_reduce_vec` for ZeRO: every chunk of `buf` is all-gathered from its owners' pieces.
    pub fn all_gather_vec(&mut self, buf: Vec<f32>) -> Result<Vec<f32>> {
        self.per_chunk_vec(buf, false)
    }

    /// Reduce-scatters (`reduce`) or all-gathers every chunk of `buf` on the communication
    /// thread, and waits for it.
    fn per_chunk_vec(&mut self, buf: Vec<f32>, reduce: bool) -> Result<Vec<f32>> {
        let (g, chunks) = (self.group.clone(), self.chunks.clone());
        self.comm.run(move |comm| {
            let mut buf = buf;
            for c in chunks {
                if reduce {
                    comm.reduce_scatter(&g, &mut buf[c])?;
                } else {
                    comm.all_gather(&g, &mut buf[c])?;
                }
            }
            Ok(buf)
        })
    }

    /// Counts communication training waited for outside the hooks (a GPU rank's collectives,
    /// NCCL or host-staged): `gradients` says whether they were the gradient collectives.
    pub fn record_comm(&mut self, took: Duration, gradients: bool) {
        self.comm_busy += took;
        self.exposed += took;
        if gradients {
            self.grad_busy += took;
            self.grad_exposed += took;
        }
    }

    /// This rank's pieces of a full buffer, concatenated.
    pub fn own_pieces(&self, full: &[f32]) -> Vec<f32> {
        self.pieces.iter().flat_map(|p| full[p.clone()].iter().copied()).collect()
    }

    /// ZeRO-3: gathers every chunk of the parameters, in place into `params` with `keep` (the
    /// rank that writes the final model), or taking part without keeping them, one chunk at a
    /// time (the others). Every rank calls it; `release_gathered` gives the memory back.
    pub fn gather_params(&mut self, params: &mut [f32], keep: bool) -> Result<()> {
        self.drain_prefetch()?;
        for c in 0..self.chunks.len() {
            let full = self.gather_chunk(&self.own_part(params, c))?;
            if keep {
                params[self.chunks[c].clone()].copy_from_slice(&full);
                self.gathered[c] = true;
            }
        }
        Ok(())
    }

    /// A buffer held as this rank's pieces (`shard`: the moments under ZeRO-1/2/3, concatenated)
    /// gathered whole, in the flat buffer's layout, with `keep`; every rank takes part, a chunk
    /// at a time.
    pub fn gather_pieces(&mut self, shard: &[f32], keep: bool) -> Result<Option<Vec<f32>>> {
        let len = self.chunks.last().map_or(0, |c| c.end);
        let mut full = keep.then(|| vec![0.0f32; len]);
        for c in 0..self.chunks.len() {
            let (chunk, piece) = (self.chunks[c].clone(), self.pieces[c].clone());
            let mut local = vec![0.0f32; chunk.len()];
            local[piece.start - chunk.start..piece.end - chunk.start].copy_from_slice(&shard[self.piece_at[c]..][..piece.len()]);
            let whole = self.gather_chunk(&local)?;
            if let Some(f) = &mut full {
                f[chunk].copy_from_slice(&whole);
            }
        }
        Ok(full)
    }

    /// Chunk `c` with only this rank's piece filled in (the released rest is not read: reading it
    /// would map zero pages that count as resident).
    fn own_part(&self, params: &[f32], c: usize) -> Vec<f32> {
        let (chunk, piece) = (&self.chunks[c], &self.pieces[c]);
        let mut v = vec![0.0; chunk.len()];
        v[piece.start - chunk.start..piece.end - chunk.start].copy_from_slice(&params[piece.clone()]);
        v
    }

    fn release_chunk(&mut self, params: &mut [f32], c: usize) {
        let (chunk, piece) = (self.chunks[c].clone(), self.pieces[c].clone());
        let held = pages::resident_bytes(&params[chunk.clone()]);
        pages::release(params, chunk.start..piece.start);
        pages::release(params, piece.end..chunk.end);
        self.gathered[c] = false;
        let left = pages::resident_bytes(&params[chunk]);
        self.params_bytes = self.params_bytes.saturating_sub(held.saturating_sub(left));
    }

    /// Puts gathered chunk `c` in place, and counts it with its receive buffer (both exist now).
    fn install(&mut self, params: &mut [f32], c: usize, buf: &[f32]) {
        let chunk = self.chunks[c].clone();
        // Only this chunk's pages change: count those that become resident, rather than asking
        // mincore about the whole buffer for every chunk (`need_params` measures it all once).
        let before = pages::resident_bytes(&params[chunk.clone()]);
        params[chunk.clone()].copy_from_slice(buf);
        self.gathered[c] = true;
        self.params_bytes += pages::resident_bytes(&params[chunk]).saturating_sub(before);
        self.record(4 * buf.len() as u64);
    }

    fn drain_prefetch(&mut self) -> Result<()> {
        if let Some((_, p)) = self.prefetch.take() {
            let (_, busy) = p.wait()?;
            self.comm_busy += busy;
        }
        Ok(())
    }

    /// Measures what is resident of the parameters (ZeRO-3 releases them) and of the gradients
    /// (ZeRO-2/3 release them); the others are whole.
    fn measure(&mut self, params: Option<&[f32]>, grads: Option<&[f32]>) {
        if let Some(p) = params {
            self.params_bytes = if self.zero >= 3 { pages::resident_bytes(p) } else { 4 * p.len() as u64 };
        }
        if let Some(g) = grads {
            self.grads_bytes = if self.zero >= 2 { pages::resident_bytes(g) } else { 4 * g.len() as u64 };
        }
    }

    /// Records what is held now, with `transient` bytes of a buffer about to be dropped.
    fn record(&mut self, transient: u64) {
        let prefetch = self.prefetch.as_ref().map_or(0, |(c, _)| 4 * self.chunks[*c].len() as u64);
        let now = self.params_bytes + self.grads_bytes + self.inflight_bytes + prefetch + transient;
        self.peak = self.peak.max(now);
    }

    /// Communication time since the last call: all collectives (busy on the communication
    /// thread, and waited for by training), then the gradient collectives alone (the same two).
    pub fn take_comm_time(&mut self) -> [Duration; 4] {
        [
            std::mem::take(&mut self.comm_busy),
            std::mem::take(&mut self.exposed),
            std::mem::take(&mut self.grad_busy),
            std::mem::take(&mut self.grad_exposed),
        ]
    }

    /// The most bytes of parameters, gradients and communication buffers held at once in the
    /// last step (its backward, or its update).
    pub fn take_step_peak(&mut self) -> u64 {
        std::mem::take(&mut self.step_peak)
    }

    /// The most bytes of parameters, gradients and communication buffers held at once since the
    /// last call (measured at the hooks, where they change, and now).
    pub fn take_peak(&mut self, params: &[f32], grads: &[f32]) -> u64 {
        self.measure(Some(params), Some(grads));
        self.record(0);
        let peak = self.peak;
        self.peak = 0;
        peak
    }
}

impl ParamHooks for DataParallel {
    fn need_params(&mut self, params: &mut [f32], ranges: &[Range<usize>]) -> Result<()> {
        if self.zero < 3 {
            return Ok(());
        }
        let mut want: Vec<usize> = ranges.iter().flat_map(|r| self.chunks_of(r)).collect();
        want.sort_unstable();
        want.dedup();
        // Release what the model has moved past (gathering again later is correct, only slower).
        for c in 0..self.chunks.len() {
            if self.gathered[c] && want.binary_search(&c).is_err() {
                self.release_chunk(params, c);
            }
        }
        // The prefetched chunk first, wherever it lies among those wanted (in backward it is the
        // top chunk of the block below). One not wanted after all is waited for (every rank runs
        // the collective alike) and dropped.
        if let Some((pc, p)) = self.prefetch.take() {
            let start = Instant::now();
            let (buf, busy) = p.wait()?;
            self.comm_busy += busy;
            self.exposed += start.elapsed();
            if want.binary_search(&pc).is_ok() && !self.gathered[pc] {
                self.install(params, pc, &buf);
            }
        }
        for &c in &want {
            if self.gathered[c] {
                continue;
            }
            let start = Instant::now();
            let (buf, busy) = self.submit_gather(self.own_part(params, c)).wait()?;
            self.comm_busy += busy;
            self.exposed += start.elapsed();
            self.install(params, c, &buf);
        }
        // Prefetch the next chunk in the direction the model is going: up the table while it asks
        // for higher chunks (forward, the head's slices in forward), down while it asks for lower
        // ones (backward, and the slices of a head tied to the embedding, which announce no
        // gradient on the way).
        if let (Some(&f), Some(p)) = (want.first(), self.last_first) {
            if f != p {
                self.descending = f < p;
            }
        }
        self.last_first = want.first().copied().or(self.last_first);
        let next = match (self.descending, want.first(), want.last()) {
            (false, _, Some(&l)) => l + 1,
            (true, Some(&f), _) => f.wrapping_sub(1),
            _ => usize::MAX,
        };
        if self.prefetch.is_none() && next < self.chunks.len() && !self.gathered[next] {
            self.prefetch = Some((next, self.submit_gather(self.own_part(params, next))));
        }
        self.measure(Some(params), None);
        self.record(0);
        Ok(())
    }

    fn grads_ready(&mut self, grads: &mut [f32], range: Range<usize>) -> Result<()> {
        self.collect(grads, false)?;
        for c in self.finals.announce(&range)? {
            if !self.communicate {
                continue;
            }
            let chunk = self.chunks[c].clone();
            self.make_room(grads, 4 * chunk.len() as u64)?;
            let copy = grads[chunk.clone()].to_vec();
            self.inflight_bytes += 4 * chunk.len() as u64;
            // The copy and the chunk's gradients both exist at this moment: measure here.
            self.measure(None, Some(grads));
            self.record(0);
            let g = self.group.clone();
            let pending = if self.zero >= 2 {
                // The rank keeps only its summed piece: the chunk's gradient pages go back (what
                // they held leaves the count; the whole buffer was just measured).
                let held = pages::resident_bytes(&grads[chunk.clone()]);
                pages::release(grads, chunk.clone());
                let left = pages::resident_bytes(&grads[chunk.clone()]);
                self.grads_bytes = self.grads_bytes.saturating_sub(held.saturating_sub(left));
                let piece = &self.pieces[c];
                let local = piece.start - chunk.start..piece.end - chunk.start;
                self.comm.submit(move |comm| {
                    let mut buf = copy;
                    comm.reduce_scatter(&g, &mut buf)?;
                    Ok(buf[local].to_vec())
                })
            } else {
                self.comm.submit(move |comm| {
                    let mut buf = copy;
                    comm.all_reduce(&g, &mut buf, ReduceOp::Sum)?;
                    Ok(buf)
                })
            };
            self.inflight.push((c, pending));
        }
        Ok(())
    }
}

/// `spans` (ranges of the flat buffer) where they fall in `pieces` (this rank's piece of each
/// chunk, in order), as offsets into the pieces concatenated (`piece_at`: where each starts).
fn within_pieces(spans: &[Range<usize>], pieces: &[Range<usize>], piece_at: &[usize]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    for (p, &at) in pieces.iter().zip(piece_at) {
        for s in spans {
            let (lo, hi) = (s.start.max(p.start), s.end.min(p.end));
            if lo < hi {
                out.push(at + lo - p.start..at + hi - p.start);
            }
        }
    }
    out
}

/// Data parallelism and ZeRO as a step's layout on CPU ranks (see `train::step`).
impl Layout<Cpu> for DataParallel {
    fn grads_start_zero(&self) -> bool {
        // Under ZeRO-2/3 the gradient buffer is already zero: its chunks were released.
        self.zero >= 2
    }

    fn forward_backward(
        &mut self,
        _: &Cpu,
        model: &Model,
        st: &mut State<'_, Cpu>,
        acts: &mut Activations,
        windows: &[u32],
        scale: f32,
        k: usize,
        n: usize,
    ) -> Result<f64> {
        self.begin_micro_batch(k + 1 == n);
        // The tp and sp groups are lent to the model beside the hooks (all are this wrapper's).
        let (mut tp, mut sp) = (self.tp.take(), self.sp.take());
        // Parts several tp ranks hold alike get their partial gradients summed over those ranks
        // as they become final (`TensorGroup::grads_final`, before these hooks shard or sum
        // them over the dp group), in each backward whose gradients are communicated: the sum
        // is linear, so once per step at ZeRO-0/1 and per micro-batch at ZeRO-2/3.
        if let Some(tp) = &mut tp {
            tp.sum_shared_when_final(self.communicate);
        }
        let mut hooked = Hooked { params: st.params, hooks: self };
        let loss = if tp.is_some() || sp.is_some() {
            let tp = tp.as_mut().map(|g| g as &mut dyn TensorGroup<Cpu>);
            let sp = sp.as_mut().map(|g| g as &mut dyn SequenceGroup<Cpu>);
            model.forward_backward_on(&Cpu, &mut WithGroup { inner: &mut hooked, tp, sp }, st.grads, acts, windows, scale)
        } else {
            model.forward_backward_on(&Cpu, &mut hooked, st.grads, acts, windows, scale)
        };
        (self.tp, self.sp) = (tp, sp);
        let loss = loss?;
        self.end_micro_batch(st.grads)?;
        Ok(loss)
    }

    fn sum(&mut self, x: f64) -> Result<f64> {
        DataParallel::sum(self, x)
    }

    /// Under ZeRO-0 and 1 every rank holds the same summed gradients (the all-reduce leaves the
    /// same bits on every rank), so the norm needs no communication; under ZeRO-2 and 3 the rank
    /// holds its summed pieces (`grad_shard`), whose squares the group adds. Either way every rank
    /// gets the same norm, and skips a step alike.
    fn update(&mut self, be: &Cpu, u: &Update<'_>, st: &mut State<'_, Cpu>, scaler: Option<&mut LossScale>) -> Result<Outcome> {
        self.step_peak = self.take_peak(st.params, st.grads);
        let mut shard = std::mem::take(&mut self.grad_shard);
        let outcome = if self.zero >= 2 {
            let len = shard.len();
            // Under tp, the parts of the pieces this rank counts in the norm (its own shards, and
            // whole tensors on the lead alone), as offsets into the concatenated pieces.
            let norm = match &self.tp {
                Some(tp) => within_pieces(tp.norm_spans(), &self.pieces, &self.piece_at),
                None => std::iter::once(0..len).collect(),
            };
            let mut sum = |x: f64| {
                let x = DataParallel::sum(self, x)?;
                match &mut self.tp {
                    Some(tp) => tp.sum(x),
                    None => Ok(x),
                }
            };
            let summed = Summed::Pieces { grads: &mut shard[..], norm: &norm };
            update::apply(be, u, st.params, None, summed, st.m, st.v, Some(&mut sum), scaler)
        } else if let Some(tp) = &mut self.tp {
            // Every dp rank holds the same sums (their shared parts summed over the tp group as
            // they became final); the tp group adds its ranks' squares.
            let norm = tp.norm_spans().to_vec();
            let summed = Summed::Full { grads: &mut *st.grads, norm: &norm };
            let mut sum = |x: f64| tp.sum(x);
            update::apply(be, u, st.params, None, summed, st.m, st.v, Some(&mut sum), scaler)
        } else {
            let whole = std::iter::once(0..st.len).collect::<Vec<_>>();
            let summed = Summed::Full { grads: &mut *st.grads, norm: &whole };
            update::apply(be, u, st.params, None, summed, st.m, st.v, None, scaler)
        };
        self.grad_shard = shard;
        outcome
    }

    fn after_update(&mut self, _: &Cpu, st: &mut State<'_, Cpu>, applied: bool) -> Result<()> {
        if applied {
            self.bring_back_params(st.params)?;
        } else {
            self.skip_step(st.params)?;
        }
        // Peak of parameters, gradients and communication buffers in backward, or during the
        // update.
        self.step_peak = self.step_peak.max(self.take_peak(st.params, st.grads));
        Ok(())
    }
}
