//! Checkpointing a run: starting a checkpoint in the background, polling and committing it
//! (every rank of a sharded one in step), resuming from one, and the final model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::checkpoint::{
    checkpoint_loss_scale, commit_checkpoint, load_training_checkpoint, partial_dir, record_sums, replace_dir, save_hf_config, save_hf_dir,
    save_training_checkpoint, shard_name, write_rank_shard, LossScaleState, TrainingState,
};
use crate::config::Precision;
use crate::parallel::DataParallel;
use crate::params::ParamBuffers;
use crate::{Error, Result};

use super::gpu::HostState;
use super::Trainer;

/// The whole model's parameters, first and second moments, and its table.
type WholeState = (Vec<f32>, Vec<f32>, Vec<f32>, crate::params::ParamTable);

/// How a checkpoint written in the background ended.
#[derive(Debug)]
pub struct CheckpointOutcome {
    pub step: u64,
    pub dir: PathBuf,
    pub result: Result<()>,
    /// Bytes written and the time the writing thread took.
    pub bytes: u64,
    pub write_secs: f64,
    /// Time the training loop spent on this checkpoint (gathers and the host copy).
    pub stall_secs: f64,
}

/// The host copy a checkpoint is written from. Kept between checkpoints: allocating (and so
/// faulting in) 12 bytes per parameter anew at every save cost several times the copy itself.
#[derive(Debug)]
pub(super) struct Snapshot {
    params: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// On a GPU: the state as the copy stream writes it, in page-locked memory (the vectors stay
    /// empty then).
    gpu: Option<HostState>,
}

impl Snapshot {
    pub(super) fn new(params: usize, moments: usize) -> Snapshot {
        let mut s = Snapshot { params: vec![0.0; params], m: vec![0.0; moments], v: vec![0.0; moments], gpu: None };
        // Touch every page now, before training, rather than during the first save.
        for b in [&mut s.params, &mut s.m, &mut s.v] {
            b.fill(0.0);
        }
        s
    }

