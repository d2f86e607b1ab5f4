//! The supervisor: places waiting jobs on free devices, starts one `gantry worker` per device,
//! watches the workers (exit, registration, heartbeats), and moves each job through its states:
//! succeeded when every rank finished, restarted from its last checkpoint or failed when one did
//! not. All of this runs in one task driven by a timer and a wake-up; the gRPC handlers only
//! record what workers say.
//!
//! The daemon never kills its workers by dying: they run in process groups of their own, and a
//! daemon that starts again re-adopts them from the `workers` table (PID and process start time),
//! reading how the ones that ended meanwhile ended from their outcome files.

pub mod lease;
mod logs;
pub mod placement;
pub mod process;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_api::{JobState, StepMetrics};
use nix::sys::signal::Signal;
use tokio::sync::{watch, Notify};

use crate::auth::worker::WorkerKeys;
use crate::config::DaemonConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::jobs::{Change, JobRow};
use crate::store::{now_ms, Store, WorkerRecord};
use crate::worker::read_outcome;
use gantry_engine::run_dir::RunDir;
use placement::{Decision, Waiting};

/// How a rank ended.
#[derive(Clone, Debug)]
enum Exit {
    Finished,
    Failed(String),
}

struct Rank {
    pid: u32,
    proc_start: u64,
    /// Our own child (started by this daemon); adopted ranks have none.
    child: Option<Child>,
    registered: bool,
    last_beat: Instant,
    exit: Option<Exit>,
    /// The step its heartbeats last reported, when that step was first reported, and the longest
    /// it has taken between two steps (for `stall_limit`).
    step: i64,
    step_since: Instant,
    slowest_step: Duration,
}

impl Rank {
    fn new(pid: u32, proc_start: u64, child: Option<Child>, registered: bool) -> Rank {
        let now = Instant::now();
        Rank { pid, proc_start, child, registered, last_beat: now, exit: None, step: 0, step_since: now, slowest_step: Duration::ZERO }
    }

    /// Notes the step a heartbeat reports.
    fn saw_step(&mut self, step: i64) {
        if step != self.step {
            // (The first step also loads the model and data: it does not count as a step time.)
            if self.step > 0 {
                self.slowest_step = self.slowest_step.max(self.step_since.elapsed());
            }
            self.step = step;
            self.step_since = Instant::now();
        }
    }
}

/// The least a rank gets to finish a step before it counts as hung, when `--stall-timeout` is not
/// given: writing a checkpoint or the final model happens between two heartbeat steps.
pub const STALL_FLOOR: Duration = Duration::from_secs(600);
/// The same before its first step, which also loads the model and the data (tokenizing a large
/// text corpus can take many minutes).
pub const FIRST_STEP_FLOOR: Duration = Duration::from_secs(1800);

/// How long a rank may go without finishing a step while its heartbeats go on: `--stall-timeout`,
/// else ten times its slowest step so far, at least `STALL_FLOOR` (`FIRST_STEP_FLOOR` before its
/// first step). A rank blocked for good (in an `open()` of a hung file system, a collective whose
/// peer is stuck) still sends heartbeats from its reporting thread: only its step says it is
/// stuck.
fn stall_limit(configured: Option<Duration>, rank: &Rank) -> Duration {
    let floor = if rank.step == 0 { FIRST_STEP_FLOOR } else { STALL_FLOOR };
    configured.unwrap_or_else(|| (rank.slowest_step * 10).max(floor))
}

/// How long a rank's reported failure waits for a rank seen lost (killed, crashed), which would
/// be the cause (see `check_ranks`).
const LOST_RANK_GRACE: Duration = Duration::from_secs(2);

/// How long a job waits before its `n`th restart: 1 s, doubling to at most 30 s. A cause that
/// lasts a few seconds (a GPU's memory not yet released, a port taken, a store away) would
/// otherwise use up the job's whole restart budget in as many rounds.
fn restart_pause(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// The last line a rank wrote before it died without an outcome, as `; its log ends: …` (an
/// allocation that failed says so there before the abort), or nothing.
fn last_words(run_dir: &Path, rank: u32) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(RunDir::new(run_dir).log(rank)) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut tail = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(2048))).is_err() || f.read_to_end(&mut tail).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&tail);
    match text.lines().rev().map(crate::text::clean_line).find(|l| !l.trim().is_empty()) {
        Some(line) => {
            let line: String = line.chars().take(300).collect();
            format!("; its log ends: {line}")
        }
        None => String::new(),
    }
}

/// Kills ranks this daemon started (and reaps them, so no zombie is left), or signals adopted ones.
fn kill_ranks(ranks: &mut [Rank]) {
    for r in ranks {
        match &mut r.child {
            Some(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            None => process::signal(r.pid, r.proc_start, Signal::SIGKILL),
        }
    }
}

impl Rank {
    /// Whether the process has ended (and, for our own child, been reaped).
    fn gone(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => !process::is_alive(self.pid, self.proc_start),
        }
    }
}

