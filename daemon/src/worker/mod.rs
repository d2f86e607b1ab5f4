//! `gantry worker`: one rank of a job, started by the daemon's supervisor.
//!
//! The worker reads the job's spec from its run directory, registers with the daemon, trains,
//! reports each step and each committed checkpoint, and writes its outcome to
//! `RUN_DIR/ranks/rank-R.json`, so that a daemon that was down when the worker ended still learns
//! how it ended. Its stdout and stderr go to `RUN_DIR/logs/rank-R.log`, which the daemon tails.

pub mod reporter;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use gantry_api::proto::WorkerId;
use gantry_api::JobSpec;
use gantry_engine::comm::Comm;
use gantry_engine::run_dir::RunDir;
use gantry_engine::train::{run_to_end, KeptCheckpoints, RunEvents, StepReport, Trainer};
use serde::{Deserialize, Serialize};

use crate::cli::WorkerArgs;

/// How a rank ended, as written to `RUN_DIR/ranks/rank-R.json`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct RankOutcome {
    pub attempt: u32,
    pub succeeded: bool,
    pub message: String,
}

/// Reads the outcome a rank wrote for `attempt`, if it wrote one.
pub fn read_outcome(run_dir: &Path, rank: u32, attempt: u32) -> Option<RankOutcome> {
    let text = std::fs::read_to_string(RunDir::new(run_dir).outcome(rank)).ok()?;
    serde_json::from_str::<RankOutcome>(&text).ok().filter(|o| o.attempt == attempt)
}

/// The job's spec as the daemon stored it in the run directory: `spec.toml`, or the `spec.json`
/// of a job started by an earlier daemon.
fn read_job_spec(run: &RunDir) -> anyhow::Result<JobSpec> {
    let toml_path = run.spec();
    if toml_path.exists() || !run.legacy_spec_json().exists() {
        let text = std::fs::read_to_string(&toml_path).with_context(|| format!("reading {}", toml_path.display()))?;
        return JobSpec::from_toml(&text, &[]).map_err(|e| anyhow::anyhow!("{}: {e}", toml_path.display()));
    }
    let json_path = run.legacy_spec_json();
    let text = std::fs::read_to_string(&json_path).with_context(|| format!("reading {}", json_path.display()))?;
    JobSpec::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", json_path.display()))
}

/// A worker's side of the run: rank 0 keeps the run's own record (`metrics.jsonl`); every rank
/// logs its progress, reports each step and each committed checkpoint to the daemon, and stops
/// when the daemon asks.
struct Reports<'a> {
    reporter: &'a reporter::Reporter,
    metrics: Option<std::fs::File>,
    rank: u32,
    steps: u64,
}

impl RunEvents for Reports<'_> {
    type Error = anyhow::Error;

    fn before_step(&mut self, step: u64) -> anyhow::Result<()> {
        if self.reporter.stop.load(Ordering::Relaxed) {
            bail!("stopped at step {step} at the daemon's request");
        }
        Ok(())
    }

    fn step(&mut self, r: &StepReport) -> anyhow::Result<()> {
        let record = crate::step_record::step_metrics(self.rank, r);
        if let Some(f) = &mut self.metrics {
            writeln!(f, "{}", serde_json::to_string(&record)?).context("writing metrics.jsonl")?;
        }
        if crate::step_record::logged(r, self.steps) {
            eprintln!("step {}/{} {}", r.step, self.steps, crate::step_record::summary(r));
        }
        self.reporter.step(record);
        Ok(())
    }

    fn checkpoint(&mut self, step: u64, dir: &Path) -> anyhow::Result<()> {
        self.reporter.checkpoint(step as i64, dir.to_string_lossy().into_owned());
        Ok(())
    }
}

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let result = train(&a);
    let outcome = RankOutcome {
        attempt: a.attempt,
        succeeded: result.is_ok(),
        message: match &result {
            Ok(()) => "finished".into(),
            Err(e) => format!("{e:#}"),
        },
    };
    let path = RunDir::new(&a.run_dir).outcome(a.rank);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&outcome)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    result
}

