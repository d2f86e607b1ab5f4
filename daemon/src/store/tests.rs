//! One suite, run against SQLite (a fresh file) and PostgreSQL (a fresh database on the server at
//! `GANTRY_TEST_DATABASE_URL`, which `scripts/test` points at the local server).

use std::path::Path;

use gantry_api::{JobSpec, JobState, LogLine, StepMetrics};

use super::jobs::Change;
use super::{LeaseHolder, Store, WorkerRecord};
use crate::error::Error;
use crate::testing::{postgres_store, sqlite_store};

fn spec(devices: usize) -> JobSpec {
    JobSpec::from_toml(
        &format!(
            "[model]\npath = \"m/tiny\"\n[data]\ntrain = \"d.bin\"\n[resources]\ndevices = \"cpu:{devices}\"\n[parallel]\ndp = {devices}"
        ),
        &[],
    )
    .unwrap()
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { let (store, _guard) = super::sqlite_store().await; super::$name(store).await; })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { let (store, _guard) = super::postgres_store().await; super::$name(store).await; })*
        }
    };
}

both_backends!(
    jobs_are_created_queued_with_an_event,
    only_legal_transitions_happen_and_each_is_an_event,
    listing_filters_by_state_and_pages_without_gaps,
    step_reports_and_log_lines_are_stored_once,
    workers_and_checkpoints_round_trip,
    a_job_that_cannot_be_read_is_failed_and_the_others_go_on,
    the_lease_is_taken_once_and_only_from_the_holder_as_read,
    owners_and_estimates_round_trip_and_deleting_takes_every_row,
    the_database_keeps_one_identity_and_knows_its_data_directories,
);

async fn jobs_are_created_queued_with_an_event(store: Store) {
    let row = store.create_job(&spec(2), Path::new("/data/runs")).await.unwrap();
    let job = row.job;
    assert_eq!(job.state, JobState::Queued);
    assert_eq!(job.name, "tiny");
    assert_eq!(job.devices, 2);
    assert_eq!(job.run_dir, format!("/data/runs/job-{}", job.id));
    assert_eq!(job.spec, spec(2));
    assert_eq!(row.attempt, 0);
    let again = store.job(job.id).await.unwrap();
    assert_eq!(again, job);
    let events = store.events(job.id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].from, events[0].to), (None, JobState::Queued));
    assert!(matches!(store.job(job.id + 1000).await, Err(Error::JobNotFound(_))));
}

async fn only_legal_transitions_happen_and_each_is_an_event(store: Store) {
    let id = store.create_job(&spec(1), Path::new("/r")).await.unwrap().job.id;
    let err = store.transition(id, JobState::Running, "too soon", Change::default()).await.unwrap_err();
    assert!(matches!(err, Error::IllegalTransition { from: JobState::Queued, to: JobState::Running, .. }), "{err}");
    let slots = vec!["cpu:1".to_string()];
    let j = store.transition(id, JobState::Scheduled, "placed", Change { placement: Some(&slots) }).await.unwrap();
    assert_eq!((j.job.placement.clone(), j.attempt), (slots.clone(), 1));
    let j = store.transition(id, JobState::Running, "all ranks registered", Change::default()).await.unwrap();
    assert_eq!(j.job.placement, slots, "a running job keeps its devices");
    let j = store.transition(id, JobState::Restarting, "rank 0 exited with status 1", Change::default()).await.unwrap();
    assert_eq!((j.job.restarts, j.job.placement.len()), (1, 0));
    store.transition(id, JobState::Scheduled, "placed", Change { placement: Some(&slots) }).await.unwrap();
    let j = store.transition(id, JobState::Running, "registered", Change::default()).await.unwrap();
    assert_eq!(j.attempt, 2);
    store.transition(id, JobState::Succeeded, "done", Change::default()).await.unwrap();
    for to in JobState::ALL {
        assert!(store.transition(id, to, "after the end", Change::default()).await.is_err(), "succeeded -> {to}");
    }
    let events = store.events(id).await.unwrap();
    let path: Vec<_> = events.iter().map(|e| e.to).collect();
    use JobState::*;
    assert_eq!(path, [Queued, Scheduled, Running, Restarting, Scheduled, Running, Succeeded]);
    assert_eq!(events[3].reason, "rank 0 exited with status 1");
    assert!(events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms && w[1].from == Some(w[0].to)));
    let job = store.job(id).await.unwrap();
    assert_eq!((job.state, job.reason.as_str(), job.placement.len()), (Succeeded, "done", 0));
}

