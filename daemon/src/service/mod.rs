//! The job service: what REST and gRPC both call. No HTTP, gRPC or SQL types here.

mod admission;

use std::path::Path;
use std::sync::Arc;

use gantry_api::{CheckpointInfo, Checkpoints, DeviceInfo, Job, JobEvent, JobPage, JobSpec, JobState, LogLine, StepMetrics};

use crate::auth::Caller;
use crate::config::{slot_kind, DaemonConfig};
use crate::error::{Error, Result};
use crate::store::jobs::Change;
use crate::store::Store;
use crate::supervisor::Supervisor;

/// A page of `GET /v1/jobs` is cut after about this many bytes of JSON (each job carries its
/// spec), whatever its `limit`.
pub const PAGE_BYTES: usize = 1 << 20;

#[derive(Clone)]
pub struct JobService {
    pub store: Store,
    pub supervisor: Arc<Supervisor>,
    pub config: Arc<DaemonConfig>,
    /// Submissions being checked at once (each may read a model's config, index and tokenizer).
    pub admissions: Arc<tokio::sync::Semaphore>,
    /// Jobs being deleted: a second delete of one waits for none of the first's steps.
    pub deleting: Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
}

impl JobService {
    pub fn new(store: Store, supervisor: Arc<Supervisor>, config: Arc<DaemonConfig>) -> JobService {
        JobService {
            store,
            supervisor,
            config,
            admissions: Arc::new(tokio::sync::Semaphore::new(2)),
            deleting: Arc::new(std::sync::Mutex::new(Default::default())),
        }
    }
}

impl JobService {
    /// Validates a spec (JSON, the REST body's schema) and queues the job, owned by the caller. An
    /// invalid spec, or one that could never run here, is refused with the field at fault, before
    /// anything is stored.
    /// Stores a job for `spec` (parsed from the request's JSON or TOML) once it passes admission.
    pub async fn submit(&self, caller: &Caller, mut spec: JobSpec) -> Result<Job> {
        // Reading the model's config, its tokenizer and its weights' index is file work: off the
        // async runtime, and a few at a time.
        let _turn = self.admissions.acquire().await.map_err(|e| Error::Internal(e.to_string()))?;
        let config = self.config.clone();
        let (spec, estimate) = tokio::task::spawn_blocking(move || admission::check_runnable(&config, &mut spec).map(|e| (spec, e)))
            .await
            .map_err(|e| Error::Internal(format!("checking the spec: {e}")))??;
        let row = self.store.create_job_as(&spec, &self.config.runs_root, caller.user.as_deref(), Some(&estimate)).await?;
        self.supervisor.wake();
        Ok(row.job)
    }

    /// The job a worker's report is about, if the worker can belong to it: the job exists and has
    /// not ended, the rank is one of its ranks and the attempt is not from the future. (Reports of
    /// an earlier attempt are taken: they describe steps that were trained.)
    pub async fn check_worker(&self, w: &gantry_api::proto::WorkerId) -> Result<Job> {
        let row = self.store.job_row(w.job_id).await?;
        let job = row.job;
        if w.rank >= job.devices.max(1) {
            return Err(Error::BadRequest(format!("job {} has {} ranks; there is no rank {}", job.id, job.devices, w.rank)));
        }
        if w.attempt > row.attempt {
            return Err(Error::BadRequest(format!("job {} is at attempt {}, not {}", job.id, row.attempt, w.attempt)));
        }
        if job.state.is_final() {
            return Err(Error::BadRequest(format!("job {} has ended ({}): it takes no more reports", job.id, job.state)));
        }
        Ok(job)
    }

    /// Whether every log line of `job` is stored: it is over, and (a cancelled job stops its
    /// workers after its state is recorded) none of its workers is still running here.
    pub fn logs_complete(&self, job: &Job) -> bool {
        job.state.is_final() && !self.supervisor.is_live(job.id)
    }

    pub async fn get(&self, id: i64) -> Result<Job> {
        self.store.job(id).await
    }

    /// A page of jobs, newest first: at most `limit` (1 to 1000, 50 by default) and about
    /// `PAGE_BYTES` of JSON; `next_after` continues it.
    pub async fn list(&self, state: Option<&str>, after: Option<i64>, limit: Option<u32>) -> Result<JobPage> {
        let state: Option<JobState> = state.filter(|s| !s.is_empty()).map(str::parse).transpose().map_err(Error::BadRequest)?;
        let limit = limit.unwrap_or(50);
        if !(1..=1000).contains(&limit) {
            return Err(Error::BadRequest(format!("limit must be 1 to 1000, not {limit}")));
        }
        let mut page = self.store.list_jobs(state, after, limit).await?;
        cut_page(&mut page, PAGE_BYTES);
        Ok(page)
    }

