//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`, driven by
//! playwright-core from daemon/tests/web) renders the daemon's pages, and what it shows is checked
//! against the API: the jobs list, a finished job's charts (every step's values, drawn), events,
//! logs and checkpoints, the queue with its reasons, the devices, the submit form's field error,
//! a TOML submission and a cancel; and with `--tokens`, the token prompt and what a user may do.
//! Screenshots land in `target/tmp/dashboard/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{gantry, repo, tiny_spec, Daemon, TestDb};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs dashboard.mjs and returns what it saw.
fn browse(args: &[&str]) -> Value {
    let dir = repo().join("daemon/tests/web");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix daemon/tests/web` (scripts/test does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_string());
    assert!(Path::new(&chromium).exists(), "no Chromium at {chromium}: `apt-get install chromium` (scripts/test does)");
    let out = Command::new("node").arg(dir.join("dashboard.mjs")).args(args).env("CHROMIUM", &chromium).output().expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the browser run failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn screenshots(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The example spec as TOML with absolute paths.
fn toml_spec(name: &str, steps: u64, lr: &str) -> String {
    let ex = repo().join("examples");
    format!(
        "name = \"{name}\"\n\n[model]\npath = \"{}\"\ninit = \"random\"\n\n[data]\ntrain = \"{}\"\ntokenizer = \"{}\"\nseq_len = 64\n\n\
         [train]\nsteps = {steps}\nglobal_batch_size = 4\nlr = {lr}\nwarmup_steps = 2\n\n[resources]\ndevices = \"cpu:1\"\nthreads = 1\n",
        ex.join("tiny-gpt2/model").display(),
        ex.join("data/corpus.txt").display(),
        ex.join("data/tokenizer.json").display(),
    )
}

fn row<'a>(rows: &'a Value, first_cell: &str) -> &'a Vec<Value> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap())
        .find(|r| r.first().and_then(Value::as_str) == Some(first_cell))
        .unwrap_or_else(|| panic!("no row {first_cell} in {rows}"))
}

#[tokio::test]
async fn the_dashboard_shows_jobs_charts_queue_and_devices_and_refuses_a_bad_spec_at_its_field() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    let mut spec = tiny_spec(6, 3);
    spec["name"] = json!("dash-done");
    let done = d.submit(&spec).await;
    d.wait_state(done, "succeeded", 90).await;
    let mut long = tiny_spec(1_000_000, 0);
    long["name"] = json!("dash-running");
    let running = d.submit(&long).await;
    d.wait_state(running, "running", 60).await;
    let mut waits = tiny_spec(4, 0);
    waits["name"] = json!("dash-queued");
    let queued = d.submit(&waits).await;
    let holder = format!("held by job {running}");
    let queued_job = d.wait_job(queued, 30, "its reason to wait", |j| j["reason"].as_str().unwrap().contains(&holder)).await;
    assert_eq!(queued_job["state"], "queued");

    // Another site's page cannot act through the user's browser, nor read the API through DNS
    // rebinding: refused before anything is done.
    let (_, before) = d.get("/v1/jobs").await;
    let cross_site = [
        d.request(reqwest::Method::POST, "/v1/jobs")
            .header("origin", "http://evil.example")
            .header("content-type", "text/plain")
            .body(spec.to_string()),
        d.request(reqwest::Method::POST, &format!("/v1/jobs/{running}/cancel")).header("sec-fetch-site", "cross-site"),
        d.request(reqwest::Method::GET, "/v1/jobs").header("host", "attacker.example"),
    ];
    for r in cross_site {
        let (status, body) = Daemon::send(r).await;
        assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")), "{body}");
    }
    let (_, after) = d.get("/v1/jobs").await;
    assert_eq!(before, after, "nothing changed");

    // The same bad spec through the API: the error the page must show.
    let out = screenshots("open");
    let bad = toml_spec("dash-bad", 4, "-0.5");
    std::fs::write(out.join("bad.toml"), &bad).unwrap();
    std::fs::write(out.join("good.toml"), toml_spec("dash-from-browser", 3, "0.002")).unwrap();
    let (status, err) =
        Daemon::send(d.request(reqwest::Method::POST, "/v1/jobs").header("content-type", "application/toml").body(bad)).await;
    assert_eq!((status, err["field"].as_str()), (422, Some("train.lr")), "{err}");

    let ids = [done, running, queued].map(|i| i.to_string());
    let seen = browse(&["open", &d.http, out.to_str().unwrap(), &ids[0], &ids[1], &ids[2]]);
    // The one failed request is the bad spec's (422).
    let errors: Vec<&Value> =
        seen["console_errors"].as_array().unwrap().iter().filter(|e| !e.as_str().unwrap().contains("status of 422")).collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");

    // The jobs list: the finished job's row, and the filter.
    let r = row(&seen["jobs"], &format!("#{done}"));
    assert_eq!((r[1].as_str(), r[2].as_str(), r[4].as_str()), (Some("dash-done"), Some("succeeded"), Some("6/6")), "{r:?}");
    let r = row(&seen["jobs"], &format!("#{running}"));
    assert_eq!((r[1].as_str(), r[2].as_str(), r[7].as_str()), (Some("dash-running"), Some("running"), Some("cpu:0")), "{r:?}");
    assert_eq!(seen["succeeded_filter"], json!([done]));

    // The job page: every chart holds every step with the API's values, and is drawn.
    assert!(seen["job_title"].as_str().unwrap().starts_with("dash-done"), "{}", seen["job_title"]);
    let steps = d.steps(done).await;
    assert_eq!(steps.len(), 6);
    for key in ["loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes", "step_ms"] {
        let chart = &seen["charts"][key];
        assert_eq!(chart["steps"], json!([1, 2, 3, 4, 5, 6]), "{key}");
        let api: Vec<f64> = steps.iter().map(|s| s[key].as_f64().unwrap()).collect();
        let shown: Vec<f64> = chart["values"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(shown, api, "{key}: the chart shows the API's values");
        assert!(chart["canvas"].as_bool().unwrap() && chart["series_pixels"].as_u64().unwrap() > 100, "{key}'s line is drawn: {chart}");
    }
    let events: Vec<&str> = seen["events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert_eq!(events.len(), d.event_path(done).await.len(), "{events:?}");
    assert!(events.last().unwrap().contains("running → succeeded"), "{events:?}");
    let (_, ck) = d.get(&format!("/v1/jobs/{done}/checkpoints")).await;
    assert_eq!(
        ck["checkpoints"].as_array().unwrap().iter().map(|c| c["step"].as_i64().unwrap()).collect::<Vec<_>>(),
        [3],
        "the last step writes final/, not a checkpoint"
    );
    let shown: Vec<String> = seen["checkpoints"].as_array().unwrap().iter().map(|r| r[0].as_str().unwrap().to_string()).collect();
    assert_eq!(shown, ["final", "3"]);
    let (_, logs) = d.get(&format!("/v1/jobs/{done}/logs?rank=0")).await;
    let lines: Vec<&str> = logs["lines"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert!(lines.len() > 3, "{logs}");
    assert_eq!(seen["logs"].as_str().unwrap(), lines.iter().map(|l| format!("{l}\n")).collect::<String>(), "the logs shown are rank 0's");
    assert_eq!(seen["cancel_button"], json!(false), "a finished job has no cancel");

    // The queue, with the API's reason; the device and its holder.
    let r = row(&seen["queue"], "1");
    assert_eq!((r[1].as_str(), r[2].as_str()), (Some(format!("#{queued}").as_str()), Some("dash-queued")), "{r:?}");
    assert_eq!(r[6].as_str(), queued_job["reason"].as_str());
    assert!(!queued_job["reason"].as_str().unwrap().is_empty());
    let r = row(&seen["devices"], "cpu:0");
    assert_eq!(r[2].as_str(), Some(format!("#{running} dash-running").as_str()), "{r:?}");

    // The bad spec's error names its field and line; the good TOML became a job.
    assert_eq!(seen["field_error"]["field"], "train.lr");
    let text = seen["field_error"]["text"].as_str().unwrap();
    assert!(text.starts_with("train.lr: ") && text.contains(err["message"].as_str().unwrap()) && text.ends_with("(line 15)"), "{text}");
    assert_eq!(seen["still_on_submit"], json!(true));
    let submitted = d.job(seen["submitted"].as_i64().unwrap()).await;
    assert_eq!((submitted["name"].as_str(), submitted["spec"]["train"]["lr"].as_f64()), (Some("dash-from-browser"), Some(0.002)));
    assert_eq!(seen["submitted_title"], "dash-from-browser · Gantry");

    // The running job's charts grew while the page was open.
    let live = seen["live_points"].as_array().unwrap();
    assert!(live[1].as_u64() > live[0].as_u64(), "{live:?}");

    // Cancelled from its page.
    assert_eq!(seen["cancelled_badge"], "cancelled");
    assert_eq!(d.job(running).await["state"], "cancelled");
}

/// A token file with user `alice` and admin `root`; their secrets.
fn tokens(dir: &Path) -> (PathBuf, [String; 2]) {
    let file = dir.join("tokens.toml");
    let new = |user: &str, role: &str| {
        let out = Command::new(gantry()).args(["token", "new", "--user", user, "--role", role, "--append"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().next().unwrap().to_string()
    };
    let secrets = [new("alice", "user"), new("root", "admin")];
    (file, secrets)
}

#[tokio::test]
async fn with_tokens_the_dashboard_asks_once_and_offers_only_what_the_user_may_do() {
    let db = TestDb::new().await;
    let keys = tempfile::tempdir().unwrap();
    let (file, [alice, root]) = tokens(keys.path());
    let examples = repo().join("examples");
    let args = ["--tokens", file.to_str().unwrap(), "--read-roots", examples.to_str().unwrap()];
    let mut d = Daemon::start_with_args(&db.url, "cpu:1", 20, &[], &args).await;
    // Root's job runs; alice's waits behind it.
    d.token = Some(root.clone());
    let others = d.submit(&tiny_spec(1_000_000, 0)).await;
    d.wait_state(others, "running", 60).await;
    d.token = Some(alice.clone());
    let own = d.submit(&tiny_spec(4, 0)).await;
    assert_eq!(d.job(own).await["owner"], "alice");
    let (status, me) = d.get("/v1/whoami").await;
    assert_eq!((status, me["user"].as_str(), me["role"].as_str(), me["tokens"].as_bool()), (200, Some("alice"), Some("user"), Some(true)));

    let out = screenshots("tokens");
    let seen = browse(&["tokens", &d.http, out.to_str().unwrap(), &alice, &others.to_string(), &own.to_string()]);
    // The failed requests are the 401s that made the page ask for a token.
    let errors: Vec<&Value> =
        seen["console_errors"].as_array().unwrap().iter().filter(|e| !e.as_str().unwrap().contains("status of 401")).collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    assert_eq!(seen["asked"], json!(true));
    assert!(seen["refused"].as_str().unwrap().contains("the token is not valid"), "{}", seen["refused"]);
    assert!(seen["who"].as_str().unwrap().contains("alice (user)"), "{}", seen["who"]);
    assert_eq!(seen["asked_again"], json!(false), "the token is asked for once");
    assert_eq!(seen["cancel_on_others_job"], json!(false), "alice may not cancel root's job");
    assert_eq!(seen["cancel_on_own_job"], json!(true), "alice may cancel her own");
    assert_eq!(seen["asked_after_sign_out"], json!(true));

    d.token = Some(root);
    for id in [others, own] {
        let (status, _) = d.post(&format!("/v1/jobs/{id}/cancel"), "").await;
        assert_eq!(status, 200);
    }
}