async fn listing_filters_by_state_and_pages_without_gaps(store: Store) {
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(store.create_job(&spec(1), Path::new("/r")).await.unwrap().job.id);
    }
    for id in ids.iter().step_by(2) {
        store.transition(*id, JobState::Cancelled, "test", Change::default()).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_jobs(None, after, 3).await.unwrap();
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next_after {
            Some(a) => after = Some(a),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    let cancelled = store.list_jobs(Some(JobState::Cancelled), None, 100).await.unwrap();
    assert_eq!(cancelled.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), ids.iter().step_by(2).rev().copied().collect::<Vec<_>>());
    assert!(cancelled.next_after.is_none());
    let counts = store.count_by_state().await.unwrap();
    assert!(counts.contains(&(JobState::Cancelled, 4)) && counts.contains(&(JobState::Queued, 3)), "{counts:?}");
    let queue = store.jobs_in(&[JobState::Queued]).await.unwrap();
    assert_eq!(queue.iter().map(|j| j.job.id).collect::<Vec<_>>(), vec![ids[1], ids[3], ids[5]]);
}

fn step(rank: u32, step: i64) -> StepMetrics {
    StepMetrics {
        rank,
        step,
        loss: 5.0 - step as f64 * 0.1,
        lr: 1e-3,
        grad_norm: 0.5,
        tokens_per_s: 1000.0 + step as f64,
        mem_bytes: 1 << 20,
        step_ms: 12.5,
        comm_ms: 1.5,
        // Every field of the record is stored: odd steps were skipped, and report an MFU.
        skipped: step % 2 == 1,
        tokens: 4096,
        grad_comm_ms: 1.25,
        grad_comm_waited_ms: 0.25,
        mfu: (step % 2 == 1).then_some(0.4 + step as f64 * 1e-3),
        stage_idle: if step % 2 == 0 { vec![0.125, 0.25 + step as f64 * 1e-3] } else { Vec::new() },
    }
}

