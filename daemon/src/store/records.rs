//! What jobs report while they run: step metrics, log lines, worker processes, checkpoints.
//! Every insert is idempotent (keyed by step, by byte offset, by rank), so a worker or a log
//! reader that sends something twice after a reconnect stores it once.

use gantry_api::{LogLine, StepMetrics};
use sqlx::Row;

use super::{now_ms, Store};
use crate::error::Result;

/// A worker process the supervisor started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    pub job_id: i64,
    pub rank: u32,
    pub attempt: u32,
    pub pid: u32,
    /// Start time in clock ticks since boot, to tell the process from a later one with its PID.
    pub proc_start: u64,
    pub started_ms: i64,
}

impl Store {
    /// Stores step reports (those already stored are skipped) and advances the job's step.
    /// Returns how many were new.
    pub async fn insert_steps(&self, job_id: i64, steps: &[StepMetrics]) -> Result<u64> {
        if steps.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
        for s in steps {
            new += sqlx::query(
                "INSERT INTO step_metrics (job_id, rank, step, loss, lr, grad_norm, tokens_per_s, mem_bytes, step_ms, comm_ms, \
                 skipped, tokens, grad_comm_ms, grad_comm_waited_ms, mfu, stage_idle) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) ON CONFLICT (job_id, rank, step) DO NOTHING",
            )
            .bind(job_id)
            .bind(i64::from(s.rank))
            .bind(s.step)
            .bind(s.loss)
            .bind(s.lr)
            .bind(s.grad_norm)
            .bind(s.tokens_per_s)
            .bind(s.mem_bytes)
            .bind(s.step_ms)
            .bind(s.comm_ms)
            .bind(i64::from(s.skipped))
            .bind(s.tokens)
            .bind(s.grad_comm_ms)
            .bind(s.grad_comm_waited_ms)
            // The Any driver cannot bind a typed NULL: an unknown MFU travels as NaN (NULL in SQLite).
            .bind(s.mfu.unwrap_or(f64::NAN))
            .bind(serde_json::to_string(&s.stage_idle).expect("a list of numbers serialises"))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        let max = steps.iter().map(|s| s.step).max().unwrap_or(0);
        sqlx::query("UPDATE jobs SET step = $1 WHERE id = $2 AND (step IS NULL OR step < $1)")
            .bind(max)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(new)
    }

    /// Drops a job's step reports after `step`: the next attempt resumes from the checkpoint of
    /// `step` and reports the later steps again, and its reports are the run's (a step is stored
    /// once, so the failed attempt's would otherwise keep their place). Called as the attempt
    /// starts, with the step it resumes from, which may be newer than the last checkpoint the
    /// store heard of: the steps up to it are never reported again, so they are kept.
    pub async fn drop_steps_after(&self, job_id: i64, step: i64) -> Result<u64> {
        let gone =
            sqlx::query("DELETE FROM step_metrics WHERE job_id = $1 AND step > $2").bind(job_id).bind(step).execute(&self.pool).await?;
        Ok(gone.rows_affected())
    }

    /// A job's step series in step order (by rank within a step), from `after_step` (exclusive),
    /// at most `limit` rows, in whole steps: a client pages by passing the last step it got as
    /// `after_step`, so a page that ended inside a step would lose the step's other ranks. A full
    /// page drops its last, possibly partial, step; a page of one step holds all of its ranks.
    pub async fn metrics(&self, job_id: i64, rank: Option<u32>, after_step: i64, limit: u32) -> Result<Vec<StepMetrics>> {
        let mut page = self.metric_rows(job_id, rank, after_step, None, limit).await?;
        let (Some(first), Some(last)) = (page.first().map(|m| m.step), page.last().map(|m| m.step)) else {
            return Ok(page);
        };
        if rank.is_none() && page.len() == limit as usize {
            if first == last {
                page = self.metric_rows(job_id, None, after_step, Some(last), u32::MAX).await?;
            } else {
                page.retain(|m| m.step != last);
            }
        }
        Ok(page)
    }

    /// Rows with `after_step < step` (and `step <= up_to`), at most `limit`.
    async fn metric_rows(
        &self,
        job_id: i64,
        rank: Option<u32>,
        after_step: i64,
        up_to: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StepMetrics>> {
        let cols = "rank, step, loss, lr, grad_norm, tokens_per_s, mem_bytes, step_ms, comm_ms, skipped, tokens, grad_comm_ms, \
                    grad_comm_waited_ms, mfu, stage_idle";
        let one_rank =
            format!("SELECT {cols} FROM step_metrics WHERE job_id = $1 AND rank = $2 AND step > $3 AND step <= $4 ORDER BY step LIMIT $5");
        let all_ranks =
            format!("SELECT {cols} FROM step_metrics WHERE job_id = $1 AND step > $2 AND step <= $3 ORDER BY step, rank LIMIT $4");
        let q = match rank {
            Some(r) => sqlx::query(&one_rank).bind(job_id).bind(i64::from(r)),
            None => sqlx::query(&all_ranks).bind(job_id),
        };
        let rows = q.bind(after_step).bind(up_to.unwrap_or(i64::MAX)).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                // SQLite stores a NaN as NULL: read it back as NaN.
                let real = |col: &str| -> Result<f64> { Ok(r.try_get::<Option<f64>, _>(col)?.unwrap_or(f64::NAN)) };
                Ok(StepMetrics {
                    rank: r.try_get::<i64, _>("rank")? as u32,
                    step: r.try_get("step")?,
                    loss: real("loss")?,
                    lr: real("lr")?,
                    grad_norm: real("grad_norm")?,
                    tokens_per_s: real("tokens_per_s")?,
                    mem_bytes: r.try_get("mem_bytes")?,
                    step_ms: real("step_ms")?,
                    comm_ms: real("comm_ms")?,
                    skipped: r.try_get::<i64, _>("skipped")? != 0,
                    tokens: r.try_get("tokens")?,
                    grad_comm_ms: real("grad_comm_ms")?,
                    grad_comm_waited_ms: real("grad_comm_waited_ms")?,
                    mfu: Some(real("mfu")?).filter(|m| m.is_finite()),
                    // (JSON has no NaN: an idle share is a finite fraction.)
                    stage_idle: serde_json::from_str(&r.try_get::<String, _>("stage_idle")?).unwrap_or_default(),
                })
            })
            .collect()
    }

