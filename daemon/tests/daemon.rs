//! End to end: the real `gantry daemon` against a real PostgreSQL, with real worker processes.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{gantry, losses_on_disk, tiny_spec, worker_pids, Daemon, TestDb};
use gantry_api::proto::job_service_client::JobServiceClient;
use gantry_api::proto::{GetJobRequest, SubmitJobRequest};
use serde_json::json;

#[tokio::test]
async fn invalid_specs_are_refused_naming_the_field_and_nothing_is_stored() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;

    let mut unknown = tiny_spec(5, 0);
    unknown["train"]["learning_rate"] = json!(0.1);
    let (status, err) = d.post("/v1/jobs", &unknown.to_string()).await;
    assert_eq!((status, err["field"].as_str(), err["code"].as_str()), (422, Some("train.learning_rate"), Some("invalid_spec")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("unknown field"), "{err}");

    let mut invalid = tiny_spec(5, 0);
    invalid["train"]["lr"] = json!(-1.0);
    let (status, err) = d.post("/v1/jobs", &invalid.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("train.lr")), "{err}");

    let mut wrong_type = tiny_spec(5, 0);
    wrong_type["data"]["seq_len"] = json!("long");
    let (status, err) = d.post("/v1/jobs", &wrong_type.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("data.seq_len")), "{err}");

    let mut missing_model = tiny_spec(5, 0);
    missing_model["model"]["path"] = json!("/nonexistent/model");
    let (status, err) = d.post("/v1/jobs", &missing_model.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("model.path")), "{err}");

    // Longer than the model's 256 positions: every attempt would fail, so it is refused now.
    let mut too_long = tiny_spec(5, 0);
    too_long["data"]["seq_len"] = json!(257);
    let (status, err) = d.post("/v1/jobs", &too_long.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("data.seq_len")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("exceeds the model's 256 positions"), "{err}");

    let mut too_big = tiny_spec(5, 0);
    too_big["resources"]["devices"] = json!("cpu:4");
    too_big["parallel"] = json!({"dp": 4});
    let (status, err) = d.post("/v1/jobs", &too_big.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("resources.devices")), "{err}");

    let (status, err) = d.post("/v1/jobs", "{not json").await;
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_request")), "{err}");

    // The same refusal over gRPC.
    let mut grpc = JobServiceClient::connect(d.grpc()).await.unwrap();
    let refused = grpc.submit_job(SubmitJobRequest { spec_json: unknown.to_string() }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("train.learning_rate"), "{}", refused.message());

    let (status, page) = d.get("/v1/jobs").await;
    assert_eq!(status, 200);
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0, "nothing was stored: {page}");
    let runs = d.run_dir(1).parent().unwrap().to_path_buf();
    assert!(std::fs::read_dir(&runs).map(|r| r.count()).unwrap_or(0) == 0, "no run directory was made in {}", runs.display());
    let (status, err) = d.get("/v1/jobs/12345").await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));
    let (status, _) = d.get("/v1/jobs?state=done").await;
    assert_eq!(status, 400);
    // Routes that do not exist, and methods a route does not take, answer in the API's shape too.
    let (status, err) = d.get("/v1/nothing-here").await;
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")), "{err}");
    let (status, err) = d.get("/v1/jobs/1/cancel").await;
    assert_eq!((status, err["code"].as_str()), (405, Some("bad_request")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("GET is not allowed"), "{err}");
    // A body over the limit, in the same shape.
    let (status, err) = d.post("/v1/jobs", &format!("{{\"pad\": \"{}\"}}", "x".repeat(3 << 20))).await;
    assert_eq!((status, err["code"].as_str()), (413, Some("bad_request")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("larger than the 2 MiB"), "{err}");
}

#[tokio::test]
async fn a_job_runs_to_succeeded_with_its_metrics_in_the_store_and_on_the_metrics_endpoint() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let first = d.submit(&tiny_spec(12, 5)).await;
    // The node has one device: the second job waits, and says for what.
    let second = d.submit(&tiny_spec(4, 0)).await;
    let waiting =
        d.wait_job(second, 30, "said why it waits", |j| j["reason"].as_str().unwrap().contains(&format!("held by job {first}"))).await;
    assert_eq!(waiting["state"], "queued", "{waiting}");

    let job = d.wait_state(first, "succeeded", 120).await;
    assert_eq!(job["step"], 12);
    assert_eq!(job["checkpoint_step"], 10, "checkpoints at steps 5 and 10 were recorded");
    assert_eq!(d.event_path(first).await, ["queued", "scheduled", "running", "succeeded"]);
    let steps = d.steps(first).await;
    assert_eq!(steps.iter().map(|s| s["step"].as_i64().unwrap()).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
    let on_disk = losses_on_disk(&d.run_dir(first));
    for s in &steps {
        assert_eq!(s["loss"].as_f64().unwrap(), on_disk[&s["step"].as_i64().unwrap()], "stored loss equals the worker's own record");
        assert!(s["tokens_per_s"].as_f64().unwrap() > 0.0 && s["mem_bytes"].as_i64().unwrap() > 0 && s["lr"].as_f64().unwrap() > 0.0);
        // The whole step record reaches the store: a global batch of 4 sequences of 64 tokens,
        // no update skipped, one rank (no gradient collectives), no MFU on a CPU.
        assert_eq!((s["tokens"].as_i64(), s["skipped"].as_bool(), s["rank"].as_i64()), (Some(256), Some(false), Some(0)), "{s}");
        assert_eq!((s["grad_comm_ms"].as_f64(), s["grad_comm_waited_ms"].as_f64()), (Some(0.0), Some(0.0)), "{s}");
        assert!(s["mfu"].is_null(), "{s}");
    }
    assert!(steps[11]["loss"].as_f64().unwrap() < steps[0]["loss"].as_f64().unwrap());
    assert!(d.run_dir(first).join("final/model.safetensors").is_file());

    let (_, logs) = d.get(&format!("/v1/jobs/{first}/logs")).await;
    let lines: Vec<&str> = logs["lines"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert!(lines.iter().any(|l| l.starts_with("step 10/12 loss")), "{lines:?}");
    assert!(lines.last().unwrap().starts_with("finished 12 steps"), "{lines:?}");

    let metrics = d.client.get(format!("{}/metrics", d.http)).send().await.unwrap().text().await.unwrap();
    let series = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{job=\"{first}\",rank=\"0\"}}")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    assert_eq!(series("gantry_job_step"), Some(12.0), "{metrics}");
    assert_eq!(series("gantry_job_loss"), Some(steps[11]["loss"].as_f64().unwrap()));
    assert!(series("gantry_job_tokens_per_second").unwrap() > 0.0);
    assert_eq!(series("gantry_job_skipped_steps_total"), Some(0.0), "{metrics}");
    assert_eq!(series("gantry_job_grad_comm_seconds"), Some(0.0), "{metrics}");
    assert_eq!(series("gantry_job_mfu"), None, "a CPU's peak is not known: {metrics}");
    let tokens = format!("gantry_job_tokens_total{{job=\"{first}\"}} {}", 12 * 256);
    assert!(metrics.lines().any(|l| l == tokens), "{tokens} in {metrics}");
    assert!(metrics.contains("gantry_http_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"} 2"), "{metrics}");
    assert!(metrics.contains("gantry_grpc_requests_total{code=\"ok\",method=\"ReportSteps\"}"), "{metrics}");

    d.wait_state(second, "succeeded", 120).await;
    let (_, page) = d.get("/v1/jobs?state=succeeded&limit=1").await;
    assert_eq!(page["jobs"][0]["id"], second);
    assert_eq!(page["next_after"], second);

    // The CLI reads the same.
    let out = Command::new(gantry()).args(["jobs", "--server", &d.http]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.lines().next().unwrap().starts_with("ID  NAME"), "{table}");
    assert!(table.lines().any(|l| l.starts_with(&first.to_string()) && l.contains("succeeded") && l.contains("12/12")), "{table}");
    // A job that holds no slot shows what it asks for, which must not read like a slot's name.
    assert!(table.lines().any(|l| l.starts_with(&first.to_string()) && l.contains("  1 cpu  ") && !l.contains("cpu:")), "{table}");
    let mut grpc = JobServiceClient::connect(d.grpc()).await.unwrap();
    let j = grpc.get_job(GetJobRequest { id: first }).await.unwrap().into_inner();
    assert_eq!((j.state.as_str(), j.step), ("succeeded", Some(12)));

    // Worker reports that cannot be about this job are refused, and change nothing stored, even
    // with the job's own secret (forged ones: tests/security.rs).
    use gantry_api::proto::{CheckpointRequest, ReportStepsRequest, WorkerId};
    let mut w = d.worker_client(&d.worker_secret(first, 1)).await;
    let who = |job_id, rank| Some(WorkerId { job_id, rank, attempt: 1 });
    let step = |step| gantry_api::proto::StepMetrics { step, loss: 1.0, ..Default::default() };
    let code = |r: Result<tonic::Response<gantry_api::proto::Ack>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(w.report_steps(ReportStepsRequest { worker: who(first, 3), steps: vec![step(5)] }).await),
        tonic::Code::InvalidArgument
    );
    let refused = w.report_steps(ReportStepsRequest { worker: who(first, 0), steps: vec![step(3)] }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("has ended"), "a finished job takes no more reports: {}", refused.message());
    let mut unknown = d.worker_client(&d.worker_secret(987_654, 1)).await;
    assert_eq!(
        code(unknown.report_steps(ReportStepsRequest { worker: who(987_654, 0), steps: vec![step(1)] }).await),
        tonic::Code::NotFound
    );
    let outside = CheckpointRequest { worker: who(first, 0), step: 11, path: d.data_dir.path().display().to_string() };
    assert_eq!(code(w.checkpoint_committed(outside).await), tonic::Code::InvalidArgument);
    let job = d.job(first).await;
    assert_eq!((job["step"].as_i64(), job["checkpoint_step"].as_i64()), (Some(12), Some(10)), "{job}");
}

#[tokio::test]
async fn cancel_stops_every_rank_and_records_cancelled() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let id = d.submit(&tiny_spec(100_000, 0)).await;
    d.wait_job(id, 60, "trained a step", |j| j["state"] == "running" && j["step"].as_i64().unwrap_or(0) >= 2).await;
    assert_eq!(worker_pids(&d, id).len(), 1);
    let out = Command::new(gantry()).args(["cancel", &id.to_string(), "--server", &d.http]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = d.job(id).await;
    assert_eq!(job["state"], "cancelled");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !worker_pids(&d, id).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the worker survived the cancel");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its device is free again: a new job runs.
    let next = d.submit(&tiny_spec(2, 0)).await;
    d.wait_state(next, "succeeded", 60).await;
    assert_eq!(d.event_path(id).await, ["queued", "scheduled", "running", "cancelled"]);
    let (status, err) = d.post(&format!("/v1/jobs/{id}/cancel"), "").await;
    assert_eq!((status, err["code"].as_str()), (409, Some("conflict")), "a final job cannot be cancelled again: {err}");
}

#[tokio::test]
async fn a_daemon_killed_while_a_job_runs_re_adopts_it_and_loses_nothing() {
    let db = TestDb::new().await;
    let mut d = Daemon::start(&db.url, "cpu:1").await;
    // About 20 ms a step: the daemon is away for a good part of the run.
    let steps = 400;
    let id = d.submit(&tiny_spec(steps, 100)).await;
    d.wait_job(id, 60, "reached step 5", |j| j["step"].as_i64().unwrap_or(0) >= 5).await;
    let pids = worker_pids(&d, id);
    d.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(worker_pids(&d, id), pids, "the worker kept training without its daemon");
    d.restart().await;
    let job = d.wait_state(id, "succeeded", 180).await;
    assert_eq!(job["restarts"], 0, "re-adopted, not restarted: {job}");
    let recorded: Vec<i64> = d.steps(id).await.iter().map(|s| s["step"].as_i64().unwrap()).collect();
    assert_eq!(recorded, (1..=steps as i64).collect::<Vec<_>>(), "every step recorded once");
    assert_eq!(d.event_path(id).await, ["queued", "scheduled", "running", "succeeded"]);
    let (_, logs) = d.get(&format!("/v1/jobs/{id}/logs")).await;
    let offsets: Vec<i64> = logs["lines"].as_array().unwrap().iter().map(|l| l["offset"].as_i64().unwrap()).collect();
    assert_eq!(offsets.iter().collect::<BTreeSet<_>>().len(), offsets.len(), "no log line stored twice");
    assert!(logs["lines"].as_array().unwrap().iter().any(|l| l["line"].as_str().unwrap().starts_with("finished 400 steps")), "{logs}");
}

/// A checkpoint the worker committed while the daemon was away (so its report never reached the
/// store) is where the restart resumes: the run does not start over.
#[tokio::test]
async fn a_checkpoint_committed_while_the_daemon_was_away_is_resumed_from() {
    let db = TestDb::new().await;
    let mut d = Daemon::start(&db.url, "cpu:2").await;
    let steps = 600;
    // Two ranks: rank 1's reports are in the store only (rank 0's are in metrics.jsonl too).
    let mut spec = tiny_spec(steps, 100);
    spec["resources"]["devices"] = json!("cpu:2");
    spec["parallel"] = json!({"dp": 2});
    let id = d.submit(&spec).await;
    d.wait_job(id, 60, "reached step 2", |j| j["step"].as_i64().unwrap_or(0) >= 2).await;
    let pids = worker_pids(&d, id);
    d.kill9();
    let run_dir = d.run_dir(id);
    let deadline = Instant::now() + Duration::from_secs(60);
    let newest = loop {
        if let Some(ck) = gantry_engine::checkpoint::committed_checkpoints(&run_dir).pop() {
            break ck;
        }
        assert!(Instant::now() < deadline, "the worker committed no checkpoint");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for pid in &pids {
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    }
    d.restart().await;
    let job = d.wait_state(id, "succeeded", 240).await;
    assert_eq!(job["restarts"], 1, "{job}");
    let log = std::fs::read_to_string(run_dir.join("logs/rank-0.log")).unwrap();
    let name = newest.file_name().unwrap().to_string_lossy().to_string();
    assert!(log.lines().any(|l| l.starts_with("resuming from") && l.contains(&name)), "the restart resumed from {name}:\n{log}");
    let at = gantry_engine::checkpoint::checkpoint_step(&newest).unwrap();
    let (_, ev) = d.get(&format!("/v1/jobs/{id}/events")).await;
    let why = ev["events"].as_array().unwrap().iter().find(|e| e["to"] == "restarting").unwrap()["reason"].as_str().unwrap().to_string();
    assert!(why.contains(&format!("from the checkpoint of step {at}")), "the reason names the checkpoint resumed from: {why}");
    // Rank 0: every step recorded once (what the daemon missed while away is read from
    // metrics.jsonl at the end). Rank 1: every step after the checkpoint, once; of those before
    // it, the ones whose reports reached the store before the daemon was killed (the rest died
    // with the worker's queue).
    let recorded =
        |m: &serde_json::Value| -> Vec<i64> { m["steps"].as_array().unwrap().iter().map(|s| s["step"].as_i64().unwrap()).collect() };
    let (_, m) = d.get(&format!("/v1/jobs/{id}/metrics?rank=0")).await;
    assert_eq!(recorded(&m), (1..=steps as i64).collect::<Vec<_>>(), "rank 0: every step recorded once");
    let (_, m) = d.get(&format!("/v1/jobs/{id}/metrics?rank=1")).await;
    let one = recorded(&m);
    let after: Vec<i64> = one.iter().copied().filter(|s| *s > at as i64).collect();
    assert_eq!(after, (at as i64 + 1..=steps as i64).collect::<Vec<_>>(), "rank 1: every step after the checkpoint, once");
    assert!(one.windows(2).all(|w| w[0] < w[1]) && one.first() == Some(&1), "rank 1: {one:?}");
}

#[tokio::test]
async fn a_failed_worker_is_restarted_from_its_last_checkpoint_with_the_same_losses() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let steps = 200;
    let reference = d.submit(&tiny_spec(steps, 0)).await;
    d.wait_state(reference, "succeeded", 120).await;
    let id = d.submit(&tiny_spec(steps, 25)).await;
    d.wait_job(id, 60, "committed a checkpoint", |j| j["checkpoint_step"].as_i64().unwrap_or(0) >= 50).await;
    for pid in worker_pids(&d, id) {
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    }
    let job = d.wait_state(id, "succeeded", 120).await;
    assert_eq!(job["restarts"], 1, "{job}");
    let path = d.event_path(id).await;
    assert_eq!(path, ["queued", "scheduled", "running", "restarting", "scheduled", "running", "succeeded"]);
    let (_, ev) = d.get(&format!("/v1/jobs/{id}/events")).await;
    let why = ev["events"][3]["reason"].as_str().unwrap();
    assert!(why.contains("rank 0") && why.contains("from the checkpoint of step") && why.ends_with("after 1s"), "{why}");
    let at = |i: usize| ev["events"][i]["at_ms"].as_i64().unwrap();
    assert!(at(4) - at(3) >= 1000, "the first restart waits 1 s: restarting at {} ms, scheduled at {} ms", at(3), at(4));
    let want = d.steps(reference).await;
    let got = d.steps(id).await;
    assert_eq!(got.len(), steps as usize);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["step"], w["step"]);
        assert_eq!(g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap(), "step {}: a restarted run follows the same losses", g["step"]);
    }
    let log = std::fs::read_to_string(d.run_dir(id).join("logs/rank-0.log")).unwrap();
    let resumed = log.lines().find(|l| l.starts_with("resumed from")).unwrap_or_else(|| panic!("{log}"));
    let at: u64 = resumed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(at >= 50 && at.is_multiple_of(25) && at < steps, "{resumed}");
}