async fn step_reports_and_log_lines_are_stored_once(store: Store) {
    let id = store.create_job(&spec(1), Path::new("/r")).await.unwrap().job.id;
    let first: Vec<_> = (1..=5).map(|s| step(0, s)).collect();
    assert_eq!(store.insert_steps(id, &first).await.unwrap(), 5);
    // A worker that lost its connection re-sends from step 4.
    let resent: Vec<_> = (4..=8).map(|s| step(0, s)).collect();
    assert_eq!(store.insert_steps(id, &resent).await.unwrap(), 3);
    let series = store.metrics(id, None, 0, 1000).await.unwrap();
    assert_eq!(series.iter().map(|s| s.step).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
    assert_eq!((series[2].clone(), series[3].clone()), (step(0, 3), step(0, 4)));
    assert_eq!(store.metrics(id, Some(0), 6, 1000).await.unwrap().len(), 2);
    assert_eq!(store.metrics(id, Some(1), 0, 1000).await.unwrap().len(), 0);
    assert_eq!(store.job(id).await.unwrap().step, Some(8));
    // A late duplicate of an old step does not move the job's step back.
    store.insert_steps(id, &[step(0, 2)]).await.unwrap();
    assert_eq!(store.job(id).await.unwrap().step, Some(8));
    // A diverged step (NaN loss; an fp16 step skipped for overflow has an infinite norm) is stored
    // and read back as it was reported (SQLite keeps a NaN as NULL).
    let diverged = StepMetrics { loss: f64::NAN, grad_norm: f64::INFINITY, ..step(0, 9) };
    assert_eq!(store.insert_steps(id, &[diverged.clone(), step(0, 10)]).await.unwrap(), 2);
    let back = store.metrics(id, Some(0), 8, 10).await.unwrap();
    assert_eq!(back.iter().map(|s| s.step).collect::<Vec<_>>(), [9, 10]);
    assert!(back[0].loss.is_nan() && back[0].grad_norm == f64::INFINITY && back[0].lr == diverged.lr, "{:?}", back[0]);

    // Paging a two-rank series by `after_step`, 3 rows at a time: pages end on whole steps, and
    // a page of one step holds all of its ranks, so paging loses and repeats nothing.
    let two = store.create_job(&spec(2), Path::new("/r2")).await.unwrap().job.id;
    let reports: Vec<_> = (1..=3).flat_map(|s| [step(0, s), step(1, s)]).collect();
    store.insert_steps(two, &reports).await.unwrap();
    let (mut after, mut paged) = (0, Vec::new());
    loop {
        let page = store.metrics(two, None, after, 3).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.step;
        paged.extend(page);
    }
    assert_eq!(paged, reports, "every (step, rank) once, in order");
    assert_eq!(store.metrics(two, None, 0, 1).await.unwrap(), reports[..2], "a one-row page holds the step's two ranks");

    let line = |rank, offset: i64, text: &str| LogLine { rank, offset, at_ms: 1, line: text.into() };
    store.insert_logs(id, &[line(0, 0, "hello"), line(0, 6, "world"), line(1, 0, "rank one")]).await.unwrap();
    store.insert_logs(id, &[line(0, 6, "world"), line(0, 12, "again")]).await.unwrap();
    let all = store.logs(id, None, -1, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|l| (l.rank, l.line.as_str())).collect::<Vec<_>>(),
        [(0, "hello"), (0, "world"), (0, "again"), (1, "rank one")]
    );
    assert_eq!(store.logs(id, Some(0), 0, 100).await.unwrap().len(), 2);
    assert_eq!(store.log_resume_at(id, 0).await.unwrap(), 12, "the last line's start");
    assert_eq!(store.log_resume_at(id, 5).await.unwrap(), 0);
    // A NUL character (PostgreSQL's text refuses it) is stored as U+FFFD, and the lines after it
    // are stored too.
    store.insert_logs(id, &[line(0, 18, "bin\0ary"), line(0, 26, "after")]).await.unwrap();
    let tail: Vec<String> = store.logs(id, Some(0), 12, 100).await.unwrap().into_iter().map(|l| l.line).collect();
    assert_eq!(tail, ["bin\u{FFFD}ary", "after"]);
}