struct LiveJob {
    attempt: u32,
    placement: Vec<String>,
    run_dir: PathBuf,
    ranks: Vec<Rank>,
    started: Instant,
    /// Cancelled: the ranks are being stopped.
    stopping: bool,
    /// Why the job failed, as first seen: the ranks this daemon kills afterwards, and those that
    /// fail because a peer is gone, do not replace it.
    failure: Option<String>,
    /// The first failure a rank reported itself, and when: the cause unless a rank is seen lost
    /// within `LOST_RANK_GRACE` (see `check_ranks`).
    reported: Option<(String, Instant)>,
    log_stop: watch::Sender<bool>,
    log_tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub struct Supervisor {
    store: Store,
    config: Arc<DaemonConfig>,
    metrics: Metrics,
    exe: PathBuf,
    grpc_url: String,
    live: Mutex<HashMap<i64, LiveJob>>,
    /// Jobs with per-job series on /metrics: the ranks that reported, and when the job was seen
    /// to be over (its series go after `metrics_retention`).
    series: Mutex<HashMap<i64, JobSeries>>,
    wake: Notify,
    /// Jobs restarting: not placed before this time (see `restart_pause`).
    restart_after: Mutex<HashMap<i64, Instant>>,
    /// This daemon's lease on the database (taken before the supervisor starts, kept by its own
    /// task).
    lease: Arc<lease::Lease>,
    /// The secrets its workers are started with.
    keys: Arc<WorkerKeys>,
}

#[derive(Debug, Default)]
struct JobSeries {
    ranks: BTreeSet<u32>,
    /// The newest step counted into each rank's counters: a step reported again (a resend, or
    /// an attempt repeating the steps after its checkpoint) is not counted twice.
    counted: std::collections::BTreeMap<u32, i64>,
    ended: Option<Instant>,
}

impl Supervisor {
    pub fn new(
        store: Store,
        config: Arc<DaemonConfig>,
        metrics: Metrics,
        exe: PathBuf,
        lease: Arc<lease::Lease>,
        keys: Arc<WorkerKeys>,
    ) -> Arc<Supervisor> {
        let grpc_url = format!("unix://{}", config.worker_socket().display());
        Arc::new(Supervisor {
            keys,
            store,
            config,
            metrics,
            exe,
            grpc_url,
            live: Mutex::new(HashMap::new()),
            series: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            restart_after: Mutex::new(HashMap::new()),
            lease,
        })
    }

    /// Asks the loop to look at the queue now (a job was submitted or cancelled).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Whether the job's workers are supervised here (running, or being stopped).
    pub fn is_live(&self, id: i64) -> bool {
        self.live.lock().expect("live jobs").contains_key(&id)
    }

    /// The slots held by jobs live here: slot → job.
    fn held(&self) -> BTreeMap<String, i64> {
        let live = self.live.lock().expect("live jobs");
        live.iter().flat_map(|(id, j)| j.placement.iter().map(move |s| (s.clone(), *id))).collect()
    }

    /// The busy slots: slot → job (see `placement::occupied`).
    pub async fn occupied(&self) -> Result<BTreeMap<String, i64>> {
        let holding = self.store.jobs_in(&[JobState::Scheduled, JobState::Running]).await?;
        Ok(placement::occupied(self.held(), holding.iter().map(|r| (r.job.id, r.job.placement.as_slice()))))
    }