fn train(a: &WorkerArgs) -> anyhow::Result<()> {
    let secret = std::env::var(crate::auth::worker::SECRET_ENV)
        .with_context(|| format!("{} is not set: workers are started by the daemon", crate::auth::worker::SECRET_ENV))?;
    // Not passed on to anything the worker starts. (No other thread runs yet: changing the
    // environment is safe only then.)
    std::env::remove_var(crate::auth::worker::SECRET_ENV);
    let run = RunDir::new(&a.run_dir);
    let mut spec = read_job_spec(&run)?;
    if let Some(gpu) = a.device.as_deref().and_then(|d| d.strip_prefix("cuda:")) {
        let ordinal: u32 = gpu.parse().with_context(|| format!("--device {gpu:?}: not a GPU index"))?;
        spec.resources.devices = gantry_api::Devices::Cuda(vec![ordinal]);
    }
    let workers = a.world_size.max(1) as usize;
    let per_worker = spec.resources.threads.or_else(|| std::thread::available_parallelism().ok().map(|n| (n.get() / workers).max(1)));
    let threads = crate::commands::set_threads(a.threads.or(per_worker))?;
    // The daemon checked the job's files against its read roots at submission. Here each is
    // opened once and checked where it lies, and the trainer reads the files opened (see
    // roots::pin): a link changed since submission, or later, reads nothing new.
    let roots = crate::roots::ReadRoots::new(&a.read_roots).map_err(anyhow::Error::msg)?.deny(a.deny_read.iter().cloned());
    let _pinned = if roots.is_confined() {
        let dir = a.run_dir.join(".inputs").join(format!("rank-{}", a.rank));
        Some(crate::roots::pin_job(&mut spec, &roots, &dir).map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        crate::roots::check_job(&spec, &roots).map_err(|e| anyhow::anyhow!("{e}"))?;
        None
    };
    let id = WorkerId { job_id: a.job_id, rank: a.rank, attempt: a.attempt };
    let reporter = reporter::Reporter::start(&a.daemon, &secret, id, a.world_size, Duration::from_secs(120))?;
    let comm = if a.world_size > 1 {
        Some(Comm::connect(a.rank as usize, a.world_size as usize, &a.rendezvous, crate::commands::comm_timeout())?)
    } else {
        None
    };
    let mut trainer = Trainer::with_comm(crate::engine_config::train_config(&spec), comm)?;
    let lead = trainer.is_lead();
    // The checkpoints this run keeps, oldest first: when resuming, those up to the one resumed
    // from (a newer one it could not load is no part of this run's history, and rotating it
    // would race with the writer that rewrites its step).
    let mut kept: Vec<PathBuf> = gantry_engine::checkpoint::committed_checkpoints(&a.run_dir);
    if let Some(dir) = &a.resume_from {
        // The daemon names the newest committed checkpoint; one that fails its checksums is
        // reported and the one before it used.
        kept = crate::commands::resume_newest(&mut trainer, &a.run_dir)?;
        if kept.last() != Some(dir) {
            eprintln!(
                "warning: {} could not be used; resumed from {} instead",
                dir.display(),
                kept.last().map_or(String::new(), |k| k.display().to_string())
            );
        }
        eprintln!("resumed from {} at step {}", kept.last().map_or(dir.display().to_string(), |k| k.display().to_string()), trainer.step);
    }
    let steps = spec.train.steps;
    eprintln!(
        "job {} rank {}/{} attempt {}: {} parameters, {steps} steps, {threads} threads, rendezvous {}",
        a.job_id,
        a.rank,
        a.world_size,
        a.attempt,
        trainer.model.table.len(),
        a.rendezvous
    );
    // Rank 0 keeps the run's own record; every rank reports its steps to the daemon. A restarted
    // attempt repeats the steps after its checkpoint: the failed attempt's lines for them go.
    let metrics = if lead { Some(crate::commands::open_metrics(&run.metrics(), trainer.step)?) } else { None };
    let mut events = Reports { reporter: &reporter, metrics, rank: a.rank, steps };
    let mut kept = KeptCheckpoints::new(kept, spec.checkpoint.keep);
    run_to_end(&mut trainer, &run, steps, spec.checkpoint.every, &mut kept, &mut events)?;
    eprintln!("finished {steps} steps; model in {}", run.final_model().display());
    // The daemon may be restarting: give it time to come back for the last reports. The run is
    // done either way (its model is written), so it is not failed for want of them: the daemon
    // reads rank 0's steps from metrics.jsonl when it sees the job end.
    if !reporter.finish(Duration::from_secs(600)) {
        eprintln!("warning: the daemon did not acknowledge the last reports within 10 minutes; the run is complete (metrics.jsonl has every step)");
    }
    Ok(())
}