async fn workers_and_checkpoints_round_trip(store: Store) {
    let id = store.create_job(&spec(2), Path::new("/r")).await.unwrap().job.id;
    for rank in 0..2 {
        let w = WorkerRecord { job_id: id, rank, attempt: 1, pid: 4000 + rank, proc_start: 123_456_789_012, started_ms: 7 };
        store.record_worker(&w).await.unwrap();
    }
    let again = WorkerRecord { job_id: id, rank: 1, attempt: 2, pid: 5001, proc_start: 9, started_ms: 8 };
    store.record_worker(&again).await.unwrap();
    let ws = store.workers(id).await.unwrap();
    assert_eq!(ws.len(), 2);
    assert_eq!(ws[1], again);
    assert_eq!(ws[0].proc_start, 123_456_789_012);
    store.clear_workers(id).await.unwrap();
    assert!(store.workers(id).await.unwrap().is_empty());

    assert_eq!(store.last_checkpoint(id).await.unwrap(), None);
    store.record_checkpoint(id, 20, "/r/ckpt/20").await.unwrap();
    store.record_checkpoint(id, 40, "/r/ckpt/40").await.unwrap();
    store.record_checkpoint(id, 20, "/r/ckpt/20").await.unwrap();
    assert_eq!(store.last_checkpoint(id).await.unwrap(), Some((40, "/r/ckpt/40".into())));
    assert_eq!(store.job(id).await.unwrap().checkpoint_step, Some(40));

    // A restart goes back to the last checkpoint, and the job's step with it; as the next attempt
    // starts, the failed attempt's reports of later steps go, and the resumed attempt's take
    // their place.
    store.insert_steps(id, &[step(0, 39), step(0, 41), step(0, 47)]).await.unwrap();
    store.transition(id, JobState::Scheduled, "placed", Change { placement: Some(&["cpu:0".into(), "cpu:1".into()]) }).await.unwrap();
    store.transition(id, JobState::Running, "registered", Change::default()).await.unwrap();
    assert_eq!(store.job(id).await.unwrap().step, Some(47));
    store.transition(id, JobState::Restarting, "rank 1 failed", Change::default()).await.unwrap();
    assert_eq!(store.job(id).await.unwrap().step, Some(40));
    // The next attempt starts from step 40: it reports the later steps again.
    assert_eq!(store.drop_steps_after(id, 40).await.unwrap(), 2);
    assert_eq!(store.metrics(id, None, 0, 100).await.unwrap().iter().map(|m| m.step).collect::<Vec<_>>(), [39]);
    let replayed = StepMetrics { loss: 1.25, ..step(0, 41) };
    assert_eq!(store.insert_steps(id, std::slice::from_ref(&replayed)).await.unwrap(), 1);
    assert_eq!(store.metrics(id, None, 40, 100).await.unwrap(), [replayed]);
}

/// A stored spec this version cannot read (another version wrote it, or a hand edit) fails that
/// job, keeping its row; the supervisor's queries go on returning the other jobs.
async fn a_job_that_cannot_be_read_is_failed_and_the_others_go_on(store: Store) {
    let bad = store.create_job(&spec(1), Path::new("/r")).await.unwrap().job.id;
    let good = store.create_job(&spec(1), Path::new("/r")).await.unwrap().job.id;
    sqlx::query("UPDATE jobs SET spec = '{\"model\": {\"path\": \"m\"}, \"renamed_key\": 1}' WHERE id = $1")
        .bind(bad)
        .execute(&store.pool)
        .await
        .unwrap();
    let queued = store.jobs_in(&[JobState::Queued]).await.unwrap();
    assert_eq!(queued.iter().map(|j| j.job.id).collect::<Vec<_>>(), [good]);
    let row = sqlx::query("SELECT state, reason, spec FROM jobs WHERE id = $1").bind(bad).fetch_one(&store.pool).await.unwrap();
    use sqlx::Row;
    assert_eq!(row.get::<String, _>("state"), "failed");
    assert!(row.get::<String, _>("reason").contains("cannot read the stored job"), "{}", row.get::<String, _>("reason"));
    assert!(row.get::<String, _>("spec").contains("renamed_key"), "the row is kept as it was");
    let events = sqlx::query("SELECT from_state, to_state FROM job_events WHERE job_id = $1 ORDER BY id")
        .bind(bad)
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        events.last().map(|e| (e.get::<String, _>("from_state"), e.get::<String, _>("to_state"))),
        Some(("queued".into(), "failed".into()))
    );
    assert!(store.jobs_in(&[JobState::Queued]).await.unwrap().len() == 1, "failed once, and not again");
}