    /// Re-adopts what a previous daemon left running, then supervises until `shutdown`. Acts on
    /// jobs only while the database lease is fresh; ends with an error once another daemon has
    /// taken it (this one must then stop: its workers train on, and the other daemon takes
    /// charge of them).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut adopted = false;
        let mut stale = false;
        let ended = loop {
            if let Some(why) = self.lease.lost() {
                break Err(Error::Conflict(why));
            }
            let fresh = self.lease.since_renewed() <= lease::ACT_WITHIN;
            if fresh == stale {
                stale = !fresh;
                if stale {
                    tracing::warn!(
                        "the database lease was last renewed {:?} ago: not acting on jobs until it is",
                        self.lease.since_renewed()
                    );
                } else {
                    tracing::info!("the database lease is renewed again: supervising jobs");
                }
            }
            if fresh && !adopted {
                match self.adopt().await {
                    Ok(()) => adopted = true,
                    Err(e) => tracing::warn!("re-adopting running jobs: {e}; retrying"),
                }
            } else if fresh {
                if let Err(e) = self.tick().await {
                    tracing::warn!("supervisor: {e}");
                }
            }
            let pause = if adopted { Duration::from_millis(500) } else { Duration::from_secs(1) };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.changed() => break Ok(()),
            }
        };
        // Workers keep training; stop copying their logs cleanly (the next daemon resumes it).
        for j in self.live.lock().expect("live jobs").values() {
            let _ = j.log_stop.send(true);
        }
        if ended.is_ok() {
            // The next daemon, here or on another host, need not wait for the lease to lapse.
            if let Err(e) = self.store.release_lease(&self.lease.holder).await {
                tracing::warn!("giving up the database lease: {e}");
            }
        }
        ended
    }

    /// Takes charge of every job the store says holds devices but that is not live here: those a
    /// previous daemon left running (at start), and any whose start failed halfway (every tick).
    ///
    /// The other way round too: a job live here that the store no longer has as scheduled or
    /// running was cancelled while its start could not see it (the store was away): its ranks
    /// are stopped.
    async fn adopt(&self) -> Result<()> {
        let holding = self.store.jobs_in(&[JobState::Scheduled, JobState::Running]).await?;
        for row in &holding {
            let id = row.job.id;
            if self.live.lock().expect("live jobs").contains_key(&id) {
                continue;
            }
            if let Err(e) = self.adopt_job(row).await {
                tracing::warn!(job_id = id, "taking charge of the job's workers: {e}; retrying");
            }
        }
        let orphaned: Vec<i64> = self
            .live
            .lock()
            .expect("live jobs")
            .iter()
            .filter(|(id, j)| !j.stopping && !holding.iter().any(|r| r.job.id == **id))
            .map(|(id, _)| *id)
            .collect();
        for id in orphaned {
            tracing::info!(job_id = id, "the job is no longer scheduled or running in the store: stopping its workers");
            self.stop_job(id);
        }
        Ok(())
    }

    async fn adopt_job(&self, row: &JobRow) -> Result<()> {
        let id = row.job.id;
        let workers = self.store.workers(id).await?;
        let current: Vec<&WorkerRecord> = workers.iter().filter(|w| w.attempt == row.attempt).collect();
        let run_dir = PathBuf::from(&row.job.run_dir);
        if current.len() != row.job.devices as usize {
            // The daemon died while starting the job, or starting it failed halfway: stop what
            // did start and begin again.
            for w in &workers {
                process::signal(w.pid, w.proc_start, Signal::SIGKILL);
            }
            return self
                .fail_or_restart(id, "the job's workers were not all started (the daemon restarted, or starting them failed)".into())
                .await;
        }
        let ranks = current.iter().map(|w| Rank::new(w.pid, w.proc_start, None, true)).collect();
        tracing::info!(job_id = id, "re-adopting {} running ranks", current.len());
        let offsets = self.log_offsets(id, row.job.devices).await?;
        self.go_live(id, row.attempt, row.job.placement.clone(), run_dir, ranks, offsets);
        self.stop_if_final(id).await
    }

    /// A cancel that came while the job was being started (or re-adopted) found nothing live to
    /// stop, and the job's state is final now: stop its ranks here.
    async fn stop_if_final(&self, id: i64) -> Result<()> {
        if self.store.job(id).await?.state.is_final() {
            tracing::info!(job_id = id, "the job ended while its workers were starting: stopping them");
            self.stop_job(id);
        }
        Ok(())
    }

    /// Where copying each rank's log resumes (the part of going live that needs the store).
    async fn log_offsets(&self, id: i64, ranks: u32) -> Result<Vec<u64>> {
        let mut offsets = Vec::new();
        for rank in 0..ranks {
            offsets.push(self.store.log_resume_at(id, rank).await?);
        }
        Ok(offsets)
    }

    /// Supervises the job's ranks from now on, copying their logs from `offsets`.
    fn go_live(&self, id: i64, attempt: u32, placement: Vec<String>, run_dir: PathBuf, ranks: Vec<Rank>, offsets: Vec<u64>) {
        let (log_stop, rx) = watch::channel(false);
        let log_tasks = offsets
            .into_iter()
            .enumerate()
            .map(|(rank, offset)| {
                let rank = rank as u32;
                tokio::spawn(logs::tail(self.store.clone(), id, rank, RunDir::new(&run_dir).log(rank), offset, rx.clone()))
            })
            .collect();
        let job = LiveJob {
            attempt,
            placement,
            run_dir,
            ranks,
            started: Instant::now(),
            stopping: false,
            failure: None,
            reported: None,
            log_stop,
            log_tasks,
        };
        self.live.lock().expect("live jobs").insert(id, job);
    }

    /// One round of supervision. A failure with one job (the store briefly away, say) is logged
    /// and retried at the next round; it never stops the round for the other jobs.
    async fn tick(&self) -> Result<()> {
        for (id, exit) in self.check_ranks() {
            if let Err(e) = self.finish_job(id, exit).await {
                tracing::warn!(job_id = id, "recording how the job ended: {e}; retrying");
            }
        }
        if let Err(e) = self.adopt().await {
            tracing::warn!("looking for jobs to take charge of: {e}");
        }
        if let Err(e) = self.schedule().await {
            tracing::warn!("scheduling: {e}");
        }
        self.update_gauges().await?;
        self.prune_series().await
    }

    /// Drops the per-job series of jobs that ended more than `metrics_retention` ago.
    async fn prune_series(&self) -> Result<()> {
        let live: Vec<i64> = self.live.lock().expect("live jobs").keys().copied().collect();
        let unsettled: Vec<i64> = {
            let series = self.series.lock().expect("job series");
            series.iter().filter(|(id, s)| s.ended.is_none() && !live.contains(id)).map(|(id, _)| *id).collect()
        };
        for id in unsettled {
            let over = match self.store.job(id).await {
                Ok(job) => job.state.is_final(),
                Err(Error::JobNotFound(_)) => true,
                Err(e) => return Err(e),
            };
            if over {
                if let Some(s) = self.series.lock().expect("job series").get_mut(&id) {
                    s.ended.get_or_insert_with(Instant::now);
                }
            }
        }
        let retention = self.config.metrics_retention;
        let mut series = self.series.lock().expect("job series");
        let expired: Vec<i64> =
            series.iter().filter(|(_, s)| s.ended.is_some_and(|t| t.elapsed() >= retention)).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some(s) = series.remove(&id) {
                self.metrics.forget_job(id, &s.ranks);
                tracing::debug!(job_id = id, "dropped the finished job's metric series");
            }
        }
        Ok(())
    }

    /// Polls every rank; returns the jobs that are over: `Ok` when all ranks finished, the first
    /// failure otherwise (the other ranks are then stopped).
    ///
    /// The failure that names the job's end is the first one seen, and among those seen together
    /// a rank that ended without an outcome (killed, crashed, silent): when one rank dies, its
    /// peers fail a moment later with errors that name whichever neighbour they were talking to,
    /// and the ranks killed here afterwards exit without an outcome of their own.
    fn check_ranks(&self) -> Vec<(i64, Exit)> {
        let mut live = self.live.lock().expect("live jobs");
        let mut over = Vec::new();
        for (id, job) in live.iter_mut() {
            // (message, whether the rank ended without saying why) for the failures seen now.
            let mut seen: Vec<(String, bool)> = Vec::new();
            for (r, rank) in job.ranks.iter_mut().enumerate() {
                if rank.exit.is_some() {
                    continue;
                }
                let exited = match &mut rank.child {
                    Some(c) => match c.try_wait() {
                        Ok(Some(status)) => Some(Some(status)),
                        Ok(None) => None,
                        Err(_) => Some(None),
                    },
                    None => (!process::is_alive(rank.pid, rank.proc_start)).then_some(None),
                };
                let stall = stall_limit(self.config.stall_timeout, rank);
                let failed = if let Some(status) = exited {
                    match read_outcome(&job.run_dir, r as u32, job.attempt) {
                        Some(o) if o.succeeded => {
                            rank.exit = Some(Exit::Finished);
                            None
                        }
                        Some(o) => Some((format!("rank {r} failed: {}", o.message), false)),
                        None => Some((
                            match status {
                                Some(s) => format!(
                                    "rank {r} exited with {} before reporting an outcome{}",
                                    process::describe_status(s),
                                    if process::said_why(s) { last_words(&job.run_dir, r as u32) } else { String::new() }
                                ),
                                None => format!("rank {r} (pid {}) ended while the daemon was away, without an outcome", rank.pid),
                            },
                            true,
                        )),
                    }
                } else if !rank.registered && job.started.elapsed() > self.config.register_timeout {
                    Some((format!("rank {r} did not register within {:?}", self.config.register_timeout), true))
                } else if rank.registered && rank.last_beat.elapsed() > self.config.heartbeat_timeout {
                    Some((format!("rank {r} sent no heartbeat for {:?}", self.config.heartbeat_timeout), true))
                } else if rank.registered && rank.step_since.elapsed() > stall {
                    let at = if rank.step == 0 { "before its first step".to_string() } else { format!("after step {}", rank.step) };
                    let beating = if rank.last_beat.elapsed() < Duration::from_secs(5) { " though its heartbeats go on" } else { "" };
                    Some((
                        format!("rank {r} is hung: it finished no step for {}s ({at}){beating} (see --stall-timeout)", stall.as_secs()),
                        true,
                    ))
                } else {
                    None
                };
                if let Some((message, lost)) = failed {
                    rank.exit = Some(Exit::Failed(message.clone()));
                    seen.push((message, lost));
                }
            }
            if job.failure.is_none() {
                // A killed rank closes its connections a moment before it is seen to have ended:
                // its peers' reports of the closed connections may come first. They stand as the
                // cause only if no rank is seen lost within `LOST_RANK_GRACE`.
                if let Some((m, _)) = seen.iter().find(|(_, lost)| *lost) {
                    job.failure = Some(m.clone());
                } else {
                    if job.reported.is_none() {
                        job.reported = seen.first().map(|(m, _)| (m.clone(), Instant::now()));
                    }
                    let all_ended = job.ranks.iter().all(|r| r.exit.is_some());
                    if let Some((m, at)) = &job.reported {
                        if all_ended || at.elapsed() >= LOST_RANK_GRACE {
                            job.failure = Some(m.clone());
                        }
                    }
                }
            }
            if let Some(msg) = job.failure.clone() {
                // One rank failed: the others cannot go on without it.
                for rank in job.ranks.iter_mut() {
                    if !rank.gone() {
                        process::signal(rank.pid, rank.proc_start, Signal::SIGKILL);
                    }
                }
                if job.ranks.iter_mut().all(Rank::gone) {
                    over.push((*id, Exit::Failed(msg)));
                }
            } else if job.ranks.iter().all(|r| r.exit.is_some()) {
                over.push((*id, Exit::Finished));
            }
        }
        over
    }

    /// Records how a job ended and frees its devices. If the store cannot take it now, the job
    /// stays live and the next tick tries again.
    async fn finish_job(&self, id: i64, exit: Exit) -> Result<()> {
        // Copy the last log lines before the job is seen to end, so a follower gets all of them.
        let tasks = match self.live.lock().expect("live jobs").get_mut(&id) {
            Some(job) => {
                let _ = job.log_stop.send(true);
                std::mem::take(&mut job.log_tasks)
            }
            None => Vec::new(),
        };
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        // Only a job that still holds its devices moves on: one already cancelled, or moved to
        // restarting by an earlier round whose later steps failed, has had its transition.
        let state = self.store.job(id).await?.state;
        if state.holds_devices() {
            match &exit {
                Exit::Finished => {
                    let run_dir = self.live.lock().expect("live jobs").get(&id).map(|j| j.run_dir.clone());
                    if let Some(dir) = run_dir {
                        self.backfill_metrics(id, &dir).await?;
                    }
                    let n = self.live.lock().expect("live jobs").get(&id).map_or(0, |j| j.ranks.len());
                    self.store.transition(id, JobState::Succeeded, &format!("every rank finished ({n} of {n})"), Change::default()).await?;
                }
                Exit::Failed(msg) => self.fail_or_restart(id, msg.clone()).await?,
            }
        }
        self.store.clear_workers(id).await?;
        if let Some(job) = self.live.lock().expect("live jobs").remove(&id) {
            let _ = job.log_stop.send(true);
        }
        self.wake();
        Ok(())
    }

    async fn fail_or_restart(&self, id: i64, reason: String) -> Result<()> {
        let row = self.store.job_row(id).await?;
        if row.job.restarts < row.job.spec.restart.max_restarts {
            // The next attempt resumes from the newest checkpoint on disk, which may be newer than
            // the last one the store heard of.
            let on_disk = gantry_engine::checkpoint::committed_checkpoints(Path::new(&row.job.run_dir))
                .pop()
                .and_then(|p| gantry_engine::checkpoint::checkpoint_step(&p))
                .map(|s| s as i64);
            let ck = match row.job.checkpoint_step.max(on_disk) {
                Some(s) => format!("from the checkpoint of step {s}"),
                None => "from the start (no checkpoint yet)".into(),
            };
            let n = row.job.restarts + 1;
            let pause = restart_pause(n);
            let why = format!("{reason}; restart {n} of {} {ck}, after {}s", row.job.spec.restart.max_restarts, pause.as_secs());
            self.store.transition(id, JobState::Restarting, &why, Change::default()).await?;
            self.restart_after.lock().expect("restart pauses").insert(id, Instant::now() + pause);
            self.metrics.worker_restarts.with_label_values(&[&id.to_string()]).inc();
            self.series.lock().expect("job series").entry(id).or_default();
        } else {
            let why = if row.job.spec.restart.max_restarts == 0 {
                reason
            } else {
                format!("{reason} (after {} restarts, the job's restart.max_restarts)", row.job.restarts)
            };
            self.store.transition(id, JobState::Failed, &why, Change::default()).await?;
        }
        Ok(())
    }

    /// Stores every step a finished job wrote to its metrics file (a step whose report was lost
    /// in flight is recorded now; those already stored are skipped).
    async fn backfill_metrics(&self, id: i64, run_dir: &Path) -> Result<()> {
        let path = RunDir::new(run_dir).metrics();
        let Ok(text) = tokio::fs::read_to_string(&path).await else { return Ok(()) };
        let steps: Vec<StepMetrics> = text
            .lines()
            // The file holds the records as they were sent (rank 0's), with NaN as null.
            .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
            .map(|s| StepMetrics { rank: 0, ..s })
            .filter(|s| s.step > 0)
            .collect();
        for chunk in steps.chunks(500) {
            self.store.insert_steps(id, chunk).await?;
        }
        Ok(())
    }

    async fn schedule(&self) -> Result<()> {
        let queue = self.store.jobs_in(&[JobState::Queued, JobState::Restarting]).await?;
        if queue.is_empty() {
            return Ok(());
        }
        // A job restarting waits out its pause first, keeping its place in the queue.
        let pausing: HashMap<i64, Instant> = {
            let mut after = self.restart_after.lock().expect("restart pauses");
            after.retain(|_, t| *t > Instant::now());
            after.clone()
        };
        let waiting: Vec<Waiting> = queue
            .iter()
            .map(|j| Waiting {
                id: j.job.id,
                devices: j.job.spec.resources.devices.clone(),
                paused_for: pausing
                    .get(&j.job.id)
                    .filter(|_| j.job.state == JobState::Restarting)
                    .map(|t| t.saturating_duration_since(Instant::now())),
            })
            .collect();
        let held = self.occupied().await?;
        for d in placement::plan(&waiting, &self.config.slots, &held) {
            match d {
                Decision::Wait { id, reason } => {
                    if let Err(e) = self.store.set_reason(id, &reason).await {
                        tracing::warn!(job_id = id, "recording why the job waits: {e}");
                    }
                }
                Decision::Reject { id, reason } => {
                    if let Err(e) =
                        self.store.transition(id, JobState::Cancelled, &format!("cannot run here: {reason}"), Change::default()).await
                    {
                        tracing::warn!(job_id = id, "rejecting: {e}");
                    }
                }
                Decision::Place { id, slots } => {
                    let placed = format!("placed on {}", slots.join(", "));
                    let row = match self.store.transition(id, JobState::Scheduled, &placed, Change { placement: Some(&slots) }).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(job_id = id, "placing the job: {e}");
                            continue;
                        }
                    };
                    if let Err(e) = self.launch(id, row.attempt, slots).await {
                        tracing::warn!(job_id = id, "starting workers: {e}");
                        // If the store cannot take this either, the job stays scheduled without
                        // live workers, and the next round's `adopt` settles it.
                        if let Err(e) = self.fail_or_restart(id, format!("could not start the workers: {e}")).await {
                            tracing::warn!(job_id = id, "recording the failed start: {e}");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn launch(&self, id: i64, attempt: u32, placement: Vec<String>) -> Result<()> {
        let row = self.store.job_row(id).await?;
        let run_dir = PathBuf::from(&row.job.run_dir);
        // A job's first attempt starts from nothing: whatever is in its run directory was not
        // written by it (a database reset under the same data directory, an id reused), and would
        // otherwise be resumed from, and its metrics taken for the job's.
        if attempt == 1 && std::fs::read_dir(&run_dir).is_ok_and(|mut d| d.next().is_some()) {
            let aside = run_dir.with_file_name(format!("{}.stale-{}", run_dir.file_name().unwrap_or_default().to_string_lossy(), now_ms()));
            std::fs::rename(&run_dir, &aside).map_err(Error::io(&run_dir))?;
            tracing::warn!(job_id = id, "the job's run directory held files it did not write: moved to {}", aside.display());
        }
        let run = RunDir::new(&run_dir);
        for sub in [run.logs(), run.outcomes()] {
            std::fs::create_dir_all(&sub).map_err(Error::io(&sub))?;
        }
        // The same file `gantry train` writes: `gantry train --resume` continues a daemon's run.
        let spec_toml = row.job.spec.to_toml().map_err(|e| Error::Internal(format!("writing the spec as TOML: {e}")))?;
        gantry_engine::checkpoint::write_replacing(&run.spec(), spec_toml.as_bytes()).map_err(|e| Error::Internal(e.to_string()))?;
        let recorded = match self.store.last_checkpoint(id).await? {
            _ if attempt <= 1 => None,
            Some((step, path)) if Path::new(&path).is_dir() => Some(PathBuf::from(path)).filter(|_| step > 0),
            Some((step, _)) => Some(RunDir::new(&run_dir).checkpoint(step as u64)).filter(|p| p.is_dir()),
            None => None,
        };
        // A checkpoint committed on disk whose report never reached the store (the worker died
        // before it was acknowledged) counts too: the worker resumes from the newest intact one
        // it finds, so it only needs to be told to resume. (Only a restart resumes.)
        let resume = recorded.or_else(|| (attempt > 1).then(|| gantry_engine::checkpoint::committed_checkpoints(&run_dir).pop()).flatten());
        // The worker resumes from the newest intact checkpoint on disk, which may be newer than
        // the one the store heard of (its report was lost with the failed attempt): the store
        // learns of it now, and only the reports after it are dropped, to be made again.
        // (Checked as the worker will check it: a damaged one is passed over.)
        let recorded_step = resume.as_deref().and_then(gantry_engine::checkpoint::checkpoint_step).map(|s| s as i64);
        let skipped = |ck: &Path, e: &gantry_engine::Error| tracing::warn!(job_id = id, "checkpoint {} is damaged: {e}", ck.display());
        let newest = if attempt > 1 { gantry_engine::checkpoint::newest_intact_checkpoint(&run_dir, 0, skipped) } else { None };
        let from = match newest {
            Some((newest, step)) if Some(step as i64) > recorded_step => {
                self.store.record_checkpoint(id, step as i64, &newest.to_string_lossy()).await?;
                step as i64
            }
            _ => recorded_step.unwrap_or(0),
        };
        if attempt > 1 {
            self.store.drop_steps_after(id, from).await?;
        }
        let rendezvous = format!("127.0.0.1:{}", process::free_port()?);
        let world = placement.len() as u32;
        let mut ranks = Vec::new();
        if let Err(e) = self.spawn_ranks(id, attempt, &placement, &run_dir, &rendezvous, resume.as_deref(), &mut ranks).await {
            // Whatever started is stopped (and reaped): the job is failed or restarted as a whole.
            kill_ranks(&mut ranks);
            return Err(e);
        }
        tracing::info!(job_id = id, attempt, "started {world} ranks");
        let offsets = match self.log_offsets(id, world).await {
            Ok(o) => o,
            Err(e) => {
                kill_ranks(&mut ranks);
                return Err(e);
            }
        };
        self.go_live(id, attempt, placement, run_dir, ranks, offsets);
        // From here the ranks run and are supervised: a failure to look at the store now is not
        // a failed start (which would restart a job whose ranks are training). A cancel it
        // missed is caught by the next round's `adopt`.
        if let Err(e) = self.stop_if_final(id).await {
            tracing::warn!(job_id = id, "checking for a cancel during the start: {e}");
        }
        Ok(())
    }

    /// Starts one worker per slot of `placement`, recording each, into `ranks`.
    #[allow(clippy::too_many_arguments)]
    async fn spawn_ranks(
        &self,
        id: i64,
        attempt: u32,
        placement: &[String],
        run_dir: &Path,
        rendezvous: &str,
        resume: Option<&Path>,
        ranks: &mut Vec<Rank>,
    ) -> Result<()> {
        let world = placement.len() as u32;
        for rank in 0..world {
            let log = RunDir::new(run_dir).log(rank);
            let secret = self.keys.secret(id, attempt);
            let launch = process::Launch {
                exe: &self.exe,
                job_id: id,
                rank,
                world_size: world,
                attempt,
                rendezvous,
                daemon: &self.grpc_url,
                run_dir,
                resume_from: resume,
                log: &log,
                device: &placement[rank as usize],
                secret: &secret,
                read_roots: &self.config.read_roots,
            };
            let child = process::spawn(&launch)?;
            let pid = child.id();
            let proc_start = process::proc_start(pid).unwrap_or(0);
            let record = WorkerRecord { job_id: id, rank, attempt, pid, proc_start, started_ms: now_ms() };
            ranks.push(Rank::new(pid, proc_start, Some(child), false));
            self.store.record_worker(&record).await?;
        }
        Ok(())
    }

    async fn update_gauges(&self) -> Result<()> {
        let counts = self.store.count_by_state().await?;
        let mut queue = 0;
        for s in JobState::ALL {
            let n = counts.iter().find(|(st, _)| *st == s).map_or(0, |c| c.1);
            self.metrics.jobs.with_label_values(&[s.as_str()]).set(n);
            if matches!(s, JobState::Queued | JobState::Restarting) {
                queue += n;
            }
        }
        self.metrics.queue_length.set(queue);
        self.metrics.devices_busy.set(self.occupied().await?.len() as i64);
        Ok(())
    }

    /// A worker's first call: it must belong to the job's current attempt.
    pub async fn register(&self, job_id: i64, rank: u32, attempt: u32) -> Result<()> {
        let stale =
            || Error::Conflict(format!("job {job_id} attempt {attempt} is not running on this daemon (a stale or cancelled worker)"));
        let all_registered = {
            let mut live = self.live.lock().expect("live jobs");
            match live.get_mut(&job_id) {
                Some(job) if job.attempt == attempt && !job.stopping => {
                    let r =
                        job.ranks.get_mut(rank as usize).ok_or_else(|| Error::BadRequest(format!("job {job_id} has no rank {rank}")))?;
                    r.registered = true;
                    r.last_beat = Instant::now();
                    Some(job.ranks.iter().all(|r| r.registered))
                }
                Some(_) => return Err(stale()),
                None => None,
            }
        };
        let row = self.store.job_row(job_id).await?;
        match all_registered {
            Some(true) if row.job.state == JobState::Scheduled => {
                self.store.transition(job_id, JobState::Running, "all ranks registered", Change::default()).await?;
            }
            Some(_) => {}
            // The supervisor is still starting the job's other ranks (or re-adopting them after a
            // restart): the worker retries.
            None if row.attempt == attempt && row.job.state.holds_devices() => {
                return Err(Error::NotYet(format!("job {job_id} is still being started; retry")));
            }
            None => return Err(stale()),
        }
        Ok(())
    }

    /// Records a heartbeat; answers whether the worker should stop.
    /// Whether the worker should stop; `None` if its job is not live here (the caller asks the
    /// store).
    pub fn heartbeat(&self, job_id: i64, rank: u32, attempt: u32, step: i64) -> Option<bool> {
        let mut live = self.live.lock().expect("live jobs");
        let job = live.get_mut(&job_id)?;
        if job.attempt != attempt {
            // A worker of an older attempt.
            return Some(true);
        }
        if let Some(r) = job.ranks.get_mut(rank as usize) {
            r.last_beat = Instant::now();
            r.registered = true;
            r.saw_step(step);
        }
        Some(job.stopping)
    }

    /// Drops what is kept about a deleted job: its metric series.
    pub fn forget_job(&self, job_id: i64) {
        if let Some(s) = self.series.lock().expect("job series").remove(&job_id) {
            self.metrics.forget_job(job_id, &s.ranks);
        }
        self.restart_after.lock().expect("restart pauses").remove(&job_id);
    }

    /// Stops every rank of a cancelled job: SIGTERM now, SIGKILL after a grace period.
    pub fn stop_job(&self, job_id: i64) {
        let pids: Vec<(u32, u64)> = {
            let mut live = self.live.lock().expect("live jobs");
            let Some(job) = live.get_mut(&job_id) else { return };
            job.stopping = true;
            job.ranks.iter().map(|r| (r.pid, r.proc_start)).collect()
        };
        for (pid, start) in &pids {
            process::signal(*pid, *start, Signal::SIGTERM);
        }
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            for (pid, start) in pids {
                process::signal(pid, start, Signal::SIGKILL);
            }
        });
        self.wake();
    }

    pub fn update_step_gauges(&self, job_id: i64, steps: &[StepMetrics]) {
        let job = job_id.to_string();
        let mut series = self.series.lock().expect("job series");
        let tracked = series.entry(job_id).or_default();
        for s in steps {
            tracked.ranks.insert(s.rank);
            let labels = [job.as_str(), &s.rank.to_string()];
            self.metrics.step.with_label_values(&labels).set(s.step);
            self.metrics.step_seconds.with_label_values(&labels).set(s.step_ms / 1e3);
            self.metrics.comm_seconds.with_label_values(&labels).set(s.comm_ms / 1e3);
            self.metrics.tokens_per_second.with_label_values(&labels).set(s.tokens_per_s);
            self.metrics.loss.with_label_values(&labels).set(s.loss);
            self.metrics.mem_bytes.with_label_values(&labels).set(s.mem_bytes as f64);
            self.metrics.grad_comm_seconds.with_label_values(&labels).set(s.grad_comm_ms / 1e3);
            self.metrics.grad_comm_waited_seconds.with_label_values(&labels).set(s.grad_comm_waited_ms / 1e3);
            match s.mfu {
                Some(mfu) => self.metrics.mfu.with_label_values(&labels).set(mfu),
                None => {
                    let _ = self.metrics.mfu.remove_label_values(&labels);
                }
            }
            let counted = tracked.counted.entry(s.rank).or_insert(0);
            if s.step > *counted {
                *counted = s.step;
                self.metrics.skipped_steps.with_label_values(&labels).inc_by(u64::from(s.skipped));
                if s.rank == 0 {
                    self.metrics.tokens.with_label_values(&[job.as_str()]).inc_by(s.tokens.max(0) as u64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_is_hung_after_ten_of_its_slowest_steps_with_floors_for_loading_and_saving() {
        let mut rank = Rank::new(1, 1, None, true);
        assert_eq!(stall_limit(None, &rank), FIRST_STEP_FLOOR, "loading the model and data");
        assert_eq!(stall_limit(Some(Duration::from_secs(3)), &rank), Duration::from_secs(3), "as the operator says");
        rank.saw_step(1);
        assert_eq!(stall_limit(None, &rank), STALL_FLOOR);
        rank.slowest_step = Duration::from_secs(120);
        assert_eq!(stall_limit(None, &rank), Duration::from_secs(1200), "ten of its slowest steps");
        rank.step_since -= Duration::from_millis(30);
        rank.saw_step(2);
        assert_eq!(rank.slowest_step, Duration::from_secs(120), "a faster step leaves the slowest");
    }
}
