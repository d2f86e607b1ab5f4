//! Jobs and their state transitions.

use std::path::Path;

use gantry_api::{Job, JobEvent, JobPage, JobSpec, JobState, MemoryEstimate};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{now_ms, Store};
use crate::error::{Error, Result};

const JOB_COLUMNS: &str = "id, name, spec, state, reason, devices, placement, restarts, attempt, run_dir, step, checkpoint_step, \
     created_ms, updated_ms, owner, memory_estimate";

/// A job row with the supervisor's bookkeeping that the API does not show.
#[derive(Clone, Debug)]
pub struct JobRow {
    pub job: Job,
    /// Incremented each time the job is scheduled; workers of an older attempt are stale.
    pub attempt: u32,
}

/// Records a job's move in the transaction that makes it (`from` None: the job was created).
async fn record_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: i64,
    at_ms: i64,
    from: Option<JobState>,
    to: JobState,
    reason: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO job_events (job_id, at_ms, from_state, to_state, reason) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(at_ms)
        .bind(from.map(JobState::as_str))
        .bind(to.as_str())
        .bind(reason)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn job_from_row(r: &AnyRow) -> Result<JobRow> {
    let spec_json: String = r.try_get("spec")?;
    let spec: JobSpec = serde_json::from_str(&spec_json).map_err(|e| Error::Store(format!("stored spec does not parse: {e}")))?;
    let state: String = r.try_get("state")?;
    let placement: String = r.try_get("placement")?;
    let estimate: Option<String> = r.try_get("memory_estimate")?;
    let memory_estimate = estimate
        .map(|e| serde_json::from_str(&e).map_err(|e| Error::Store(format!("stored memory estimate does not parse: {e}"))))
        .transpose()?;
    Ok(JobRow {
        job: Job {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            state: state.parse().map_err(Error::Store)?,
            reason: r.try_get("reason")?,
            spec,
            devices: r.try_get::<i64, _>("devices")? as u32,
            placement: placement.split(',').filter(|s| !s.is_empty()).map(String::from).collect(),
            restarts: r.try_get::<i64, _>("restarts")? as u32,
            run_dir: r.try_get("run_dir")?,
            step: r.try_get("step")?,
            checkpoint_step: r.try_get("checkpoint_step")?,
            created_ms: r.try_get("created_ms")?,
            updated_ms: r.try_get("updated_ms")?,
            owner: r.try_get("owner")?,
            memory_estimate,
        },
        attempt: r.try_get::<i64, _>("attempt")? as u32,
    })
}

/// What a transition changes besides the state.
#[derive(Clone, Debug, Default)]
pub struct Change<'a> {
    /// Device slots, when the job becomes `scheduled`.
    pub placement: Option<&'a [String]>,
}

impl Store {
    /// Stores a new job, `queued`, with its run directory `runs_root/job-<id>`, and records the
    /// event that created it.
    #[cfg(test)]
    pub async fn create_job(&self, spec: &JobSpec, runs_root: &Path) -> Result<JobRow> {
        self.create_job_as(spec, runs_root, None, None).await
    }

