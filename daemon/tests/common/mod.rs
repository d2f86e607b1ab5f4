//! Harness for the daemon's end-to-end tests: the real `gantry` binary, a real PostgreSQL (a fresh
//! database per test on the server at `GANTRY_TEST_DATABASE_URL`, or a private server of the
//! test's own), real worker processes and sockets.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sqlx::Connection;

pub fn gantry() -> &'static str {
    env!("CARGO_BIN_EXE_gantry")
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A spec for the tiny example model (absolute paths, one thread so runs are comparable).
pub fn tiny_spec(steps: u64, checkpoint_every: u64) -> Value {
    let ex = repo().join("examples");
    json!({
        "name": "e2e",
        "model": {"path": ex.join("tiny-gpt2/model"), "init": "random"},
        "data": {"train": ex.join("data/corpus.txt"), "tokenizer": ex.join("data/tokenizer.json"), "seq_len": 64},
        "train": {"steps": steps, "global_batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "seed": 7},
        "resources": {"devices": "cpu:1", "threads": 1},
        "checkpoint": {"every": checkpoint_every, "keep": 2},
        "restart": {"max_restarts": 2},
    })
}

/// A database of its own for one test on the shared server; dropped at the end.
pub struct TestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin_url = std::env::var("GANTRY_TEST_DATABASE_URL")
            .expect("GANTRY_TEST_DATABASE_URL must name a PostgreSQL server for the daemon tests (scripts/test sets it)");
        let name = format!("gantry_e2e_{}_{}", std::process::id(), free_port());
        let mut c = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| panic!("connecting to {admin_url}: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
        let base = admin_url.split('?').next().unwrap();
        let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
        TestDb { url, admin_url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let mut c = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await.ok()
            })
        })
        .join();
    }
}

/// A running `gantry daemon`.
pub struct Daemon {
    child: Option<Child>,
    pub data_dir: tempfile::TempDir,
    pub http: String,
    http_port: u16,
    grpc_port: u16,
    database_url: String,
    devices: String,
    heartbeat_timeout: u64,
    /// Extra environment for the daemon (its `GANTRY_*` settings).
    env: Vec<(String, String)>,
    /// Extra arguments for the daemon.
    args: Vec<String>,
    /// The token `get`, `post` and `submit` send, if any.
    pub token: Option<String>,
    pub client: reqwest::Client,
}

impl Daemon {
    pub async fn start(database_url: &str, devices: &str) -> Daemon {
        Daemon::start_with(database_url, devices, 20).await
    }

    pub async fn start_with(database_url: &str, devices: &str, heartbeat_timeout: u64) -> Daemon {
        Daemon::start_with_env(database_url, devices, heartbeat_timeout, &[]).await
    }

    pub async fn start_with_env(database_url: &str, devices: &str, heartbeat_timeout: u64, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_args(database_url, devices, heartbeat_timeout, env, &[]).await
    }

    /// A daemon with extra arguments (`--tokens FILE`, `--read-roots DIR`, …).
    pub async fn start_with_args(database_url: &str, devices: &str, heartbeat_timeout: u64, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Daemon::start_in(tempfile::tempdir().unwrap(), database_url, devices, heartbeat_timeout, env, args).await
    }

