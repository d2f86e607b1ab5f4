//! The daemon as an adversary or a careless operator meets it: run directories that cannot mix
//! jobs, tokens and roles, forged worker reports, reads confined to allowed roots, limits,
//! timeouts, and jobs refused at submission because they could never run (docs/security.md).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{gantry, tiny_spec, worker_pids, Daemon, TestDb};
use gantry_api::proto::job_service_client::JobServiceClient;
use gantry_api::proto::{GetJobRequest, HeartbeatRequest, ListJobsRequest, ReportStepsRequest, WorkerId};
use serde_json::{json, Value};

/// A token file with users `alice` and `bob` and admin `root`; their secrets.
fn tokens(dir: &Path) -> (PathBuf, [String; 3]) {
    let file = dir.join("tokens.toml");
    let new = |user: &str, role: &str| {
        let out = Command::new(gantry()).args(["token", "new", "--user", user, "--role", role, "--append"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let secret = stdout.lines().next().unwrap().to_string();
        assert!(stdout.contains(&format!("user = \"{user}\"")) && stdout.contains("token_sha256 = "), "{stdout}");
        secret
    };
    let secrets = [new("alice", "user"), new("bob", "user"), new("root", "admin")];
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(secrets.iter().all(|s| !text.contains(s.as_str())), "the tokens file holds no secret");
    (file, secrets)
}

/// Copies the example model and a token file of random tokens into `dir` (a read root):
/// returns a spec that reads only from there.
fn inputs_in(dir: &Path, steps: u64) -> Value {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let ex = common::repo().join("examples");
    std::fs::copy(ex.join("tiny-gpt2/model/config.json"), model.join("config.json")).unwrap();
    // Token ids below the model's 512, written as a `.bin` (nothing to tokenize: ranks start fast).
    let tokens: Vec<u8> = (0..40_000u32).flat_map(|i| (((i * 7919 + i / 3) % 512) as u16).to_le_bytes()).collect();
    std::fs::write(dir.join("tokens.bin"), tokens).unwrap();
    let mut spec = tiny_spec(steps, 0);
    spec["model"]["path"] = json!(model);
    spec["data"] = json!({"train": dir.join("tokens.bin"), "seq_len": 32});
    spec
}

async fn grpc_with(
    d: &Daemon,
    token: Option<&str>,
) -> JobServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>> {
    let channel = tonic::transport::Endpoint::from_shared(d.grpc()).unwrap().connect().await.unwrap();
    let value: Option<tonic::metadata::MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse().unwrap());
    JobServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        if let Some(v) = &value {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    })
}