    /// As `create_job`, recording who submitted it and its memory estimate.
    pub async fn create_job_as(
        &self,
        spec: &JobSpec,
        runs_root: &Path,
        owner: Option<&str>,
        estimate: Option<&MemoryEstimate>,
    ) -> Result<JobRow> {
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| Path::new(&spec.model.path).file_name().and_then(|n| n.to_str()).unwrap_or("job").to_string());
        let spec_json = serde_json::to_string(spec).map_err(|e| Error::Internal(e.to_string()))?;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let estimate = estimate.map(serde_json::to_string).transpose().map_err(|e| Error::Internal(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO jobs (name, spec, state, reason, devices, created_ms, updated_ms, owner, memory_estimate) \
             VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8) RETURNING id",
        )
        .bind(&name)
        .bind(&spec_json)
        .bind(JobState::Queued.as_str())
        .bind("waiting for the scheduler")
        .bind(spec.resources.devices.count() as i64)
        .bind(now)
        .bind(owner)
        .bind(estimate)
        .fetch_one(&mut *tx)
        .await?;
        let run_dir = runs_root.join(format!("job-{id}"));
        sqlx::query("UPDATE jobs SET run_dir = $1 WHERE id = $2")
            .bind(run_dir.to_string_lossy().as_ref())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        record_event(&mut tx, id, now, None, JobState::Queued, "submitted").await?;
        tx.commit().await?;
        self.job_row(id).await
    }

    pub async fn job_row(&self, id: i64) -> Result<JobRow> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(&self.pool).await?;
        job_from_row(&row.ok_or(Error::JobNotFound(id))?)
    }

    pub async fn job(&self, id: i64) -> Result<Job> {
        Ok(self.job_row(id).await?.job)
    }

    /// Jobs from newest to oldest, optionally in one state; `after` is the last id of the previous
    /// page. Both forms walk an index (`jobs_state_id` or the primary key).
    pub async fn list_jobs(&self, state: Option<JobState>, after: Option<i64>, limit: u32) -> Result<JobPage> {
        let limit = limit.clamp(1, 1000) as i64;
        let after = after.unwrap_or(i64::MAX);
        let rows = match state {
            Some(s) => {
                sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state = $1 AND id < $2 ORDER BY id DESC LIMIT $3"))
                    .bind(s.as_str())
                    .bind(after)
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id < $1 ORDER BY id DESC LIMIT $2"))
                    .bind(after)
                    .bind(limit + 1)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        let mut jobs = rows.iter().map(|r| job_from_row(r).map(|j| j.job)).collect::<Result<Vec<_>>>()?;
        let next_after = if jobs.len() as i64 > limit {
            jobs.truncate(limit as usize);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next_after })
    }

    /// Every job in one of `states`, oldest first (the scheduler's queue order).
    pub async fn jobs_in(&self, states: &[JobState]) -> Result<Vec<JobRow>> {
        let mut out = Vec::new();
        // One query for all the states, so a job that moves between two of them meanwhile is
        // seen once, not missed (the supervisor stops live jobs it does not see).
        let marks: Vec<String> = (1..=states.len()).map(|i| format!("${i}")).collect();
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ({}) ORDER BY id", marks.join(", "));
        let mut q = sqlx::query(&sql);
        for s in states {
            q = q.bind(s.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        for r in &rows {
            match job_from_row(r) {
                Ok(j) => out.push(j),
                // A row this version cannot read (a spec stored by another version, a hand
                // edit) would fail every round of the supervisor, and so every other job:
                // that job fails instead, with the reason, and its row is kept as it is.
                Err(e) => {
                    let id: i64 = r.try_get("id")?;
                    let state: JobState = r.try_get::<String, _>("state")?.parse().map_err(Error::Store)?;
                    let reason = format!("this daemon cannot read the stored job: {e}");
                    tracing::error!(job_id = id, "{reason}; the job is failed");
                    self.fail_unreadable(id, state, &reason).await?;
                }
            }
        }
        out.sort_by_key(|j| j.job.id);
        Ok(out)
    }

    /// Moves a job whose row cannot be read from `from` to failed (the row as it is otherwise).
    async fn fail_unreadable(&self, id: i64, from: JobState, reason: &str) -> Result<()> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query("UPDATE jobs SET state = $1, reason = $2, placement = '', updated_ms = $3 WHERE id = $4 AND state = $5")
            .bind(JobState::Failed.as_str())
            .bind(reason)
            .bind(now)
            .bind(id)
            .bind(from.as_str())
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() == 1 {
            record_event(&mut tx, id, now, Some(from), JobState::Failed, reason).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Moves a job to `to`, recording the event, if the state machine allows it from the state
    /// the job is in. Entering `scheduled` sets the placement and starts a new attempt; entering
    /// `restarting` counts a restart; leaving the device-holding states frees the devices.
    pub async fn transition(&self, id: i64, to: JobState, reason: &str, change: Change<'_>) -> Result<JobRow> {
        let current = self.job_row(id).await?;
        let from = current.job.state;
        if !from.can_become(to) {
            return Err(Error::IllegalTransition { id, from, to });
        }
        let now = now_ms();
        let placement = match (to, change.placement) {
            (JobState::Scheduled, Some(p)) => p.join(","),
            (JobState::Scheduled, None) => return Err(Error::Internal(format!("job {id} scheduled without a placement"))),
            (s, _) if s.holds_devices() => current.job.placement.join(","),
            _ => String::new(),
        };
        let attempt_inc = i64::from(to == JobState::Scheduled);
        let restart_inc = i64::from(to == JobState::Restarting);
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE jobs SET state = $1, reason = $2, placement = $3, attempt = attempt + $4, restarts = restarts + $5, updated_ms = $6 \
             WHERE id = $7 AND state = $8",
        )
        .bind(to.as_str())
        .bind(reason)
        .bind(&placement)
        .bind(attempt_inc)
        .bind(restart_inc)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            // Someone moved the job since we read it: report the state it is in now.
            drop(tx);
            let now_state = self.job_row(id).await?.job.state;
            return Err(Error::IllegalTransition { id, from: now_state, to });
        }
        if to == JobState::Restarting {
            // The run goes back to its last checkpoint: the job's step with it (reports of the
            // resumed run move it forward again), not left at where the failed attempt got to.
            sqlx::query("UPDATE jobs SET step = checkpoint_step WHERE id = $1").bind(id).execute(&mut *tx).await?;
        }
        record_event(&mut tx, id, now, Some(from), to, reason).await?;
        tx.commit().await?;
        self.job_row(id).await
    }

    /// Removes a job that has ended, with everything recorded about it (events, metrics, logs,
    /// workers and checkpoints go with it). False if it had not ended (or is gone).
    pub async fn delete_job(&self, id: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        // Its rows first, then the job: SQLite enforces the cascade only on connections that turned
        // foreign keys on, and an explicit delete does not depend on that.
        let finals = [JobState::Succeeded, JobState::Failed, JobState::Cancelled].map(JobState::as_str);
        let gone = sqlx::query("DELETE FROM jobs WHERE id = $1 AND state IN ($2, $3, $4)")
            .bind(id)
            .bind(finals[0])
            .bind(finals[1])
            .bind(finals[2])
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if gone == 1 {
            for table in ["job_events", "step_metrics", "log_lines", "workers", "checkpoints"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_id = $1")).bind(id).execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(gone == 1)
    }

    /// Says why a job waits, without an event (the reason changes as other jobs come and go).
    pub async fn set_reason(&self, id: i64, reason: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET reason = $1 WHERE id = $2 AND reason <> $1").bind(reason).bind(id).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn events(&self, id: i64) -> Result<Vec<JobEvent>> {
        self.job_row(id).await?;
        let rows = sqlx::query("SELECT at_ms, from_state, to_state, reason FROM job_events WHERE job_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let from: Option<String> = r.try_get("from_state")?;
                let to: String = r.try_get("to_state")?;
                Ok(JobEvent {
                    job_id: id,
                    at_ms: r.try_get("at_ms")?,
                    from: from.map(|f| f.parse()).transpose().map_err(Error::Store)?,
                    to: to.parse().map_err(Error::Store)?,
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    /// How many jobs are in each state (for the `gantry_jobs` gauge).
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get("state")?;
                Ok((s.parse().map_err(Error::Store)?, r.try_get::<i64, _>("n")?))
            })
            .collect()
    }
}
