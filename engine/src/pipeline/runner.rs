//! The one runner of every schedule: a rank walks its list of passes (`Schedule::ranks`), each
//! pass a micro-batch through one of its chunks, with the activations crossing to the
//! neighbouring stages point to point over the pp group's communicator (sends queued on the
//! communication thread while compute goes on; receives waited for when the pass needs them).
//!
//! A forward pass on the first virtual stage embeds the micro-batch; elsewhere it receives the
//! residual stream from the previous stage. On the last stage the forward also runs the head,
//! forward and backward (the loss and its gradient are known as soon as the logits are), so the
//! backward that follows starts from the residual's gradient like every other stage's. A
//! backward pass receives that gradient from the next stage, runs its blocks backward, and sends
//! the input's gradient back (the first stage runs the embedding's backward instead). A tied
//! embedding lives on the first and the last stage; after the last pass the two copies' gradients
//! are summed between them (`tie`), as the whole model's single tensor would have summed them.
//!
//! Each micro-batch in flight on a chunk holds its own `Activations`, taken from a pool and given
//! back after its backward, so the pool's size is the number of micro-batches alive at once:
//! 1F1B keeps at most `pp` per stage, GPipe all of them (`Run::peak_in_flight`).
//!
//! Not built yet: the split backward of zbv (its `B` runs the whole backward, its `W` nothing, so
//! the losses are zbv's but the bubble is 1F1B's), and pairing a send with the receive going the
//! other way (a rank's communication thread runs them in order, so two neighbours sending each
//! other messages larger than the socket buffers at the same moment would wait on each other).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::schedule::{Action, Pass, Schedule};
use crate::comm::{AsyncComm, Group, Pending, ReduceOp};
use crate::models::{Activations, Model};
use crate::{Error, Result};

/// A rank's pipeline group and what its passes left behind.
pub struct PipelineRank {
    comm: Arc<AsyncComm>,
    /// The pp group: member `s` runs stage `s` (and, with chunks, the stages `Schedule::stage`
    /// gives it).
    pub group: Group,
    pool: Vec<Activations>,
    /// Sends still on the communication thread.
    sends: Vec<Pending<()>>,
    /// Messages received before a pass wanted them, and messages to this rank's own later
    /// passes (zbv's V turns on the last rank: its first chunk's output is its second chunk's
    /// input), by sender and what they carry.
    mailbox: HashMap<(usize, Key), Vec<f32>>,
}

/// What one step's passes did on this rank.
#[derive(Clone, Debug, Default)]
pub struct Run {
    /// The summed loss of the micro-batches this rank ran the head for (0 elsewhere).
    pub loss: f64,
    /// Each pass, with when its compute started and ended (seconds from the step's start):
    /// waiting for a message is not compute.
    pub timeline: Vec<(Action, f64, f64)>,
    /// The step's length on this rank (seconds).
    pub span: f64,
    /// The most micro-batches whose activations were alive at once.
    pub peak_in_flight: usize,
}

impl Run {
    /// The share of the step this rank sat idle.
    pub fn idle_fraction(&self) -> f64 {
        let busy: f64 = self.timeline.iter().map(|(_, a, b)| b - a).sum();
        if self.span <= 0.0 {
            return 0.0;
        }
        (1.0 - busy / self.span).max(0.0)
    }
}

/// What a message carries: (a gradient?, micro-batch, the stage it is for).
type Key = (bool, usize, usize);

fn floats(x: &[f32]) -> &[u8] {
    bytemuck::cast_slice(x)
}

impl PipelineRank {
    pub fn new(comm: Arc<AsyncComm>, group: Group) -> PipelineRank {
        PipelineRank { comm, group, pool: Vec::new(), sends: Vec::new(), mailbox: Default::default() }
    }

    /// Queues `data` for rank `to` (kept here when that is this rank), tagged with `key`.
    fn send(&mut self, to: usize, key: Key, data: &[f32]) {
        if to == self.group.me {
            self.mailbox.insert((to, key), data.to_vec());
            return;
        }
        let g = self.group.clone();
        let mut msg = Vec::with_capacity(24 + 4 * data.len());
        for k in [u64::from(key.0), key.1 as u64, key.2 as u64] {
            msg.extend_from_slice(&k.to_le_bytes());
        }
        msg.extend_from_slice(floats(data));
        self.sends.push(self.comm.submit(move |c| c.send(&g, to, &msg)));
    }