/// The probe's high-severity finding: the data directory reused with a new database (`gantry.db`
/// deleted to start afresh). Job ids start again at 1; the new job 1 must not resume the old job
/// 1's checkpoint nor inherit its metrics and logs.
#[tokio::test]
async fn a_new_database_on_a_used_data_directory_starts_its_jobs_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gantry.db");
    let url = format!("sqlite://{}", db.display());
    let mut d = Daemon::start_in(dir, &url, "cpu:1", 20, &[], &[]).await;
    let mut old = tiny_spec(15, 5);
    old["train"]["lr"] = json!(3e-3);
    let first = d.submit(&old).await;
    assert_eq!(first, 1);
    d.wait_state(first, "succeeded", 120).await;
    let old_dir = d.run_dir(first);
    assert!(gantry_engine::checkpoint::committed_checkpoints(&old_dir).len() == 2, "the old job left checkpoints at steps 5 and 10");

    // Reset: the database goes, the data directory stays.
    d.kill9();
    for f in ["gantry.db", "gantry.db-wal", "gantry.db-shm"] {
        let _ = std::fs::remove_file(d.data_dir.path().join(f));
    }
    d.restart().await;
    let mut new = tiny_spec(30, 10);
    new["train"]["lr"] = json!(1e-3);
    let id = d.submit(&new).await;
    assert_eq!(id, 1, "a new database numbers its jobs from 1 again");
    let job = d.wait_state(id, "succeeded", 120).await;
    assert_eq!(job["restarts"], 0);
    let steps = d.steps(id).await;
    assert_eq!(steps.iter().map(|s| s["step"].as_i64().unwrap()).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
    // Warmup of 2 steps: step 1 trains at lr / 2, the new job's own.
    assert_eq!(steps[0]["lr"].as_f64().unwrap(), 5e-4, "step 1 has the new job's learning rate: {}", steps[0]);
    assert_ne!(d.run_dir(id), old_dir, "the new database's runs have a directory of their own");
    assert!(old_dir.join("final/model.safetensors").is_file(), "the old run is left as it was");
    let (_, logs) = d.get(&format!("/v1/jobs/{id}/logs")).await;
    let lines: Vec<&str> = logs["lines"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert!(lines.iter().all(|l| !l.contains("resum")), "nothing was resumed: {lines:?}");
    assert!(lines.iter().all(|l| !l.contains("database is unavailable")), "no false warning at registration: {lines:?}");
    assert!(lines.first().unwrap().starts_with("job 1 rank 0/1 attempt 1"), "{lines:?}");
    assert_eq!(d.event_path(id).await, ["queued", "scheduled", "running", "succeeded"]);
}

/// Two daemons with two databases on one data directory would number their jobs alike and write
/// into the same run directories: the second refuses to start, naming the first.
#[tokio::test]
async fn a_second_daemon_on_the_same_data_directory_refuses_to_start_naming_the_first() {
    let (one, two) = (TestDb::new().await, TestDb::new().await);
    let d = Daemon::start(&one.url, "cpu:1").await;
    let out = Command::new(gantry())
        .args(["daemon", "--http", &format!("127.0.0.1:{}", common::free_port()), "--grpc", &format!("127.0.0.1:{}", common::free_port())])
        .args(["--database-url", &two.url, "--data-dir"])
        .arg(d.data_dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("another daemon uses the data directory") && stderr.contains(&format!("REST on {}", d.http)), "{stderr}");
    let (status, _) = d.get("/v1/jobs").await;
    assert_eq!(status, 200, "the first daemon is unharmed");
}

/// Tokens: 401 without a valid one, a user sees every job but cancels and deletes only its own
/// (403), an admin anything; over REST, gRPC and the CLI. Workers: a report without its job
/// attempt's secret, or with another's, is refused. Jobs read only from the data directory.
#[tokio::test]
async fn tokens_and_roles_decide_who_may_do_what_and_workers_need_their_secret() {
    let db = TestDb::new().await;
    let keys = tempfile::tempdir().unwrap();
    let (file, [alice, bob, root]) = tokens(keys.path());
    let mut d = Daemon::start_with_args(&db.url, "cpu:1", 20, &[], &["--tokens", file.to_str().unwrap()]).await;
    let inputs = d.data_dir.path().join("inputs");
    let spec = inputs_in(&inputs, 100_000);

    // Without a token: 401 in the API's shape, for reads too; the probes and /metrics stay open.
    for (method, path) in
        [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/1"), ("DELETE", "/v1/jobs/1"), ("GET", "/v1/devices")]
    {
        let r = d.client.request(method.parse().unwrap(), format!("{}{path}", d.http)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{method} {path}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{body}");
    }
    for path in ["/healthz", "/readyz", "/metrics", "/v1/openapi.json"] {
        assert_eq!(d.client.get(format!("{}{path}", d.http)).send().await.unwrap().status(), 200, "{path} stays open");
    }
    d.token = Some("gantry_not-a-token".into());
    assert_eq!(d.get("/v1/jobs").await.0, 401);

    // Alice's job, owned by alice. With tokens, jobs read from the data directory only.
    d.token = Some(alice.clone());
    let mut outside = spec.clone();
    outside["data"]["train"] = json!(common::repo().join("examples/data/corpus.txt"));
    outside["data"]["tokenizer"] = json!(common::repo().join("examples/data/tokenizer.json"));
    let (status, err) = d.post("/v1/jobs", &outside.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("data.train")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("outside the directories this daemon reads"), "{err}");
    // The daemon's own files are out of reach (the default root is DATA_DIR/inputs).
    let mut own = spec.clone();
    own["data"]["train"] = json!(d.data_dir.path().join("worker.key"));
    let (status, err) = d.post("/v1/jobs", &own.to_string()).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("data.train")), "{err}");
    let id = d.submit(&spec).await;
    let job = d.wait_job(id, 60, "trained a step", |j| j["step"].as_i64().unwrap_or(0) >= 1).await;
    assert_eq!(job["owner"], "alice");

    // Bob sees it, but may not cancel or delete it.
    d.token = Some(bob.clone());
    assert_eq!(d.get(&format!("/v1/jobs/{id}")).await.0, 200);
    let (status, err) = d.post(&format!("/v1/jobs/{id}/cancel"), "").await;
    assert_eq!((status, err["code"].as_str()), (403, Some("forbidden")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("bob may not cancel job"), "{err}");
    assert_eq!(d.delete(&format!("/v1/jobs/{id}")).await.0, 403);
    let out = Command::new(gantry()).args(["jobs", "--server", &d.http]).env("GANTRY_TOKEN", &bob).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.starts_with("ID  NAME  OWNER"), "{table}");
    assert!(table.lines().any(|l| l.starts_with(&id.to_string()) && l.contains("alice") && l.contains("cpu:0")), "{table}");
    let out = Command::new(gantry()).args(["jobs", "--server", &d.http]).env_remove("GANTRY_TOKEN").output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("needs a token"), "{out:?}");

    // gRPC: the same rules.
    let refused = grpc_with(&d, None).await.get_job(GetJobRequest { id }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = grpc_with(&d, Some(&bob)).await.cancel_job(GetJobRequest { id }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let page = grpc_with(&d, Some(&bob)).await.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!((page.jobs.len(), page.jobs[0].owner.as_str()), (1, "alice"));
    assert!(page.jobs[0].memory_estimate_json.contains("per_rank"), "{:?}", page.jobs[0]);

    // Worker calls: only with the secret of the job's current attempt, over the data directory's
    // socket (the TCP gRPC port serves no worker service at all).
    let me = Some(WorkerId { job_id: id, rank: 0, attempt: 1 });
    let beat = || HeartbeatRequest { worker: me, step: 1 };
    for (secret, why) in [("", "no secret"), ("0123", "a made-up secret")] {
        let refused = d.worker_client(secret).await.heartbeat(beat()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{why}");
    }
    let other_job = d.worker_secret(id + 1, 1);
    let other_attempt = d.worker_secret(id, 2);
    for secret in [other_job, other_attempt] {
        let step = gantry_api::proto::StepMetrics { step: 5, loss: 123.0, ..Default::default() };
        let refused = d.worker_client(&secret).await.report_steps(ReportStepsRequest { worker: me, steps: vec![step] }).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }
    let mut own = d.worker_client(&d.worker_secret(id, 1)).await;
    assert!(!own.heartbeat(beat()).await.unwrap().into_inner().stop, "the job's own secret is taken");
    let far = gantry_api::proto::StepMetrics { step: 1 << 40, loss: 1.0, ..Default::default() };
    let refused = own.report_steps(ReportStepsRequest { worker: me, steps: vec![far] }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let channel = tonic::transport::Endpoint::from_shared(d.grpc()).unwrap().connect().await.unwrap();
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {alice}").parse().unwrap();
    let mut tcp =
        gantry_api::proto::worker_service_client::WorkerServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", token.clone());
            Ok(r)
        });
    assert_eq!(tcp.heartbeat(beat()).await.unwrap_err().code(), tonic::Code::Unimplemented, "not even with a user's token");
    assert!(d.steps(id).await.iter().all(|s| s["loss"].as_f64().unwrap() < 100.0), "no forged step was stored");

    // Alice may not delete a running job; root cancels it; then alice deletes it, with its run.
    d.token = Some(alice.clone());
    let (status, err) = d.delete(&format!("/v1/jobs/{id}")).await;
    assert_eq!((status, err["code"].as_str()), (409, Some("conflict")), "{err}");
    d.token = Some(root.clone());
    let (status, job) = d.post(&format!("/v1/jobs/{id}/cancel"), "").await;
    assert_eq!((status, job["reason"].as_str()), (200, Some("cancelled by request by root")), "{job}");
    d.token = Some(alice.clone());
    let run_dir = d.run_dir(id);
    assert!(run_dir.is_dir());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker_pids(&d, id).is_empty() {
        assert!(Instant::now() < deadline, "the cancelled job's worker did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two deletes at once: one deletes; the other finds it being deleted, or gone.
    let statuses = loop {
        let path = format!("/v1/jobs/{id}");
        let (a, b) = tokio::join!(d.delete(&path), d.delete(&path));
        let mut statuses = [a.0, b.0];
        statuses.sort();
        if statuses != [409, 409] {
            break statuses;
        }
        // (Both found the workers' records not yet cleared.)
        assert!(Instant::now() < deadline, "{a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(statuses == [204, 404] || statuses == [204, 409], "{statuses:?}");
    assert_eq!(d.get(&format!("/v1/jobs/{id}")).await.0, 404);
    assert!(!run_dir.exists(), "the run directory went with the job");
    assert!(worker_pids(&d, id).is_empty());
    let out = Command::new(gantry()).args(["delete", &id.to_string(), "--server", &d.http]).env("GANTRY_TOKEN", &alice).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(&format!("job {id} does not exist")), "{out:?}");

    // A user deletes its own finished job with the CLI.
    let mut short = spec.clone();
    short["train"]["steps"] = json!(3);
    let done = d.submit(&short).await;
    d.wait_state(done, "succeeded", 60).await;
    let out = Command::new(gantry()).args(["delete", &done.to_string(), "--server", &d.http]).env("GANTRY_TOKEN", &alice).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.get(&format!("/v1/jobs/{done}")).await.0, 404);
}

/// Without tokens the daemon is for the users of its machine: it refuses a non-loopback address
/// unless told `--insecure`.
#[test]
fn a_daemon_without_tokens_listens_on_loopback_only_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (common::free_port(), common::free_port());
    let daemon = |extra: &[&str]| {
        Command::new(gantry())
            .args(["daemon", "--http", &format!("0.0.0.0:{http}"), "--grpc", &format!("127.0.0.1:{grpc}"), "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let out = daemon(&[]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is not a loopback address and no --tokens file is given"), "{stderr}");
    let mut insecure = daemon(&["--insecure"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let up = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) {
            s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            break answer;
        }
        assert!(insecure.try_wait().unwrap().is_none() && Instant::now() < deadline, "the --insecure daemon did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    insecure.kill().unwrap();
    insecure.wait().unwrap();
    assert!(up.starts_with("HTTP/1.0 200") && up.ends_with("ok\n"), "{up}");
}

/// Files a job names are resolved (links followed) and must lie under the read roots; refusals
/// quote nothing of the files. What could never run is refused at submission, naming the field.
#[tokio::test]
async fn jobs_are_refused_at_submission_when_they_read_outside_the_roots_or_could_never_run() {
    let db = TestDb::new().await;
    let roots = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_args(&db.url, "cpu:2", 20, &[], &["--read-roots", roots.path().to_str().unwrap()]).await;
    let good = inputs_in(roots.path(), 3);
    let secret = elsewhere.path().join("secret.txt");
    std::fs::write(&secret, "hunter2 is the password\n").unwrap();
    std::fs::write(elsewhere.path().join("config.json"), r#"{"architectures": ["hunter2"], "n_embd": "hunter2"}"#).unwrap();
    let at = |p: &str| roots.path().join(p);
    let hidden = elsewhere.path().display().to_string();
    let refused = |field: &'static str, says: &'static str| {
        let hidden = &hidden;
        move |status: u16, err: &Value| {
            assert_eq!((status, err["field"].as_str()), (422, Some(field)), "{err}");
            let message = err["message"].as_str().unwrap();
            assert!(message.contains(says), "{field}: {message}");
            assert!(!message.contains("hunter2") && !message.contains(hidden.as_str()), "nothing leaks: {message}");
        }
    };

    // A link out of the roots, for the data and for the model's config.
    std::os::unix::fs::symlink(&secret, at("linked.txt")).unwrap();
    let mut spec = good.clone();
    spec["data"] = json!({"train": at("linked.txt"), "tokenizer": common::repo().join("examples/data/tokenizer.json")});
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("data.train", "outside the directories")(status, &err);
    std::fs::create_dir(at("linked-model")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path().join("config.json"), at("linked-model/config.json")).unwrap();
    let mut spec = good.clone();
    spec["model"]["path"] = json!(at("linked-model"));
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("model.path", "outside the directories")(status, &err);
    // The same file inside the roots: refused for what it is, without quoting it.
    std::fs::create_dir(at("odd-model")).unwrap();
    std::fs::copy(elsewhere.path().join("config.json"), at("odd-model/config.json")).unwrap();
    spec["model"]["path"] = json!(at("odd-model"));
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("model.path", "is not supported")(status, &err);
    // A weights index naming a file outside the model's directory.
    std::fs::create_dir(at("indexed")).unwrap();
    std::fs::copy(at("model/config.json"), at("indexed/config.json")).unwrap();
    std::fs::write(at("indexed/model.safetensors.index.json"), json!({"weight_map": {"x": "../../../secret.txt"}}).to_string()).unwrap();
    spec["model"]["path"] = json!(at("indexed"));
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("model.path", "not the name of a file in the model's directory")(status, &err);

    // What could never run.
    std::fs::write(at("data.csv"), "1,2,3\n").unwrap();
    let mut spec = good.clone();
    spec["data"]["train"] = json!(at("data.csv"));
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("data.train", "unknown data format")(status, &err);
    std::fs::write(at("notes.txt"), "text to train on\n").unwrap();
    spec["data"]["train"] = json!(at("notes.txt"));
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("data.tokenizer", "needs a tokenizer")(status, &err);
    let mut spec = good.clone();
    spec["model"]["init"] = json!("pretrained");
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("model.init", "has no weights")(status, &err);
    // A model no node of this size can hold: about 1 TiB a rank.
    std::fs::create_dir(at("huge")).unwrap();
    let huge = json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 8192});
    std::fs::write(at("huge/config.json"), huge.to_string()).unwrap();
    let mut spec = good.clone();
    spec["model"]["path"] = json!(at("huge"));
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("model.path", "each rank would need about 1.0 TiB (parameters 262.8 GiB, gradients 262.8 GiB, optimizer state 525.7 GiB")(
        status, &err,
    );
    assert!(err["message"].as_str().unwrap().contains("of memory: the job could only run out of memory"), "{err}");
    // Two ranks whose activations alone outgrow the node: the micro-batch is the field to change.
    let mut spec = good.clone();
    spec["data"]["seq_len"] = json!(256);
    spec["train"]["global_batch_size"] = json!(1 << 16);
    spec["resources"]["devices"] = json!("cpu:2");
    spec["parallel"] = json!({"dp": 2});
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("train.micro_batch_size", "× 2 ranks exceeds this node's")(status, &err);
    let (status, page) = d.get("/v1/jobs").await;
    assert_eq!((status, page["jobs"].as_array().unwrap().len()), (200, 0), "nothing was stored: {page}");

    // A job that can run shows its estimate.
    let id = d.submit(&good).await;
    let job = d.job(id).await;
    let m = &job["memory_estimate"];
    let part = |k: &str| m[k].as_u64().unwrap();
    assert_eq!(part("per_rank"), part("parameters") + part("gradients") + part("optimizer") + part("activations") + part("other"), "{m}");
    assert_eq!(part("parameters") * 2, part("optimizer"), "{m}");
    assert!(m["node_bytes"].as_u64().unwrap() > part("per_rank"), "{m}");
    d.wait_state(id, "succeeded", 60).await;

    // A link swapped once the job is accepted (and again once it runs) changes nothing it reads:
    // the worker reads the files it checked, and every checkpoint copies the tokenizer checked.
    let tokenizer = common::repo().join("examples/data/tokenizer.json");
    std::fs::copy(&tokenizer, at("tokenizer-real.json")).unwrap();
    std::os::unix::fs::symlink(at("tokenizer-real.json"), at("tokenizer.json")).unwrap();
    let mut spec = inputs_in(roots.path(), 400);
    spec["data"]["tokenizer"] = json!(at("tokenizer.json"));
    spec["checkpoint"] = json!({"every": 100, "keep": 2});
    let id = d.submit(&spec).await;
    d.wait_job(id, 60, "trained a step", |j| j["step"].as_i64().unwrap_or(0) >= 1).await;
    std::fs::remove_file(at("tokenizer.json")).unwrap();
    std::os::unix::fs::symlink(&secret, at("tokenizer.json")).unwrap();
    let job = d.wait_state(id, "succeeded", 120).await;
    let run = std::path::PathBuf::from(job["run_dir"].as_str().unwrap());
    let real = std::fs::read(&tokenizer).unwrap();
    assert_eq!(std::fs::read(run.join("final/tokenizer.json")).unwrap(), real, "the final model has the tokenizer checked");
    for ck in gantry_engine::checkpoint::committed_checkpoints(&run) {
        assert_eq!(std::fs::read(ck.join("tokenizer.json")).unwrap(), real, "{}", ck.display());
    }
    // A new job naming the swapped link is refused.
    let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
    refused("data.tokenizer", "outside the directories")(status, &err);

    // A `.bin` that is really text passes submission (only its reader can tell) and fails in the
    // worker, and the reason quotes no byte of it.
    std::fs::write(at("text.bin"), "hunter2 is the password\n").unwrap();
    let mut spec = good.clone();
    spec["data"]["train"] = json!(at("text.bin"));
    spec["restart"]["max_restarts"] = json!(0);
    let id = d.submit(&spec).await;
    let job = d.wait_state(id, "failed", 60).await;
    let reason = job["reason"].as_str().unwrap();
    assert!(reason.contains("the token at position 0 is outside the model's vocabulary of 512"), "{reason}");
    let first_token = u16::from_le_bytes(*b"hu").to_string();
    assert!(!reason.contains(&first_token), "the token's value is not quoted: {reason}");
}

/// A rank whose steps stop while its heartbeats go on is hung: the job is restarted, and the
/// reason says so. Here the worker blocks in `open()` of its data, which another process swapped
/// for a FIFO with no writer after the job was accepted (the probe's hung `open()`): its reporting
/// thread beats on, and only its step says it is stuck.
#[tokio::test]
async fn a_worker_whose_steps_stop_while_its_heartbeats_go_on_is_restarted() {
    let db = TestDb::new().await;
    let inputs = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_args(&db.url, "cpu:1", 20, &[], &["--stall-timeout", "3"]).await;
    let blocker = d.submit(&inputs_in(inputs.path(), 100_000)).await;
    d.wait_state(blocker, "running", 60).await;
    let mut spec = inputs_in(inputs.path(), 100);
    let fifo_dir = tempfile::tempdir().unwrap();
    let data = fifo_dir.path().join("stuck.bin");
    std::fs::copy(inputs.path().join("tokens.bin"), &data).unwrap();
    spec["data"]["train"] = json!(data);
    spec["restart"]["max_restarts"] = json!(1);
    let id = d.submit(&spec).await;
    // Accepted (a regular file then); now a FIFO nobody writes to takes its place.
    std::fs::remove_file(&data).unwrap();
    assert!(Command::new("mkfifo").arg(&data).status().unwrap().success());
    d.post(&format!("/v1/jobs/{blocker}/cancel"), "").await;
    let job = d.wait_state(id, "failed", 60).await;
    assert_eq!(job["restarts"], 1, "{job}");
    let (_, ev) = d.get(&format!("/v1/jobs/{id}/events")).await;
    let why = ev["events"].as_array().unwrap().iter().find(|e| e["to"] == "restarting").unwrap()["reason"].as_str().unwrap().to_string();
    assert!(why.starts_with("rank 0 is hung: it finished no step for 3s (before its first step) though its heartbeats go on"), "{why}");
    assert!(job["reason"].as_str().unwrap().contains("is hung") && job["reason"].as_str().unwrap().contains("after 1 restarts"), "{job}");
    assert!(worker_pids(&d, id).is_empty(), "the hung workers were killed");
    assert_eq!(d.devices_free().await, 1, "and its device is free");
}

/// Limits and timeouts: bounded names, 413 in the API's shape however large the body, text after
/// the JSON refused, pages bounded, silent connections closed.
#[tokio::test]
async fn oversized_and_silent_requests_get_clear_answers_and_no_connection_stays_forever() {
    let db = TestDb::new().await;
    let d = Daemon::start_with_args(&db.url, "cpu:1", 20, &[], &["--read-timeout", "2"]).await;
    for n in [257, 65_536] {
        let mut spec = tiny_spec(2, 0);
        spec["name"] = json!("n".repeat(n));
        let (status, err) = d.post("/v1/jobs", &spec.to_string()).await;
        assert_eq!((status, err["field"].as_str()), (422, Some("name")), "{err}");
    }
    // 100 MiB, declared: answered 413 at once; the client reads the answer, not a reset.
    let big = vec![b' '; 100 << 20];
    let (status, err) = Daemon::send(d.request(reqwest::Method::POST, "/v1/jobs").body(big)).await;
    assert_eq!((status, err["code"].as_str()), (413, Some("bad_request")), "{err}");
    // 3 MiB sent in chunks, with no length declared.
    let chunks = futures::stream::iter((0..48).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 << 10])));
    let (status, err) = Daemon::send(d.request(reqwest::Method::POST, "/v1/jobs").body(reqwest::Body::wrap_stream(chunks))).await;
    assert_eq!((status, err["code"].as_str()), (413, Some("bad_request")), "{err}");
    let (status, err) = d.post("/v1/jobs", &format!("{} trailing", tiny_spec(2, 0))).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("bad_request")), "{err}");
    for q in ["limit=0", "limit=1001"] {
        let (status, err) = d.get(&format!("/v1/jobs?{q}")).await;
        assert_eq!((status, err["code"].as_str()), (400, Some("bad_request")), "{q}: {err}");
    }

    // A connection that sends nothing, one that stops inside its headers, one that stops inside
    // its body: each is closed (or answered) within the read timeout.
    let rest = d.http.trim_start_matches("http://").to_string();
    let grpc = d.grpc().trim_start_matches("http://").to_string();
    let closed_within = |addr: &str, send: &[u8], secs: u64| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(send).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(secs + 10))).unwrap();
        let start = Instant::now();
        let mut answer = Vec::new();
        let r = s.read_to_end(&mut answer);
        assert!(r.is_ok(), "{addr}: the connection was not closed: {r:?}");
        (start.elapsed(), String::from_utf8_lossy(&answer).into_owned())
    };
    let (took, _) = closed_within(&rest, b"", 2);
    assert!(took < Duration::from_secs(8), "a silent REST connection was closed after {took:?}");
    let (took, _) = closed_within(&grpc, b"", 2);
    assert!(took < Duration::from_secs(8), "a silent gRPC connection was closed after {took:?}");
    let (took, _) = closed_within(&rest, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n", 2);
    assert!(took < Duration::from_secs(8), "a request whose headers never end was closed after {took:?}");
    let (took, answer) = closed_within(&rest, b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"name\":", 2);
    assert!(took < Duration::from_secs(8), "a body that never ends was answered after {took:?}");
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("did not arrive within 2s"), "{answer}");
    // (A new connection: the client's pooled one sat idle past the read timeout, and was closed.)
    let status = reqwest::Client::new().get(format!("{}/v1/jobs", d.http)).send().await.unwrap().status();
    assert_eq!(status, 200, "the daemon serves on");
}