#[tokio::test]
async fn the_cli_submits_a_toml_spec_follows_it_and_shows_its_logs_and_status() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    // A spec with paths relative to its own file, as users write them.
    let dir = tempfile::tempdir().unwrap();
    let ex = common::repo().join("examples");
    std::os::unix::fs::symlink(ex.join("tiny-gpt2/model"), dir.path().join("model")).unwrap();
    std::os::unix::fs::symlink(ex.join("data"), dir.path().join("data")).unwrap();
    let spec = dir.path().join("job.toml");
    std::fs::write(
        &spec,
        "name = \"cli\"\n[model]\npath = \"model\"\n[data]\ntrain = \"data/corpus.txt\"\ntokenizer = \"data/tokenizer.json\"\nseq_len = 32\n\
         [train]\nsteps = 100\nglobal_batch_size = 2\n[resources]\nthreads = 1\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(gantry()).args(args).args(["--server", &d.http]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, stdout, stderr) = cli(&["submit", spec.to_str().unwrap(), "--set", "train.steps=20", "--follow"]);
    assert!(ok, "{stderr}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!((last["state"].as_str(), last["step"].as_i64()), (Some("succeeded"), Some(20)), "{stdout}");
    assert!(stderr.contains("submitted job") && stderr.contains("succeeded — every rank finished"), "{stderr}");
    // Not a line a poll: the run's tenths, then the final state after the last step's line.
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains(" step ")).collect();
    assert!(progress.len() <= 11 && progress.last().is_some_and(|l| l.contains("step 20/20")), "{stderr}");
    let last_step = stderr.find("step 20/20").unwrap();
    assert!(stderr.rfind("succeeded — every rank finished").unwrap() > last_step, "the final state comes last: {stderr}");
    let id = last["id"].as_i64().unwrap().to_string();

    let (ok, logs, _) = cli(&["logs", &id]);
    assert!(ok && logs.contains("[rank 0] step 20/20 loss") && logs.contains("[rank 0] finished 20 steps"), "{logs}");
    let (ok, followed, _) = cli(&["logs", &id, "-f", "--rank", "0"]);
    assert!(ok, "following a finished job's logs returns once they are all printed");
    assert_eq!(followed.lines().count(), logs.lines().count(), "{followed}");
    assert!(followed.lines().any(|l| l.starts_with("step 20/20 loss")), "{followed}");
    let (ok, status, _) = cli(&["status", &id]);
    assert!(ok && status.contains("state       succeeded") && status.contains("step 20 of 20"), "{status}");
    assert!(status.contains("running → succeeded"), "{status}");

    // Bad input gets a clear error and a failing exit status.
    let (ok, _, err) = cli(&["submit", spec.to_str().unwrap(), "--set", "train.sheduler=cosine"]);
    assert!(!ok && err.contains("train.sheduler"), "{err}");
    let (ok, _, err) = cli(&["status", "999999"]);
    assert!(!ok && err.contains("job 999999 does not exist"), "{err}");
    let (ok, _, err) = Command::new(gantry())
        .args(["jobs", "--server", "http://127.0.0.1:1"])
        .output()
        .map(|o| (o.status.success(), (), String::from_utf8_lossy(&o.stderr).into_owned()))
        .unwrap();
    assert!(!ok && err.contains("cannot reach the daemon at http://127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn sigterm_shuts_the_daemon_down_cleanly_and_leaves_workers_training() {
    let db = TestDb::new().await;
    let mut d = Daemon::start(&db.url, "cpu:1").await;
    let id = d.submit(&tiny_spec(600, 0)).await;
    d.wait_job(id, 60, "reached step 3", |j| j["step"].as_i64().unwrap_or(0) >= 3).await;
    // Someone follows the job's logs: an open stream must not hold the shutdown up, and the
    // follower rides out the restart, printing every line once.
    let followed = tempfile::NamedTempFile::new().unwrap();
    let mut follower = Command::new(gantry())
        .args(["logs", "--follow", &id.to_string(), "--server", &d.http])
        .stdout(followed.reopen().unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = d.terminate(Duration::from_secs(15));
    assert_eq!(status, Some(0), "the daemon exits 0 on SIGTERM, log follower or not:\n{}", d.log());
    assert!(d.log().contains("shutting down"), "{}", d.log());
    assert_eq!(worker_pids(&d, id).len(), 1, "the job keeps training");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(follower.try_wait().unwrap().is_none(), "the follower waits for the daemon to come back");
    d.restart().await;
    let job = d.wait_state(id, "succeeded", 120).await;
    assert_eq!(job["restarts"], 0);
    assert_eq!(d.steps(id).await.len(), 600);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let done = loop {
        if let Some(s) = follower.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the follower did not end with the job");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut said = String::new();
    std::io::Read::read_to_string(follower.stderr.as_mut().unwrap(), &mut said).unwrap();
    assert!(done.success(), "{said}");
    assert!(said.contains("reconnecting"), "{said}");
    let (_, all) = d.get(&format!("/v1/jobs/{id}/logs")).await;
    let want: Vec<String> = all["lines"].as_array().unwrap().iter().map(|l| format!("[rank 0] {}", l["line"].as_str().unwrap())).collect();
    let got: Vec<String> = std::fs::read_to_string(followed.path()).unwrap().lines().map(str::to_string).collect();
    assert_eq!(got, want, "the follower printed every stored line once, in order");
}

#[tokio::test]
async fn a_silent_worker_is_declared_lost_after_the_heartbeat_timeout_and_the_job_restarted() {
    let db = TestDb::new().await;
    let d = Daemon::start_with(&db.url, "cpu:1", 3).await;
    let id = d.submit(&tiny_spec(300, 50)).await;
    d.wait_job(id, 60, "committed a checkpoint", |j| j["checkpoint_step"].as_i64().unwrap_or(0) >= 50).await;
    let pids = worker_pids(&d, id);
    assert_eq!(pids.len(), 1);
    // A hung process: alive, but silent.
    Command::new("kill").args(["-STOP", &pids[0].to_string()]).status().unwrap();
    let job = d.wait_job(id, 30, "restarted", |j| j["restarts"] == 1).await;
    let (_, ev) = d.get(&format!("/v1/jobs/{id}/events")).await;
    let why = ev["events"].as_array().unwrap().iter().find(|e| e["to"] == "restarting").unwrap()["reason"].as_str().unwrap().to_string();
    assert!(why.contains("rank 0 sent no heartbeat for 3s"), "{why} {job}");
    assert!(!worker_pids(&d, id).contains(&pids[0]), "the hung worker was killed");
    let job = d.wait_state(id, "succeeded", 120).await;
    assert_eq!(job["restarts"], 1);
    assert_eq!(d.steps(id).await.len(), 300);
}

/// A finished job's per-rank series stay on /metrics for the retention period (the last scrape
/// sees the final values), then go, so series do not pile up over many jobs; the job counts stay.
#[tokio::test]
async fn a_finished_jobs_series_leave_the_metrics_endpoint_after_the_retention_period() {
    let db = TestDb::new().await;
    let d = Daemon::start_with_env(&db.url, "cpu:1", 20, &[("GANTRY_METRICS_RETENTION", "4")]).await;
    let id = d.submit(&tiny_spec(6, 0)).await;
    d.wait_state(id, "succeeded", 120).await;
    let step_line = format!("gantry_job_step{{job=\"{id}\",rank=\"0\"}} 6");
    let metrics = || async { d.client.get(format!("{}/metrics", d.http)).send().await.unwrap().text().await.unwrap() };
    let m = metrics().await;
    assert!(m.contains(&step_line), "the final step is still shown right after the job ended: {m}");
    let ended = Instant::now();
    loop {
        let m = metrics().await;
        if !m.contains(&format!("job=\"{id}\"")) {
            assert!(m.contains("gantry_jobs{state=\"succeeded\"} 1"), "{m}");
            break;
        }
        assert!(ended.elapsed() < Duration::from_secs(30), "the series are still there 30 s after the job ended: {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ended.elapsed() >= Duration::from_secs(2), "the series stayed for (most of) the retention period");
}

#[tokio::test]
async fn a_two_rank_job_reports_both_ranks_and_survives_losing_one() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:2").await;
    let steps = 200;
    let one = d.submit(&tiny_spec(steps, 0)).await;
    let mut two = tiny_spec(steps, 50);
    two["resources"]["devices"] = json!("cpu:2");
    // ZeRO-3: every rank holds only its pieces of the parameters and moments, so the restart
    // resumes from a checkpoint written in shards.
    two["parallel"] = json!({"dp": 2, "zero": 3});
    let uninterrupted = d.submit(&two).await;
    d.wait_state(uninterrupted, "succeeded", 120).await;
    d.wait_state(one, "succeeded", 120).await;

    let id = d.submit(&two).await;
    let job = d.wait_job(id, 60, "committed a checkpoint", |j| j["checkpoint_step"].as_i64().unwrap_or(0) >= 50).await;
    assert_eq!(job["placement"], json!(["cpu:0", "cpu:1"]));
    let pids = worker_pids(&d, id);
    assert_eq!(pids.len(), 2, "one worker per device");
    Command::new("kill").args(["-9", &pids[1].to_string()]).status().unwrap();
    let job = d.wait_state(id, "succeeded", 180).await;
    assert_eq!(job["restarts"], 1, "{job}");
    let (_, ev) = d.get(&format!("/v1/jobs/{id}/events")).await;
    let why = ev["events"].as_array().unwrap().iter().find(|e| e["to"] == "restarting").unwrap()["reason"].as_str().unwrap().to_string();
    // Rank 0 fails a moment later naming rank 1, and is then killed by the daemon: the reason is
    // the rank that was lost, not either of those.
    assert!(why.starts_with("rank 1 exited with signal 9 (SIGKILL) before reporting an outcome; restart 1 of"), "{why}");

    let single = d.steps(one).await;
    let (_, m) = d.get(&format!("/v1/jobs/{uninterrupted}/metrics?rank=0")).await;
    let same_layout = m["steps"].as_array().unwrap().clone();
    for rank in 0..2 {
        let (_, m) = d.get(&format!("/v1/jobs/{id}/metrics?rank={rank}")).await;
        let got = m["steps"].as_array().unwrap();
        assert_eq!(got.len(), steps as usize, "rank {rank} reported every step");
        for (i, (g, w)) in got.iter().zip(&same_layout).enumerate() {
            assert_eq!(
                g["loss"].as_f64(),
                w["loss"].as_f64(),
                "rank {rank} step {}: the restarted run follows the uninterrupted one",
                i + 1
            );
        }
        // Against one rank the summation order differs: equal to 1e-4 over the first 20 steps
        // (float differences then grow as training amplifies them, as between any two layouts).
        for (g, w) in got.iter().zip(&single).take(20) {
            let rel = (g["loss"].as_f64().unwrap() - w["loss"].as_f64().unwrap()).abs() / w["loss"].as_f64().unwrap();
            assert!(rel <= 1e-4, "rank {rank} step {}: dp=2 with ZeRO-1 against one rank: {rel:e}", g["step"]);
        }
        // (Memory per ZeRO stage is measured in tests/parallel.rs; here: each rank reports its own.)
        assert!(got.iter().all(|s| s["mem_bytes"].as_i64().unwrap() > 0 && s["comm_ms"].as_f64().unwrap() > 0.0));
    }
}

/// A second daemon on the database of a running one refuses to start, naming the first, and
/// takes nothing over: the first's job trains on undisturbed.
#[tokio::test]
async fn a_second_daemon_on_the_same_database_refuses_to_start_naming_the_first() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let steps = 300;
    let id = d.submit(&tiny_spec(steps, 0)).await;
    d.wait_job(id, 60, "reached step 3", |j| j["step"].as_i64().unwrap_or(0) >= 3).await;
    let other = tempfile::tempdir().unwrap();
    let mut second = Command::new(gantry())
        .args(["daemon", "--http", &format!("127.0.0.1:{}", common::free_port()), "--grpc", &format!("127.0.0.1:{}", common::free_port())])
        .args(["--database-url", &db.url, "--devices", "cpu:1"])
        .arg("--data-dir")
        .arg(other.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second daemon is still running on the first one's database");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("another daemon supervises the jobs in this database") && stderr.contains(&format!("REST on {}", d.http)),
        "{stderr}"
    );
    let job = d.wait_state(id, "succeeded", 120).await;
    assert_eq!(job["restarts"], 0, "{job}");
    assert_eq!(d.event_path(id).await, ["queued", "scheduled", "running", "succeeded"]);
}

/// A daemon job's run directory has the layout `gantry train` writes (`spec.toml` included), so
/// `gantry train --resume` continues it: from its newest checkpoint, with the daemon's losses.
#[tokio::test]
async fn gantry_train_resumes_a_daemon_jobs_run_directory_with_its_losses() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let id = d.submit(&tiny_spec(6, 3)).await;
    d.wait_state(id, "succeeded", 90).await;
    let run_dir = d.run_dir(id);
    assert!(run_dir.join("spec.toml").is_file() && !run_dir.join("spec.json").exists());
    let daemon_losses = losses_on_disk(&run_dir);
    assert_eq!(daemon_losses.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);

    let out = Command::new(gantry()).args(["train", "--no-progress", "--resume"]).arg(&run_dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("step_00000003"), "resumed from the checkpoint of step 3: {stderr}");
    let resumed = losses_on_disk(&run_dir);
    assert_eq!(resumed, daemon_losses, "steps 4-6 again, with the same losses");
}