/// The lease: one holder at a time; a takeover succeeds only from the holder and expiry it read
/// (a holder that renewed meanwhile keeps it); only the holder renews or releases it.
async fn the_lease_is_taken_once_and_only_from_the_holder_as_read(store: Store) {
    let daemon = |pid| LeaseHolder { host: "h".into(), machine: "boot ns".into(), pid, proc_start: 7, address: format!("http://a:{pid}") };
    let (a, b) = (daemon(10), daemon(20));
    assert_eq!(store.lease().await.unwrap(), None);
    assert!(store.take_lease(&a, None, 1000).await.unwrap());
    assert!(!store.take_lease(&b, None, 2000).await.unwrap(), "already held");
    assert!(store.renew_lease(&a, 1500).await.unwrap());
    assert!(!store.take_lease(&b, Some((&a, 1000)), 2000).await.unwrap(), "a renewed since b read it");
    assert!(store.take_lease(&b, Some((&a, 1500)), 2000).await.unwrap());
    assert!(!store.renew_lease(&a, 3000).await.unwrap(), "a lost it");
    assert_eq!(store.lease().await.unwrap(), Some((b.clone(), 2000)));
    store.release_lease(&a).await.unwrap();
    assert!(store.lease().await.unwrap().is_some(), "only the holder gives it up");
    store.release_lease(&b).await.unwrap();
    assert_eq!(store.lease().await.unwrap(), None);
}

async fn owners_and_estimates_round_trip_and_deleting_takes_every_row(store: Store) {
    let estimate = gantry_api::MemoryEstimate {
        parameters: 4,
        gradients: 4,
        optimizer: 8,
        activations: 100,
        other: 0,
        per_rank: 116,
        ranks: 1,
        node_bytes: Some(1 << 30),
    };
    let row = store.create_job_as(&spec(1), Path::new("/data/runs"), Some("alice"), Some(&estimate)).await.unwrap();
    let id = row.job.id;
    assert_eq!(row.job.owner.as_deref(), Some("alice"));
    assert_eq!(row.job.memory_estimate.as_ref(), Some(&estimate));
    assert_eq!(store.create_job(&spec(1), Path::new("/data/runs")).await.unwrap().job.owner, None);
    // A job that has not ended is not deleted.
    assert!(!store.delete_job(id).await.unwrap());
    store.insert_steps(id, &[step(0, 1)]).await.unwrap();
    store.insert_logs(id, &[LogLine { rank: 0, offset: 0, at_ms: 0, line: "x".into() }]).await.unwrap();
    store.record_checkpoint(id, 1, "/data/runs/x/checkpoints/step_1").await.unwrap();
    store.transition(id, JobState::Cancelled, "by request", Change::default()).await.unwrap();
    assert!(store.delete_job(id).await.unwrap());
    assert!(matches!(store.job(id).await, Err(Error::JobNotFound(_))));
    assert!(store.metrics(id, None, 0, 100).await.unwrap().is_empty());
    assert!(store.logs(id, None, -1, 100).await.unwrap().is_empty());
    assert_eq!(store.last_checkpoint(id).await.unwrap(), None);
    assert!(!store.delete_job(id).await.unwrap(), "deleting again deletes nothing");
    // The next job's id is new: ids are never reused.
    let next = store.create_job(&spec(1), Path::new("/data/runs")).await.unwrap().job.id;
    assert!(next > id + 1);
}

async fn the_database_keeps_one_identity_and_knows_its_data_directories(store: Store) {
    let id = store.database_id().await.unwrap();
    assert_eq!(id.len(), 16);
    assert_eq!(store.database_id().await.unwrap(), id, "the identity is made once");
    assert!(store.record_data_dir("aaaa", "host-a", "/a").await.unwrap().is_empty());
    assert!(store.record_data_dir("aaaa", "host-a", "/a").await.unwrap().is_empty(), "the same directory again");
    let others = store.record_data_dir("bbbb", "host-b", "/b").await.unwrap();
    assert_eq!(others, [("aaaa".to_string(), "host-a".to_string(), "/a".to_string())]);
}