/// The adversarial probe's inputs, kept as a table: malformed requests of every kind get a 4xx in
/// the API's shape, never a 500, and nothing is stored.
#[tokio::test]
async fn the_probes_bad_inputs_get_clear_refusals_and_never_a_500() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let spec = |f: &dyn Fn(&mut Value)| {
        let mut s = tiny_spec(2, 0);
        f(&mut s);
        s.to_string()
    };
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    #[rustfmt::skip]
    let cases: Vec<(&str, String, Option<String>, u16)> = vec![
        ("GET", "/v1/jobs/abc".into(), None, 400),
        ("GET", "/v1/jobs/-1".into(), None, 404),
        ("GET", "/v1/jobs/0".into(), None, 404),
        ("GET", "/v1/jobs/99999999999999999999999".into(), None, 400),
        ("GET", "/v1/jobs/1.5".into(), None, 400),
        ("GET", "/v1/jobs/%00".into(), None, 400),
        ("GET", "/v1/jobs/1/..%2f..%2fetc".into(), None, 404),
        ("GET", "/v1/jobs?limit=-1".into(), None, 400),
        ("GET", "/v1/jobs?limit=abc".into(), None, 400),
        ("GET", "/v1/jobs?limit=0".into(), None, 400),
        ("GET", "/v1/jobs?limit=4294967296".into(), None, 400),
        ("GET", "/v1/jobs?state=nope".into(), None, 400),
        ("GET", "/v1/jobs?after=abc".into(), None, 400),
        ("GET", "/v1/jobs?colour=red".into(), None, 400),
        ("GET", "/v1/jobs?limit=1&limit=2".into(), None, 400),
        ("GET", "/v1/jobs/1/metrics?rank=-1".into(), None, 400),
        ("GET", "/v1/jobs/1/logs?follow=maybe".into(), None, 400),
        ("GET", "/v1/jobs/1/logs?after=x".into(), None, 400),
        ("GET", "/v1/jobs/1/events?x=1".into(), None, 404),
        ("GET", "/v1/jobs/1/cancel".into(), None, 405),
        ("PUT", "/v1/jobs".into(), Some("{}".into()), 405),
        ("PATCH", "/v1/jobs/1".into(), Some("{}".into()), 405),
        ("DELETE", "/v1/jobs".into(), None, 405),
        ("DELETE", "/v1/jobs/1".into(), None, 404),
        ("DELETE", "/v1/jobs/abc".into(), None, 400),
        ("POST", "/v1/jobs/1/cancel".into(), None, 404),
        ("POST", "/v1/nothing".into(), None, 404),
        ("GET", "/../../etc/passwd".into(), None, 404),
        ("POST", "/v1/jobs".into(), Some(String::new()), 400),
        ("POST", "/v1/jobs".into(), Some("null".into()), 400),
        ("POST", "/v1/jobs".into(), Some("[]".into()), 400),
        ("POST", "/v1/jobs".into(), Some("\"spec\"".into()), 400),
        ("POST", "/v1/jobs".into(), Some("{}".into()), 422),
        ("POST", "/v1/jobs".into(), Some(deep.clone()), 400),
        ("POST", "/v1/jobs".into(), Some("\u{feff}{}".into()), 400),
        ("POST", "/v1/jobs".into(), Some("{\"model\":1e999}".into()), 400),
        ("POST", "/v1/jobs".into(), Some(format!("{} {{}}", spec(&|_| {}))), 400),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["name"] = json!("a\u{0}b"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["name"] = json!("\u{1b}[2J"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["name"] = json!("x".repeat(300)))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["name"] = json!(12))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["model"]["path"] = json!("../../../../etc"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["model"]["path"] = json!("/etc/passwd"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["model"]["path"] = json!("x".repeat(5000)))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["data"]["train"] = json!("/dev/zero"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["data"]["train"] = json!("/proc/self/environ"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["data"]["tokenizer"] = json!("/etc/passwd"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["data"]["seq_len"] = json!(-1))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["data"]["seq_len"] = json!(1u64 << 62))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["steps"] = json!(0))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["steps"] = json!(u64::MAX))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["steps"] = json!(1.5))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["steps"] = json!("10"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["lr"] = json!(-1.0))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["lr"] = json!(1e300))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["micro_batch_size"] = json!(3))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["global_batch_size"] = json!(usize::MAX))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["precision"] = json!("fp8"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["train"]["precision"] = json!("bf16"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["parallel"] = json!({"dp": 0}))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["parallel"] = json!({"tp": 2}))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["parallel"] = json!({"zero": 9}))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["resources"]["devices"] = json!("gpu:1"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["resources"]["devices"] = json!("cpu:99999999999999999999"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["resources"]["devices"] = json!("cuda:0,0"))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["resources"]["threads"] = json!(0))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["checkpoint"]["keep"] = json!(0))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["restart"]["max_restarts"] = json!(-3))), 422),
        ("POST", "/v1/jobs".into(), Some(spec(&|s| s["extra"] = json!(true))), 422),
    ];
    let mut failures = Vec::new();
    for (method, path, body, want) in &cases {
        let mut req = d.client.request(method.parse().unwrap(), format!("{}{path}", d.http));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.clone());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let shaped = serde_json::from_str::<Value>(&text).is_ok_and(|v| v["code"].is_string() && v["message"].is_string());
        if status != *want || !shaped {
            let shown: String = body.as_deref().unwrap_or("").chars().take(300).collect();
            failures.push(format!("{method} {path} {shown:?}: {status} (want {want}) {}", text.chars().take(200).collect::<String>()));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
    let (_, page) = d.get("/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0, "nothing was stored: {page}");
    let metrics = d.client.get(format!("{}/metrics", d.http)).send().await.unwrap().text().await.unwrap();
    assert!(!metrics.lines().any(|l| l.starts_with("gantry_http_requests_total") && l.contains("status=\"5")), "no 5xx: {metrics}");
}

/// TLS on REST and gRPC (`--tls-cert`, `--tls-key`): the CLI and gRPC clients that trust the
/// certificate get answers; plain HTTP and clients that do not trust it get none. Workers are
/// untouched (they report over the data directory's socket).
#[tokio::test]
async fn tls_serves_rest_and_grpc_to_clients_that_trust_the_certificate() {
    let db = TestDb::new().await;
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert_pem, key_pem) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_pem, key.cert.pem()).unwrap();
    std::fs::write(&key_pem, key.key_pair.serialize_pem()).unwrap();
    let d = Daemon::start_with_args(
        &db.url,
        "cpu:1",
        20,
        &[],
        &["--tls-cert", cert_pem.to_str().unwrap(), "--tls-key", key_pem.to_str().unwrap()],
    )
    .await;
    assert!(d.http.starts_with("https://"));
    assert!(d.log().contains(&format!("REST on {}", d.http)) && d.log().contains("(TLS)"), "{}", d.log());
    let id = d.submit(&tiny_spec(3, 0)).await;
    d.wait_state(id, "succeeded", 60).await;

    let cli = |extra: &[&str]| Command::new(gantry()).args(["jobs", "--server", &d.http]).args(extra).output().unwrap();
    let out = cli(&["--ca-cert", cert_pem.to_str().unwrap()]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("succeeded"), "{out:?}");
    let out = cli(&[]);
    assert!(!out.status.success(), "a client that does not trust the certificate gets no answer: {out:?}");
    let plain = d.http.replace("https://", "http://");
    let r = reqwest::Client::new().get(format!("{plain}/v1/jobs")).send().await;
    assert!(r.is_err() || !r.unwrap().status().is_success(), "plain HTTP is not served");

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(key.cert.pem()))
        .domain_name("localhost");
    let grpc = d.grpc().replace("http://", "https://");
    let channel = tonic::transport::Endpoint::from_shared(grpc.clone()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let job = JobServiceClient::new(channel).get_job(GetJobRequest { id }).await.unwrap().into_inner();
    assert_eq!(job.state, "succeeded");
    let untrusted = tonic::transport::Endpoint::from_shared(grpc)
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    let refused = match untrusted {
        Err(_) => true,
        Ok(c) => JobServiceClient::new(c).get_job(GetJobRequest { id }).await.is_err(),
    };
    assert!(refused, "a gRPC client that does not trust the certificate gets no answer");
}