    /// A daemon on the data directory `data_dir` (which may hold an earlier daemon's files).
    pub async fn start_in(
        data_dir: tempfile::TempDir,
        database_url: &str,
        devices: &str,
        heartbeat_timeout: u64,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        let (http_port, grpc_port) = (free_port(), free_port());
        // With TLS, the client trusts the daemon's (self-signed) certificate.
        let cert = args.iter().position(|a| *a == "--tls-cert").map(|i| args[i + 1]);
        let scheme = if cert.is_some() { "https" } else { "http" };
        let mut client = reqwest::Client::builder();
        if let Some(cert) = cert {
            client = client.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(cert).unwrap()).unwrap());
        }
        let client = client.build().unwrap();
        let mut d = Daemon {
            child: None,
            data_dir,
            http: format!("{scheme}://127.0.0.1:{http_port}"),
            http_port,
            grpc_port,
            database_url: database_url.to_string(),
            devices: devices.to_string(),
            heartbeat_timeout,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            token: None,
            client,
        };
        // A port found free can be taken by another test's process before the daemon binds it:
        // the first start then picks other ports. (A restart keeps its ports: workers know them.)
        for _ in 0..5 {
            if d.try_spawn().await {
                return d;
            }
            (d.http_port, d.grpc_port) = (free_port(), free_port());
            d.http = format!("{scheme}://127.0.0.1:{}", d.http_port);
        }
        panic!("the daemon could not bind its ports:\n{}", d.log());
    }

    pub fn grpc(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    async fn spawn(&mut self) {
        assert!(self.try_spawn().await, "the daemon could not bind its ports:\n{}", self.log());
    }

    /// Starts the daemon and waits until it is ready; false if it exited because a port was taken.
    async fn try_spawn(&mut self) -> bool {
        let logged = self.log().len();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.path().join("daemon.log")).unwrap();
        let child = Command::new(gantry())
            .args(["daemon", "--http", &format!("127.0.0.1:{}", self.http_port), "--grpc", &format!("127.0.0.1:{}", self.grpc_port)])
            .args([
                "--database-url",
                &self.database_url,
                "--devices",
                &self.devices,
                "--heartbeat-timeout",
                &self.heartbeat_timeout.to_string(),
            ])
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(&self.args)
            .env("GANTRY_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Our daemon must still be running: another process may be answering on the port.
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                let log = self.log();
                assert!(log[logged..].contains("Address already in use"), "the daemon exited with {status}:\n{log}");
                return false;
            }
            if let Ok(r) = self.client.get(format!("{}/readyz", self.http)).send().await {
                if r.status().is_success() {
                    return true;
                }
            }
            assert!(Instant::now() < deadline, "the daemon did not become ready:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then the exit code (None if it did not exit within `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }

    /// A request with this daemon's test token, if it has one.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.http));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        Daemon::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        Daemon::send(self.request(reqwest::Method::POST, path).header("content-type", "application/json").body(body.to_string())).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        Daemon::send(self.request(reqwest::Method::DELETE, path)).await
    }

    pub async fn submit(&self, spec: &Value) -> i64 {
        let (status, job) = self.post("/v1/jobs", &spec.to_string()).await;
        assert_eq!(status, 201, "{job}");
        job["id"].as_i64().unwrap()
    }

    pub async fn job(&self, id: i64) -> Value {
        let (status, job) = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{job}");
        job
    }

    /// Polls until `pred` holds for the job, or panics after `secs` with the job and the log.
    pub async fn wait_job(&self, id: i64, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let job = self.job(id).await;
            if pred(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never {what}: {job}\n--- daemon log ---\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_state(&self, id: i64, state: &str, secs: u64) -> Value {
        self.wait_job(id, secs, &format!("became {state}"), |j| j["state"] == state).await
    }

    /// How many of the node's device slots no job holds.
    pub async fn devices_free(&self) -> usize {
        let (status, d) = self.get("/v1/devices").await;
        assert_eq!(status, 200, "{d}");
        d["devices"].as_array().unwrap().iter().filter(|s| s["job_id"].is_null()).count()
    }

    pub async fn steps(&self, id: i64) -> Vec<Value> {
        let (status, m) = self.get(&format!("/v1/jobs/{id}/metrics")).await;
        assert_eq!(status, 200, "{m}");
        m["steps"].as_array().unwrap().clone()
    }

    pub async fn event_path(&self, id: i64) -> Vec<String> {
        let (_, ev) = self.get(&format!("/v1/jobs/{id}/events")).await;
        ev["events"].as_array().unwrap().iter().map(|e| e["to"].as_str().unwrap().to_string()).collect()
    }

    /// A job's run directory: `DATA_DIR/runs/<database id>/job-ID`.
    pub fn run_dir(&self, id: i64) -> PathBuf {
        let identity: Value = serde_json::from_str(&std::fs::read_to_string(self.data_dir.path().join("identity.json")).unwrap()).unwrap();
        self.data_dir.path().join("runs").join(identity["database_id"].as_str().unwrap()).join(format!("job-{id}"))
    }

    /// A client of the daemon's worker service (its Unix socket), whose calls carry `secret`.
    pub async fn worker_client(
        &self,
        secret: &str,
    ) -> gantry_api::proto::worker_service_client::WorkerServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, impl tonic::service::Interceptor>,
    > {
        let socket = self.data_dir.path().join("worker.sock");
        let channel = tonic::transport::Endpoint::from_static("http://worker.sock")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let socket = socket.clone();
                async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .unwrap();
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {secret}").parse().unwrap();
        gantry_api::proto::worker_service_client::WorkerServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", value.clone());
            Ok(r)
        })
    }

    /// The secret of a job attempt's workers, as the daemon computes it (HMAC of the database,
    /// job and attempt under the data directory's `worker.key`).
    pub fn worker_secret(&self, job_id: i64, attempt: u32) -> String {
        use hmac::Mac;
        let key = std::fs::read(self.data_dir.path().join("worker.key")).unwrap();
        let identity: Value = serde_json::from_str(&std::fs::read_to_string(self.data_dir.path().join("identity.json")).unwrap()).unwrap();
        let db = identity["database_id"].as_str().unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("gantry worker: database {db} job {job_id} attempt {attempt}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Workers outlive the daemon by design: stop this test's ones.
        let _ = Command::new("pkill").args(["-9", "-f", &self.data_dir.path().to_string_lossy()]).status();
    }
}

/// PIDs of live worker processes of a job started by `daemon`.
pub fn worker_pids(daemon: &Daemon, job: i64) -> Vec<u32> {
    let out =
        Command::new("pgrep").args(["-f", &format!("worker --job-id {job} .*{}", daemon.data_dir.path().display())]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The losses of a job's `metrics.jsonl` (the worker's own record), last write of each step.
pub fn losses_on_disk(run_dir: &Path) -> std::collections::BTreeMap<i64, f64> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["step"].as_i64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}