    /// Fills `into` with the message `key` from rank `from`. Messages between two ranks arrive in
    /// the order the sender's passes made them, which need not be the order the receiver's
    /// passes want them (zbv's two chunks talk to the same neighbour): the ones that come first
    /// wait in the mailbox.
    fn recv(&mut self, from: usize, key: Key, into: &mut [f32]) -> Result<()> {
        loop {
            if let Some(got) = self.mailbox.remove(&(from, key)) {
                if got.len() != into.len() {
                    return Err(Error::Comm {
                        rank: Some(self.group.ranks[from]),
                        message: format!("sent {} floats for {key:?} where {} were expected", got.len(), into.len()),
                    });
                }
                into.copy_from_slice(&got);
                return Ok(());
            }
            if from == self.group.me {
                return Err(Error::Unsupported {
                    field: "parallel.pp_schedule".into(),
                    message: format!("rank {from} waits for a message to itself ({key:?}) that it has not sent"),
                });
            }
            let (g, n) = (self.group.clone(), 24 + into.len() * 4);
            let msg = self.comm.run(move |c| {
                let mut buf = vec![0u8; n];
                c.recv(&g, from, &mut buf)?;
                Ok(buf)
            })?;
            let word = |i: usize| u64::from_le_bytes(msg[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            let got: Key = (word(0) != 0, word(1) as usize, word(2) as usize);
            self.mailbox
                .insert((from, got), msg[24..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect());
        }
    }

    /// Runs this rank's passes of `schedule` over `batches` (micro-batch `k`'s `[b, seq+1]`
    /// tokens: every stage reads the shape, the first the inputs, the last the targets),
    /// accumulating `scale ×` the gradients of the blocks it holds into `grads`. `model` holds
    /// this rank's chunks (`model.stage.chunks[c]` is the schedule's chunk `c`); `batch` and
    /// `seq` size the activations.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        schedule: &Schedule,
        model: &Model,
        params: &[f32],
        grads: &mut [f32],
        batches: &[&[u32]],
        (batch, seq): (usize, usize),
        scale: f32,
    ) -> Result<Run> {
        let me = self.group.me;
        let last = schedule.last_stage();
        if batches.len() != schedule.micro_batches || model.stage.chunks.len() != schedule.chunks {
            return Err(Error::Unsupported {
                field: "parallel.pp".into(),
                message: format!(
                    "{} micro-batches on {} chunks for a schedule of {} on {}",
                    batches.len(),
                    model.stage.chunks.len(),
                    schedule.micro_batches,
                    schedule.chunks
                ),
            });
        }
        let start = Instant::now();
        let mut run = Run::default();
        let mut live: HashMap<(usize, usize), Activations> = HashMap::new();
        for &action in &schedule.ranks[me] {
            let (mb, c) = (action.micro_batch, action.chunk);
            let stage = schedule.stage(me, c);
            let blocks = model.stage.local(c);
            let began;
            match action.pass {
                Pass::Forward => {
                    let mut acts = match self.pool.pop() {
                        Some(a) => a,
                        None => model.activations(batch, seq)?,
                    };
                    if stage == 0 {
                        began = start.elapsed().as_secs_f64();
                        model.embed(params, &mut acts, batches[mb])?;
                    } else {
                        model.load(&mut acts, batches[mb])?;
                        let (from, _) = schedule.place(stage - 1);
                        self.recv(from, (false, mb, stage), model.residual(&mut acts, blocks.start)?)?;
                        began = start.elapsed().as_secs_f64();
                    }
                    model.forward_blocks(params, &mut acts, blocks.clone())?;
                    if stage == last {
                        run.loss += model.head_backward(params, grads, &mut acts, scale)?;
                    } else {
                        let (to, _) = schedule.place(stage + 1);
                        self.send(to, (false, mb, stage + 1), model.residual(&mut acts, blocks.end)?);
                    }
                    live.insert((mb, c), acts);
                    run.peak_in_flight = run.peak_in_flight.max(live.len());
                }
                Pass::Backward | Pass::BackwardInput => {
                    let mut acts = live.remove(&(mb, c)).ok_or_else(|| Error::Unsupported {
                        field: "parallel.pp_schedule".into(),
                        message: format!("{action:?} on rank {me} before its forward"),
                    })?;
                    if stage != last {
                        let (from, _) = schedule.place(stage + 1);
                        self.recv(from, (true, mb, stage), model.residual_grad(&mut acts)?)?;
                    }
                    began = start.elapsed().as_secs_f64();
                    model.backward_blocks(params, grads, &mut acts, blocks)?;
                    if stage == 0 {
                        model.embed_backward(params, grads, &mut acts)?;
                    } else {
                        let (to, _) = schedule.place(stage - 1);
                        self.send(to, (true, mb, stage - 1), model.residual_grad(&mut acts)?);
                    }
                    self.pool.push(acts);
                }
                // (zbv's weight gradients ran with their input gradients: see the module.)
                Pass::BackwardWeight => began = start.elapsed().as_secs_f64(),
            }
            run.timeline.push((action, began, start.elapsed().as_secs_f64()));
            self.reap()?;
        }
        for s in self.sends.drain(..) {
            s.wait()?;
        }
        run.span = start.elapsed().as_secs_f64();
        Ok(run)
    }

    /// Drops the sends that have completed, failing with the first error.
    fn reap(&mut self) -> Result<()> {
        let mut still = Vec::with_capacity(self.sends.len());
        for s in self.sends.drain(..) {
            match s.try_wait() {
                Ok(r) => {
                    r?;
                }
                Err(p) => still.push(p),
            }
        }
        self.sends = still;
        Ok(())
    }

    /// A tied embedding: sums the gradient of its two copies (`range` of `grads`) between the
    /// first and the last stage's ranks, which both call it. Any other rank returns at once.
    pub fn tie(&self, schedule: &Schedule, grads: &mut [f32], range: std::ops::Range<usize>) -> Result<()> {
        let (first, _) = schedule.place(0);
        let (last, _) = schedule.place(schedule.last_stage());
        let me = self.group.me;
        if first == last || (me != first && me != last) {
            return Ok(());
        }
        let g = Group { ranks: vec![self.group.ranks[first], self.group.ranks[last]], me: usize::from(me == last) };
        let mut data = grads[range.clone()].to_vec();
        data = self.comm.run(move |c| {
            c.all_reduce(&g, &mut data, ReduceOp::Sum)?;
            Ok(data)
        })?;
        grads[range].copy_from_slice(&data);
        Ok(())
    }
}