    pub async fn insert_logs(&self, job_id: i64, lines: &[LogLine]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for l in lines {
            // PostgreSQL's text refuses NUL characters (a program's stray binary output): one such
            // line would fail its whole batch, and every retry of it, so nothing after it would
            // ever be stored.
            let text = if l.line.contains('\0') { std::borrow::Cow::Owned(l.line.replace('\0', "\u{FFFD}")) } else { (&l.line).into() };
            sqlx::query(
                "INSERT INTO log_lines (job_id, rank, \"offset\", at_ms, line) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (job_id, rank, \"offset\") DO NOTHING",
            )
            .bind(job_id)
            .bind(i64::from(l.rank))
            .bind(l.offset)
            .bind(l.at_ms)
            .bind(text.as_ref())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Log lines of a job (one rank or all), ordered by rank then offset, after `after_offset`.
    pub async fn logs(&self, job_id: i64, rank: Option<u32>, after_offset: i64, limit: u32) -> Result<Vec<LogLine>> {
        let q = match rank {
            Some(r) => sqlx::query(
                "SELECT rank, \"offset\", at_ms, line FROM log_lines WHERE job_id = $1 AND rank = $2 AND \"offset\" > $3 \
                 ORDER BY \"offset\" LIMIT $4",
            )
            .bind(job_id)
            .bind(i64::from(r)),
            None => sqlx::query(
                "SELECT rank, \"offset\", at_ms, line FROM log_lines WHERE job_id = $1 AND \"offset\" > $2 ORDER BY rank, \"offset\" LIMIT $3",
            )
            .bind(job_id),
        };
        let rows = q.bind(after_offset).bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(LogLine {
                    rank: r.try_get::<i64, _>("rank")? as u32,
                    offset: r.try_get("offset")?,
                    at_ms: r.try_get("at_ms")?,
                    line: r.try_get("line")?,
                })
            })
            .collect()
    }

    /// Where copying a rank's log file resumes: the byte offset of the last line stored (0 if
    /// none). That line is read again and stored again as a no-op; its end cannot be computed from
    /// the stored text, which may differ in length from the bytes in the file (invalid UTF-8 and
    /// NUL become U+FFFD, a CRLF's `\r` is dropped, a long line is stored in pieces).
    pub async fn log_resume_at(&self, job_id: i64, rank: u32) -> Result<u64> {
        let row = sqlx::query("SELECT MAX(\"offset\") AS last FROM log_lines WHERE job_id = $1 AND rank = $2")
            .bind(job_id)
            .bind(i64::from(rank))
            .fetch_one(&self.pool)
            .await?;
        let last: Option<i64> = row.try_get("last")?;
        Ok(last.unwrap_or(0).max(0) as u64)
    }

    pub async fn record_worker(&self, w: &WorkerRecord) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE job_id = $1 AND rank = $2")
            .bind(w.job_id)
            .bind(i64::from(w.rank))
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO workers (job_id, rank, attempt, pid, proc_start, started_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(w.job_id)
            .bind(i64::from(w.rank))
            .bind(i64::from(w.attempt))
            .bind(i64::from(w.pid))
            .bind(w.proc_start as i64)
            .bind(w.started_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn workers(&self, job_id: i64) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query("SELECT rank, attempt, pid, proc_start, started_ms FROM workers WHERE job_id = $1 ORDER BY rank")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(WorkerRecord {
                    job_id,
                    rank: r.try_get::<i64, _>("rank")? as u32,
                    attempt: r.try_get::<i64, _>("attempt")? as u32,
                    pid: r.try_get::<i64, _>("pid")? as u32,
                    proc_start: r.try_get::<i64, _>("proc_start")? as u64,
                    started_ms: r.try_get("started_ms")?,
                })
            })
            .collect()
    }

    pub async fn clear_workers(&self, job_id: i64) -> Result<()> {
        sqlx::query("DELETE FROM workers WHERE job_id = $1").bind(job_id).execute(&self.pool).await?;
        Ok(())
    }

    /// Records a committed checkpoint; the job's newest checkpoint only ever moves forward.
    pub async fn record_checkpoint(&self, job_id: i64, step: i64, path: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO checkpoints (job_id, step, path, at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (job_id, step) DO NOTHING")
            .bind(job_id)
            .bind(step)
            .bind(path)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE jobs SET checkpoint_step = $1, checkpoint_path = $2 WHERE id = $3 AND (checkpoint_step IS NULL OR checkpoint_step < $1)",
        )
        .bind(step)
        .bind(path)
        .bind(job_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The newest committed checkpoint of a job: (step, path).
    pub async fn last_checkpoint(&self, job_id: i64) -> Result<Option<(i64, String)>> {
        let row =
            sqlx::query("SELECT checkpoint_step, checkpoint_path FROM jobs WHERE id = $1").bind(job_id).fetch_optional(&self.pool).await?;
        Ok(match row {
            Some(r) => match (r.try_get::<Option<i64>, _>("checkpoint_step")?, r.try_get::<Option<String>, _>("checkpoint_path")?) {
                (Some(s), Some(p)) => Some((s, p)),
                _ => None,
            },
            None => None,
        })
    }
}
