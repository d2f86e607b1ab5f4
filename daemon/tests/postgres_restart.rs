//! PostgreSQL restarted under a running job: training goes on, the daemon reconnects, and the
//! reports made while the database was away are written once it is back. The test runs a private
//! PostgreSQL server of its own (initdb in a temporary directory), so stopping it disturbs nothing
//! else.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{free_port, tiny_spec, worker_pids, Daemon};

struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let versions = std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL server binaries under /usr/lib/postgresql");
        let mut bins: Vec<PathBuf> =
            versions.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|b| b.join("initdb").is_file()).collect();
        bins.sort();
        let bin = bins.pop().expect("an initdb under /usr/lib/postgresql/*/bin");
        let dir = tempfile::tempdir().unwrap();
        let pg = PrivatePostgres { dir, bin, port: free_port() };
        if is_root() {
            // PostgreSQL refuses to run as root: hand the directory to its own user.
            run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(pg.dir.path()));
        }
        run(&mut pg.as_postgres(&pg.bin.join("initdb"), &["-D", &pg.data(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]));
        pg.ctl("start");
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn as_postgres(&self, exe: &Path, args: &[&str]) -> Command {
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe).args(args);
            c
        } else {
            let mut c = Command::new(exe);
            c.args(args);
            c
        }
    }

    fn ctl(&self, action: &str) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("server.log").to_string_lossy().into_owned();
        run(&mut self.as_postgres(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-o", &opts, "-l", &log, "-m", "fast", "-w", action]));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.as_postgres(&self.bin.join("pg_ctl"), &["-D", &self.data(), "-m", "immediate", "stop"]).output();
    }
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn run(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(out.status.success(), "{c:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn postgres_restarted_while_a_job_runs_loses_no_report() {
    let pg = PrivatePostgres::start();
    let d = Daemon::start(&pg.url(), "cpu:1").await;
    // 3 to 20 ms a step, depending on the machine: the outage of a few seconds falls well inside
    // the run.
    let steps = 4000;
    let id = d.submit(&tiny_spec(steps, 0)).await;
    let before = d.wait_job(id, 60, "reached step 5", |j| j["step"].as_i64().unwrap_or(0) >= 5).await;
    let step_before = before["step"].as_i64().unwrap();

    pg.ctl("stop");
    let (status, _) = d.get("/readyz").await;
    assert_eq!(status, 503, "the daemon reports that its store is away");
    let (status, err) = d.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!((status, err["code"].as_str()), (503, Some("unavailable")), "{err}");
    // Training goes on meanwhile: the worker's own record grows.
    let lines = || std::fs::read_to_string(d.run_dir(id).join("metrics.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
    let at_stop = lines();
    assert!(at_stop < steps as usize, "the job ended before PostgreSQL was stopped: the test needs more steps");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines() <= at_stop && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(lines() > at_stop, "the job kept training while PostgreSQL was down ({at_stop} steps at the stop)");
    assert_eq!(worker_pids(&d, id).len(), 1);
    pg.ctl("start");

    let job = d.wait_state(id, "succeeded", 180).await;
    assert_eq!(job["restarts"], 0, "{job}");
    let recorded: Vec<i64> = d.steps(id).await.iter().map(|s| s["step"].as_i64().unwrap()).collect();
    assert_eq!(recorded, (1..=steps as i64).collect::<Vec<_>>(), "every step recorded once, those made during the outage too");
    assert!(at_stop as i64 > step_before - 1 && (at_stop as i64) < steps as i64, "the outage fell inside the run");
    assert_eq!(d.event_path(id).await, ["queued", "scheduled", "running", "succeeded"]);
    let (status, _) = d.get("/readyz").await;
    assert_eq!(status, 200);
}