    /// Cancels a job in any non-final state: the state is recorded first, then every rank is
    /// stopped. A user may cancel its own jobs; an admin any.
    ///
    /// The supervisor may move the job between reading its state and the conditional update
    /// (queued → scheduled → running, running → restarting): the cancel then tries again from
    /// the new state, and fails only once the job has ended.
    pub async fn cancel(&self, caller: &Caller, id: i64) -> Result<Job> {
        let mut tries = 0;
        loop {
            let job = self.store.job(id).await?;
            caller.check_may_change(id, job.owner.as_deref(), "cancel")?;
            if job.state.is_final() {
                return Err(Error::IllegalTransition { id, from: job.state, to: JobState::Cancelled });
            }
            let by = caller.user.as_deref().map_or(String::new(), |u| format!(" by {u}"));
            match self.store.transition(id, JobState::Cancelled, &format!("cancelled by request{by}"), Change::default()).await {
                Ok(row) => {
                    self.supervisor.stop_job(id);
                    return Ok(row.job);
                }
                Err(Error::IllegalTransition { from, .. }) if !from.is_final() && tries < 10 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes a job that has ended: its rows and its run directory. The directory is first moved
    /// aside (one rename), the rows deleted, then the directory removed: a failure between leaves
    /// the job as it was (the directory is moved back) or only a directory to remove, never rows
    /// without their run.
    pub async fn delete(&self, caller: &Caller, id: i64) -> Result<()> {
        if !self.deleting.lock().expect("deleting").insert(id) {
            return Err(Error::Conflict(format!("job {id} is being deleted")));
        }
        let result = self.delete_once(caller, id).await;
        self.deleting.lock().expect("deleting").remove(&id);
        result
    }

    async fn delete_once(&self, caller: &Caller, id: i64) -> Result<()> {
        let job = self.store.job(id).await?;
        caller.check_may_change(id, job.owner.as_deref(), "delete")?;
        if !job.state.is_final() {
            return Err(Error::Conflict(format!("job {id} is {}: cancel it first, then delete it once it has ended", job.state)));
        }
        // Workers still running write into the run directory: this daemon's (being stopped), or
        // an earlier daemon's that were cancelled while it was away (told to stop at their next
        // heartbeat).
        let running = self.store.workers(id).await?.iter().any(|w| crate::supervisor::process::is_alive(w.pid, w.proc_start));
        if self.supervisor.is_live(id) || running {
            return Err(Error::Conflict(format!("job {id}'s workers are still stopping; try again in a few seconds")));
        }
        let run_dir = Path::new(&job.run_dir).to_path_buf();
        // Only a directory of this daemon's runs is removed: a run_dir that points elsewhere (an
        // older layout, a hand edit) is left where it is.
        let runs = self.config.data_dir.join("runs");
        let ours = !job.run_dir.is_empty() && run_dir.starts_with(&runs) && !job.run_dir.contains("/../");
        let aside = run_dir.with_file_name(format!(".deleting-job-{id}-{}", crate::store::now_ms()));
        let moved = ours && run_dir.exists() && {
            std::fs::rename(&run_dir, &aside).map_err(Error::io(&run_dir))?;
            true
        };
        match self.store.delete_job(id).await {
            Ok(true) => {}
            result => {
                if moved {
                    let _ = std::fs::rename(&aside, &run_dir);
                }
                return match result {
                    Ok(_) => Err(Error::Conflict(format!("job {id} changed while it was being deleted; try again"))),
                    Err(e) => Err(e),
                };
            }
        }
        self.supervisor.forget_job(id);
        if moved {
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&aside).map_err(Error::io(&aside)))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?;
            if let Err(e) = removed {
                tracing::warn!(job_id = id, "the job is deleted but its run directory could not be removed: {e}");
            }
        } else if !ours {
            tracing::info!(
                job_id = id,
                "the job is deleted; its run directory {} lies outside this daemon's runs and is left",
                job.run_dir
            );
        }
        Ok(())
    }

    pub async fn metrics(&self, id: i64, rank: Option<u32>, after_step: Option<i64>, limit: Option<u32>) -> Result<Vec<StepMetrics>> {
        self.store.job_row(id).await?;
        self.store.metrics(id, rank, after_step.unwrap_or(0), page_limit(limit, 10_000, 100_000)?).await
    }

    /// The committed checkpoints of a job's run and its final model, read from its run directory.
    pub async fn checkpoints(&self, id: i64) -> Result<Checkpoints> {
        let job = self.store.job(id).await?;
        let run_dir = std::path::PathBuf::from(&job.run_dir);
        tokio::task::spawn_blocking(move || list_checkpoints(id, &run_dir))
            .await
            .map_err(|e| Error::Internal(format!("listing checkpoints: {e}")))
    }

    pub async fn events(&self, id: i64) -> Result<Vec<JobEvent>> {
        self.store.events(id).await
    }

    /// Log lines, at most `limit` (1 to 100,000; 10,000 by default) and about `PAGE_BYTES` of
    /// text: a reader pages on until a page comes back empty.
    pub async fn logs(&self, id: i64, rank: Option<u32>, after_offset: Option<i64>, limit: Option<u32>) -> Result<Vec<LogLine>> {
        self.store.job_row(id).await?;
        let limit = page_limit(limit, 10_000, 100_000)?;
        let mut lines = self.store.logs(id, rank, after_offset.unwrap_or(-1), limit).await?;
        let mut bytes = 0;
        if let Some(n) = lines.iter().position(|l| {
            bytes += l.line.len() + 64;
            bytes > PAGE_BYTES
        }) {
            lines.truncate(n.max(1));
        }
        Ok(lines)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let held = self.supervisor.occupied().await?;
        Ok(self
            .config
            .slots
            .iter()
            .map(|s| DeviceInfo { id: s.clone(), kind: slot_kind(s).to_string(), job_id: held.get(s).copied() })
            .collect())
    }

    pub async fn record_steps(&self, job_id: i64, steps: &[StepMetrics]) -> Result<()> {
        self.store.insert_steps(job_id, steps).await?;
        self.supervisor.update_step_gauges(job_id, steps);
        Ok(())
    }
}

/// A page's `limit`: `default` when not given, 1 to `max` (400 otherwise).
fn page_limit(limit: Option<u32>, default: u32, max: u32) -> Result<u32> {
    match limit.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(Error::BadRequest(format!("limit must be 1 to {max}, not {n}"))),
    }
}

