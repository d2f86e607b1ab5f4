//! The job service: what REST and gRPC both call. No HTTP, gRPC or SQL types here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gantry_api::{DeviceInfo, Job, JobEvent, JobPage, JobSpec, JobState, LogLine, SpecError, StepMetrics};

use crate::config::{fits_node, slot_kind, DaemonConfig};
use crate::error::{Error, Result};
use crate::store::jobs::Change;
use crate::store::Store;
use crate::supervisor::Supervisor;

#[derive(Clone)]
pub struct JobService {
    pub store: Store,
    pub supervisor: Arc<Supervisor>,
    pub config: Arc<DaemonConfig>,
}

impl JobService {
    /// Validates a spec (JSON, the REST body's schema) and queues the job. An invalid spec is
    /// refused with the field at fault, before anything is stored.
    pub async fn submit(&self, spec_json: &str) -> Result<Job> {
        let mut spec = JobSpec::from_json(spec_json)?;
        self.check_runnable(&mut spec)?;
        let row = self.store.create_job(&spec, &self.config.runs_root()).await?;
        self.supervisor.wake();
        Ok(row.job)
    }

    /// What the schema cannot say: the files exist, the node has the devices, this build can run
    /// the layout. Relative paths are taken from the daemon's working directory and stored
    /// absolute, since workers run elsewhere.
    fn check_runnable(&self, spec: &mut JobSpec) -> Result<()> {
        let cwd = std::env::current_dir().map_err(Error::io("."))?;
        let abs = |p: &str| -> String { absolute(&cwd, p).to_string_lossy().into_owned() };
        spec.model.path = abs(&spec.model.path);
        spec.data.train = abs(&spec.data.train);
        if let Some(t) = &spec.data.tokenizer {
            spec.data.tokenizer = Some(abs(t));
        }
        if !Path::new(&spec.model.path).join("config.json").is_file() {
            return Err(SpecError::new("model.path", format!("{} holds no config.json", spec.model.path)).into());
        }
        // What the model's config rules out would fail every attempt of the job, each restart
        // included: refused here instead.
        let model = gantry_engine::models::ModelConfig::from_dir(Path::new(&spec.model.path))
            .map_err(|e| SpecError::new("model.path", format!("{}: {e}", spec.model.path)))?;
        if spec.data.seq_len > model.max_positions {
            return Err(SpecError::new(
                "data.seq_len",
                format!("{} exceeds the model's {} positions ({})", spec.data.seq_len, model.max_positions, spec.model.path),
            )
            .into());
        }
        if !Path::new(&spec.data.train).is_file() {
            return Err(SpecError::new("data.train", format!("{} is not a file on the daemon's machine", spec.data.train)).into());
        }
        if let Some(t) = &spec.data.tokenizer {
            if !Path::new(t).is_file() {
                return Err(SpecError::new("data.tokenizer", format!("{t} is not a file")).into());
            }
        }
        fits_node(&spec.resources.devices, &self.config.slots).map_err(|m| SpecError::new("resources.devices", m))?;
        // What the trainer cannot run is refused here, with the field to change, rather than
        // accepted and failed by its workers.
        gantry_engine::train::check_layout(spec).map_err(|e| match e {
            gantry_engine::Error::Unsupported { field, message } => SpecError::new(&field, message),
            other => SpecError::new("resources.devices", other.to_string()),
        })?;
        Ok(())
    }

    /// The job a worker's report is about, if the worker can belong to it: the job exists, the
    /// rank is one of its ranks and the attempt is not from the future. (Reports of an earlier
    /// attempt are taken: they describe steps that were trained.)
    pub async fn check_worker(&self, w: &gantry_api::proto::WorkerId) -> Result<Job> {
        let row = self.store.job_row(w.job_id).await?;
        let job = row.job;
        if w.rank >= job.devices.max(1) {
            return Err(Error::BadRequest(format!("job {} has {} ranks; there is no rank {}", job.id, job.devices, w.rank)));
        }
        if w.attempt > row.attempt {
            return Err(Error::BadRequest(format!("job {} is at attempt {}, not {}", job.id, row.attempt, w.attempt)));
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

    pub async fn list(&self, state: Option<&str>, after: Option<i64>, limit: Option<u32>) -> Result<JobPage> {
        let state: Option<JobState> = state.filter(|s| !s.is_empty()).map(str::parse).transpose().map_err(Error::BadRequest)?;
        self.store.list_jobs(state, after, limit.unwrap_or(50)).await
    }

    /// Cancels a job in any non-final state: the state is recorded first, then every rank is
    /// stopped.
    ///
    /// The supervisor may move the job between reading its state and the conditional update
    /// (queued → scheduled → running, running → restarting): the cancel then tries again from
    /// the new state, and fails only once the job has ended.
    pub async fn cancel(&self, id: i64) -> Result<Job> {
        let mut tries = 0;
        loop {
            let job = self.store.job(id).await?;
            if job.state.is_final() {
                return Err(Error::IllegalTransition { id, from: job.state, to: JobState::Cancelled });
            }
            match self.store.transition(id, JobState::Cancelled, "cancelled by request", Change::default()).await {
                Ok(row) => {
                    self.supervisor.stop_job(id);
                    return Ok(row.job);
                }
                Err(Error::IllegalTransition { from, .. }) if !from.is_final() && tries < 10 => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn metrics(&self, id: i64, rank: Option<u32>, after_step: Option<i64>, limit: Option<u32>) -> Result<Vec<StepMetrics>> {
        self.store.job_row(id).await?;
        self.store.metrics(id, rank, after_step.unwrap_or(0), limit.unwrap_or(10_000).min(100_000)).await
    }

    pub async fn events(&self, id: i64) -> Result<Vec<JobEvent>> {
        self.store.events(id).await
    }

    pub async fn logs(&self, id: i64, rank: Option<u32>, after_offset: Option<i64>, limit: Option<u32>) -> Result<Vec<LogLine>> {
        self.store.job_row(id).await?;
        self.store.logs(id, rank, after_offset.unwrap_or(-1), limit.unwrap_or(10_000).min(100_000)).await
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

fn absolute(cwd: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}