    fn copy_from(&mut self, params: &[f32], m: &[f32], v: &[f32]) {
        use rayon::prelude::*;
        for (dst, src) in [(&mut self.params, params), (&mut self.m, m), (&mut self.v, v)] {
            dst.resize(src.len(), 0.0);
            dst.par_chunks_mut(1 << 20).zip(src.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
        }
    }
}

/// A checkpoint being written by a background thread.
#[derive(Debug)]
pub(super) struct PendingCheckpoint {
    step: u64,
    dir: PathBuf,
    /// fp16 on a GPU: the loss scale at `step` (a sharded checkpoint records it at the commit).
    loss_scale: Option<LossScaleState>,
    stall_secs: f64,
    thread: std::thread::JoinHandle<(Result<()>, u64, f64, Snapshot)>,
}

impl PendingCheckpoint {
    fn join(self) -> (CheckpointOutcome, Option<Snapshot>) {
        let (result, bytes, write_secs, snapshot) = match self.thread.join() {
            Ok((r, b, w, s)) => (r, b, w, Some(s)),
            Err(_) => {
                (Err(Error::Io { path: self.dir.clone(), err: std::io::Error::other("the checkpoint writer panicked") }), 0, 0.0, None)
            }
        };
        (CheckpointOutcome { step: self.step, dir: self.dir, result, bytes, write_secs, stall_secs: self.stall_secs }, snapshot)
    }
}

fn list_names(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default()
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// How long a new checkpoint waits for the previous one to be written before it is skipped
/// (see `Trainer::start_checkpoint`).
const CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A checkpoint still being written.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    step: u64,
    gave_up: bool,
}

impl Trainer {
    /// Writes the current model as a Hugging Face directory (from the host copy: call after
    /// `save_final` when training on a GPU; a checkpoint copies the GPU's state into memory of
    /// its own, not into the host buffers). Refused under ZeRO-3, where the host buffer holds only
    /// this rank's pieces: `save_final` gathers them.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        if self.pp.is_some() {
            return Err(Error::Unsupported {
                field: "parallel.pp".into(),
                message: "a pipeline stage holds only its blocks: write the model with save_final".into(),
            });
        }
        if !self.model.tp.is_whole() {
            return Err(Error::Unsupported {
                field: "parallel.tp".into(),
                message: "under tensor parallelism a rank holds only its part of the model: write it with save_final".into(),
            });
        }
        if self.dp.as_ref().is_some_and(|d| d.zero() >= 3) {
            return Err(Error::Unsupported {
                field: "parallel.zero".into(),
                message: "under ZeRO-3 a rank holds only its pieces of the model: write it with save_final".into(),
            });
        }
        save_hf_dir(dir, &self.model.config, &self.model.table, &self.buffers.params, self.tokenizer.as_deref())
    }

    /// Starts a checkpoint of the current state in `dir`; training goes on while a background
    /// thread writes it. Every rank calls it. Without ZeRO, rank 0 writes the whole state from a
    /// host copy. Under ZeRO each rank writes its own shard (its pieces of the moments, and of the
    /// parameters under ZeRO-3), so no rank gathers the whole state; the checkpoint is committed
    /// once every rank's shard is written (see `poll_checkpoint`). One checkpoint is written at a
    /// time: a previous one still being written is finished first, and its outcome returned.
    pub fn start_checkpoint(&mut self, dir: &Path) -> Result<Option<CheckpointOutcome>> {
        // One checkpoint is written at a time. One still being written is waited for, but not
        // for long: a rank waiting on its writer while the others went on to the next collective
        // would look dead to them once the wait outlasts the communication timeout (120 s by
        // default). Past `CHECKPOINT_WAIT` this checkpoint is skipped instead.
        let waiting = Instant::now();
        while let Some(writing) = self.checkpoint_in_flight(waiting.elapsed() > CHECKPOINT_WAIT)? {
            if writing.gave_up {
                if self.is_lead() {
                    eprintln!(
                        "warning: the checkpoint of step {} is skipped: the one of step {} is still being written",
                        self.step, writing.step
                    );
                }
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let previous = self.finish_checkpoint()?;
        let start = Instant::now();
        let (config, table, tokenizer, step, target) =
            (self.model.config.clone(), self.model.table.clone(), self.tokenizer.clone(), self.step, dir.to_path_buf());
        let zero = self.dp.as_ref().map_or(0, DataParallel::zero);
        let loss_scale = self.gpu.as_ref().and_then(|g| g.loss_scale()).or(self.resumed_loss_scale);
        if !self.sharded_checkpoints() {
            // Under tensor parallelism the whole state is put together, laid out as the whole
            // model's (so it resumes under any layout): under ZeRO over the dp group on its rank
            // 0 first, then by that rank's tp group on its lead.
            let whole = if !self.holds_part() {
                if self.dp_rank() != 0 {
                    return Ok(previous);
                }
                None
            } else {
                match self.assemble_state()? {
                    Some(state) => Some(state),
                    None => return Ok(previous),
                }
            };
            let mut snapshot = self.snapshot.take().unwrap_or_else(|| Snapshot::new(0, 0));
            // On a GPU the state is copied by a stream of its own while the next step computes,
            // and the writer waits for the copy; on CPU the host buffers are copied here.
            snapshot.gpu = match &mut self.gpu {
                Some(g) => g.begin_download()?,
                None => None,
            };
            let mut table = table;
            if let Some((params, m, v, whole_table)) = whole {
                (snapshot.params, snapshot.m, snapshot.v, table) = (params, m, v, whole_table);
            } else if snapshot.gpu.is_none() {
                snapshot.copy_from(&self.buffers.params, &self.buffers.m, &self.buffers.v);
            }
            let thread = std::thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || {
                    let t = Instant::now();
                    let r = (|| {
                        let (params, m, v) = match &snapshot.gpu {
                            Some(h) => h.slices()?,
                            None => (&snapshot.params[..], &snapshot.m[..], &snapshot.v[..]),
                        };
                        save_training_checkpoint(
                            &target,
                            &config,
                            &table,
                            TrainingState { params, m, v, step, loss_scale },
                            tokenizer.as_deref(),
                        )
                    })();
                    (r, dir_bytes(&target), t.elapsed().as_secs_f64(), snapshot)
                })
                .map_err(|e| Error::io(dir, e))?;
            self.pending =
                Some(PendingCheckpoint { step, dir: dir.to_path_buf(), loss_scale, stall_secs: start.elapsed().as_secs_f64(), thread });
            return Ok(previous);
        }
        // Sharded: the host buffers must hold this rank's state (a GPU rank's are brought up to
        // date here), and rank 0 prepares the temporary directory before anyone writes into it.
        let synced = self.sync_host();
        let dp = self.dp.as_mut().expect("ZeRO runs with a dp group");
        let (rank, world) = (dp.rank(), dp.size());
        let tmp = partial_dir(dir);
        // A stale partial directory must go entirely: a shard left by an earlier layout would be
        // sealed into this checkpoint.
        let prepared = if rank == 0 {
            match std::fs::remove_dir_all(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&tmp, e)),
                _ => std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e)),
            }
        } else {
            Ok(())
        };
        // Every rank learns whether rank 0 could prepare (this is also the barrier before anyone
        // writes). If not (a full disk, say), the checkpoint fails on every rank, as a failed
        // write does, and training goes on.
        let ready = dp.sum(if rank == 0 { f64::from(u8::from(prepared.is_ok())) } else { 0.0 })? > 0.0;
        synced?;
        if !ready {
            let why = match prepared {
                Err(e) => e,
                Ok(()) => Error::Io { path: tmp.clone(), err: std::io::Error::other("rank 0 could not prepare the checkpoint directory") },
            };
            let thread = std::thread::Builder::new()
                .name("checkpoint".into())
                .spawn(move || (Err(why), 0, 0.0, Snapshot::new(0, 0)))
                .map_err(|e| Error::io(dir, e))?;
            self.pending =
                Some(PendingCheckpoint { step, dir: dir.to_path_buf(), loss_scale, stall_secs: start.elapsed().as_secs_f64(), thread });
            return Ok(previous);
        }
        let pieces = dp.pieces();
        let own_params = (zero >= 3).then(|| dp.own_pieces(&self.buffers.params));
        let full_params = (zero < 3 && rank == 0).then(|| self.buffers.params.clone());
        let (m, v) = (self.buffers.m.clone(), self.buffers.v.clone());
        let thread = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let t = Instant::now();
                let r = (|| {
                    let before: std::collections::BTreeSet<String> = list_names(&tmp);
                    if let Some(p) = &full_params {
                        save_hf_dir(&tmp, &config, &table, p, tokenizer.as_deref())?;
                    } else if rank == 0 {
                        // ZeRO-3: the parameters are in the rank shards; the config says what model.
                        save_hf_config(&tmp, &config)?;
                        if let Some(t) = &tokenizer {
                            std::fs::copy(t, tmp.join("tokenizer.json")).map_err(|e| Error::io(t, e))?;
                        }
                    }
                    let shard = shard_name(rank, world);
                    write_rank_shard(&tmp.join(&shard), &pieces, own_params.as_deref(), &m, &v)?;
                    // Checksum what this rank wrote here, on its own thread, for the commit.
                    let mine: Vec<String> = if rank == 0 {
                        list_names(&tmp)
                            .into_iter()
                            .filter(|n| !before.contains(n) && !n.starts_with('.') && (n == &shard || !n.starts_with("rank-")))
                            .collect()
                    } else {
                        vec![shard]
                    };
                    record_sums(&tmp, &rank.to_string(), &mine)
                })();
                let bytes = dir_bytes(&tmp);
                (r, bytes, t.elapsed().as_secs_f64(), Snapshot::new(0, 0))
            })
            .map_err(|e| Error::io(dir, e))?;
        self.pending =
            Some(PendingCheckpoint { step, dir: dir.to_path_buf(), loss_scale, stall_secs: start.elapsed().as_secs_f64(), thread });
        Ok(previous)
    }

    /// Whether checkpoints are written as one shard per rank (ZeRO without tensor parallelism);
    /// otherwise rank 0 writes the whole state.
    fn sharded_checkpoints(&self) -> bool {
        self.dp.as_ref().is_some_and(|d| d.zero() >= 1) && !self.holds_part()
    }

    /// A model cut across a tp group: the whole model's parameters and moments (and its table)
    /// on the tp lead of dp rank 0, gathered over dp under ZeRO, then put together over tp;
    /// `None` on every other rank. Every rank calls it.
    fn assemble_state(&mut self) -> Result<Option<WholeState>> {
        let first = self.dp_rank() == 0;
        let zero = self.dp.as_ref().map_or(0, DataParallel::zero);
        let (mut m, mut v) = (None, None);
        if let (true, Some(dp)) = (zero >= 1, &mut self.dp) {
            // This rank's pieces of the moments, whole on dp rank 0; under ZeRO-3 the parameters too.
            (m, v) = (dp.gather_pieces(&self.buffers.m, first)?, dp.gather_pieces(&self.buffers.v, first)?);
            if zero >= 3 {
                dp.gather_params(&mut self.buffers.params, first)?;
            }
        }
        if !first {
            return Ok(None);
        }
        if let Some(pp) = &mut self.pp {
            // Every stage's part, put together on the first stage's rank (dp rank 0's pp group).
            let (b, lead) = (&self.buffers, pp.rank() == 0);
            let (m, v) = (m.as_deref().unwrap_or(&b.m), v.as_deref().unwrap_or(&b.v));
            let assembled = (pp.assemble(&b.params, lead)?, pp.assemble(m, lead)?, pp.assemble(v, lead)?);
            return Ok(match assembled {
                (Some(params), Some(m), Some(v)) => Some((params, m, v, pp.whole_table().clone())),
                _ => None,
            });
        }
        let tp = super::trainer::tp_group(&mut self.dp, &mut self.tp).expect("a model cut across ranks has its tp group");
        let (b, lead) = (&self.buffers, tp.rank() == 0);
        let (m, v) = (m.as_deref().unwrap_or(&b.m), v.as_deref().unwrap_or(&b.v));
        let assembled = (|| Ok::<_, Error>((tp.assemble(&b.params, lead)?, tp.assemble(m, lead)?, tp.assemble(v, lead)?)))();
        let table = tp.whole_table().clone();
        if let (true, Some(dp)) = (zero >= 3, &mut self.dp) {
            dp.release_gathered(&mut self.buffers.params)?;
        }
        Ok(match assembled? {
            (Some(params), Some(m), Some(v)) => Some((params, m, v, table)),
            _ => None,
        })
    }

    /// The outcome of the checkpoint being written, once it is committed (on rank 0; other ranks
    /// get `None`). Every rank calls it after each step: under ZeRO the ranks agree, with a small
    /// all-reduce, on when every shard is written, and rank 0 then commits the checkpoint.
    pub fn poll_checkpoint(&mut self) -> Result<Option<CheckpointOutcome>> {
        let sharded = self.sharded_checkpoints();
        if !sharded {
            if self.pending.as_ref().is_some_and(|p| p.thread.is_finished()) {
                return Ok(self.pending.take().map(|p| self.reclaim(p)));
            }
            return Ok(None);
        }
        if self.checkpoint_in_flight(false)?.is_some() {
            return Ok(None);
        }
        self.commit_sharded()
    }

    /// A checkpoint still being written, if any, and whether waiting for it is given up (`give_up`
    /// on any rank). Under ZeRO the ranks agree on both (every rank calls it, in step); otherwise
    /// it is rank 0's own business (only rank 0 writes).
    fn checkpoint_in_flight(&mut self, give_up: bool) -> Result<Option<InFlight>> {
        let Some(p) = &self.pending else { return Ok(None) };
        let (step, done) = (p.step, p.thread.is_finished());
        let sharded = self.sharded_checkpoints();
        match &mut self.dp {
            Some(dp) if sharded => {
                // One sum says both: n when every rank is done; above n once any rank gives up.
                let n = dp.size() as f64;
                let total = dp.sum(if give_up { n + 1.0 } else { f64::from(u8::from(done)) })?;
                Ok((total != n).then_some(InFlight { step, gave_up: total > n }))
            }
            _ => Ok((!done).then_some(InFlight { step, gave_up: give_up })),
        }
    }

    /// Waits for the checkpoint being written, if any, and commits it (every rank calls it).
    /// Under ZeRO the ranks wait together, checking in with each other while they do: a rank whose
    /// shard is written first must not sit in a collective for longer than the timeout while rank
    /// 0 (which also writes the model) is still writing.
    pub fn finish_checkpoint(&mut self) -> Result<Option<CheckpointOutcome>> {
        let sharded = self.sharded_checkpoints();
        if !sharded {
            return Ok(self.pending.take().map(|p| self.reclaim(p)));
        }
        if self.pending.is_none() {
            return Ok(None);
        }
        while self.checkpoint_in_flight(false)?.is_some() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.commit_sharded()
    }

    /// After every rank resumed (each picks its checkpoint on its own, skipping any it cannot
    /// load): they must all be at the same step, or they would train on different parameters,
    /// data and schedules without noticing. Every rank calls it.
    pub fn check_ranks_resumed_alike(&mut self) -> Result<()> {
        let s = self.step as f64;
        // Equal sums of the step and of its square on every rank mean no rank differs: over the
        // dp group, then over the pp group of those sums.
        let (mut n, mut sum, mut squares) = (1.0, s, s * s);
        if let Some(dp) = &mut self.dp {
            (n, sum, squares) = (dp.size() as f64, dp.sum(sum)?, dp.sum(squares)?);
        }
        if let Some(pp) = &mut self.pp {
            (n, sum, squares) = (n * pp.size() as f64, pp.sum(sum)?, pp.sum(squares)?);
        }
        if sum != n * s || squares != n * s * s {
            return Err(Error::Comm {
                rank: None,
                message: format!(
                    "the ranks resumed from different checkpoints (this one from step {}): a checkpoint one rank could not load was used by another",
                    self.step
                ),
            });
        }
        Ok(())
    }

    /// Joins this rank's shard writer; if every rank's shard was written, rank 0 writes the
    /// manifest and renames the checkpoint into place, else it removes the partial directory.
    fn commit_sharded(&mut self) -> Result<Option<CheckpointOutcome>> {
        let Some(p) = self.pending.take() else { return Ok(None) };
        let loss_scale = p.loss_scale;
        let (mut outcome, _) = p.join();
        let dp = self.dp.as_mut().expect("sharded checkpoints run with a dp group");
        let n = dp.size() as f64;
        let written = dp.sum(f64::from(u8::from(outcome.result.is_ok())))?;
        let bytes = dp.sum(outcome.bytes as f64)?;
        if dp.rank() != 0 {
            return Ok(None);
        }
        let tmp = partial_dir(&outcome.dir);
        outcome.bytes = bytes as u64;
        if written < n {
            let _ = std::fs::remove_dir_all(&tmp);
            if outcome.result.is_ok() {
                outcome.result = Err(Error::Io {
                    path: tmp,
                    err: std::io::Error::other(format!("{} of {} ranks could not write their shard", n - written, n)),
                });
            }
        } else {
            outcome.result = commit_checkpoint(&tmp, &outcome.dir, outcome.step, self.model.table.len(), loss_scale);
        }
        Ok(Some(outcome))
    }

    /// Joins a finished writer and keeps its host copy for the next checkpoint.
    fn reclaim(&mut self, p: PendingCheckpoint) -> CheckpointOutcome {
        let (outcome, mut snapshot) = p.join();
        if let (Some(g), Some(hs)) = (&mut self.gpu, snapshot.as_mut().and_then(|s| s.gpu.take())) {
            g.recycle(hs);
        }
        if !self.sharded_checkpoints() {
            self.snapshot = snapshot;
        }
        outcome
    }

    /// Writes the final model as a Hugging Face directory. Every rank calls it (ZeRO-3 gathers the
    /// parameters); rank 0 writes and gets `true`.
    pub fn save_final(&mut self, dir: &Path) -> Result<bool> {
        self.sync_host()?;
        // ZeRO-3: rank 0 of the dp group gathers the model into its own parameter buffer (the
        // others take part a chunk at a time) and gives it back once written, so no rank holds a
        // second copy.
        let zero3 = self.dp.as_ref().is_some_and(|d| d.zero() >= 3);
        if let Some(pp) = &mut self.pp {
            // Every stage's blocks put together on the first stage of dp rank 0 (ZeRO-3 does not
            // run with pipeline stages).
            if self.dp.as_ref().is_some_and(|d| d.rank() != 0) {
                return Ok(false);
            }
            let lead = pp.rank() == 0;
            let Some(params) = pp.assemble(&self.buffers.params, lead)? else { return Ok(false) };
            let table = pp.whole_table().clone();
            self.write_final(dir, &table, &params)?;
            return Ok(true);
        }
        if !self.model.tp.is_whole() {
            // Each tp rank's part gathered on dp rank 0 (ZeRO-3), whose tp group puts the whole
            // model together on its lead.
            let first = self.dp_rank() == 0;
            if let (true, Some(dp)) = (zero3, &mut self.dp) {
                dp.gather_params(&mut self.buffers.params, first)?;
            }
            if !first {
                return Ok(false);
            }
            let tp = super::trainer::tp_group(&mut self.dp, &mut self.tp).expect("a model cut across ranks has its tp group");
            let (lead, table) = (tp.rank() == 0, tp.whole_table().clone());
            let assembled = tp.assemble(&self.buffers.params, lead);
            if let (true, Some(dp)) = (zero3, &mut self.dp) {
                dp.release_gathered(&mut self.buffers.params)?;
            }
            let Some(params) = assembled? else { return Ok(false) };
            self.write_final(dir, &table, &params)?;
            return Ok(true);
        }
        let lead = self.is_lead();
        if let (true, Some(dp)) = (zero3, &mut self.dp) {
            dp.gather_params(&mut self.buffers.params, lead)?;
        }
        if !lead {
            return Ok(false);
        }
        let written = self.write_final(dir, &self.model.table, &self.buffers.params);
        if let (true, Some(dp)) = (zero3, &mut self.dp) {
            dp.release_gathered(&mut self.buffers.params)?;
        }
        written?;
        Ok(true)
    }

    /// Rank 0's part of `save_final`, from the whole parameters (`params`, laid out by `table`).
    fn write_final(&self, dir: &Path, table: &crate::params::ParamTable, params: &[f32]) -> Result<()> {
        // Written beside `dir` and put in place whole: a crash or a full disk never leaves a
        // `final/` with a config but no weights, which export would take for the model.
        let tmp = partial_dir(dir);
        let _ = std::fs::remove_dir_all(&tmp);
        let written = save_hf_dir(&tmp, &self.model.config, table, params, self.tokenizer.as_deref())
            .and_then(|()| crate::checkpoint::write_final_step(&tmp, self.step))
            .and_then(|()| replace_dir(&tmp, dir));
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written
    }

    /// Continues from a training checkpoint: the following steps are those the run that wrote it
    /// would have taken (the data order depends only on the seed and the step).
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        self.step = if !self.holds_part() {
            load_training_checkpoint(dir, &self.model.config, &self.model.table, &mut self.buffers)?
        } else {
            // Checkpoints hold the whole model's state: this rank takes its part of it.
            let whole = self.model.whole_table()?;
            let mut all = ParamBuffers::zeros(&whole);
            let step = load_training_checkpoint(dir, &self.model.config, &whole, &mut all)?;
            let t = &self.model.table;
            let b = &mut self.buffers;
            t.take_shards(&whole, &all.params, &mut b.params);
            let (mut m, mut v) = (vec![0.0; t.len()], vec![0.0; t.len()]);
            t.take_shards(&whole, &all.m, &mut m);
            t.take_shards(&whole, &all.v, &mut v);
            let mut at = 0;
            for piece in b.pieces.clone() {
                b.m[at..at + piece.len()].copy_from_slice(&m[piece.clone()]);
                b.v[at..at + piece.len()].copy_from_slice(&v[piece.clone()]);
                at += piece.len();
            }
            step
        };
        // The GPU state is rebuilt from the loaded buffers at the next step.
        if let Some(g) = &mut self.gpu {
            g.reset();
        }
        // Only an fp16 run on a GPU scales its loss: any other run (one resumed with another
        // precision or device included) neither uses nor records a scale the checkpoint has.
        self.resumed_loss_scale =
            (self.gpu.is_some() && self.config.precision == Precision::Fp16).then(|| checkpoint_loss_scale(dir)).flatten();
        if let Some(dp) = &mut self.dp {
            dp.setup(&mut self.buffers.params);
        }
        if self.step > self.config.optim.steps {
            return Err(Error::Config {
                path: dir.into(),
                message: format!("the checkpoint is at step {}, past train.steps = {}", self.step, self.config.optim.steps),
            });
        }
        Ok(())
    }
}