/// Ends `page` before the job that takes its JSON past `max_bytes` (it keeps at least one job);
/// `next_after` then continues from the last job kept.
fn cut_page(page: &mut JobPage, max_bytes: usize) {
    let mut bytes = 0;
    let over = page.jobs.iter().position(|j| {
        bytes += serde_json::to_vec(j).map_or(0, |v| v.len());
        bytes > max_bytes
    });
    if let Some(n) = over.map(|i| i.max(1)).filter(|n| *n < page.jobs.len()) {
        page.jobs.truncate(n);
        page.next_after = page.jobs.last().map(|j| j.id);
    }
}

/// What `run_dir` holds: committed checkpoints (a half-written one has no manifest and is not
/// listed) and the final model. A run directory not yet made lists nothing.
fn list_checkpoints(job_id: i64, run_dir: &Path) -> Checkpoints {
    use gantry_engine::checkpoint::{checkpoint_step, committed_checkpoints};
    let ms = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let checkpoints = committed_checkpoints(run_dir)
        .into_iter()
        .filter_map(|dir| {
            let step = checkpoint_step(&dir)? as i64;
            let files: Vec<std::fs::Metadata> =
                std::fs::read_dir(&dir).ok()?.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).collect();
            let bytes = files.iter().map(|m| m.len()).sum();
            let written_ms = files.iter().filter_map(|m| m.modified().ok()).map(ms).max().unwrap_or(0);
            Some(CheckpointInfo { step, path: dir.to_string_lossy().into_owned(), bytes, written_ms })
        })
        .collect();
    let final_dir = gantry_engine::run_dir::RunDir::new(run_dir).final_model();
    let final_model = gantry_engine::checkpoint::has_weights(&final_dir).then(|| final_dir.to_string_lossy().into_owned());
    Checkpoints { job_id, checkpoints, final_model }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_ends_before_it_outgrows_its_bytes_and_says_where_to_go_on() {
        let spec = JobSpec::from_toml("[model]\npath = \"m\"\n[data]\ntrain = \"t.bin\"", &[]).unwrap();
        let job = |id: i64| Job {
            id,
            name: "n".repeat(256),
            state: JobState::Queued,
            reason: String::new(),
            spec: spec.clone(),
            devices: 1,
            placement: Vec::new(),
            restarts: 0,
            run_dir: String::new(),
            step: None,
            checkpoint_step: None,
            created_ms: 0,
            updated_ms: 0,
            owner: None,
            memory_estimate: None,
        };
        let one = serde_json::to_vec(&job(1)).unwrap().len();
        let mut page = JobPage { jobs: (0..100).rev().map(job).collect(), next_after: Some(0) };
        cut_page(&mut page, 10 * one + one / 2);
        assert_eq!(page.jobs.len(), 10);
        assert_eq!(page.next_after, Some(90), "the next page starts after the last job kept");
        let mut small = JobPage { jobs: (0..3).map(job).collect(), next_after: None };
        cut_page(&mut small, 1 << 20);
        assert_eq!((small.jobs.len(), small.next_after), (3, None), "a page under the bound is left whole");
        let mut huge = JobPage { jobs: (0..3).map(job).collect(), next_after: None };
        cut_page(&mut huge, 10);
        assert_eq!((huge.jobs.len(), huge.next_after), (1, Some(0)), "at least one job a page");
    }
}
