//! The Grafana dashboards (dashboards/*.json) query only series a live daemon exports (or NVIDIA
//! DCGM exporter series, by their documented names), and `promtool check metrics` accepts the
//! daemon's /metrics.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use common::{tiny_spec, Daemon, TestDb};
use serde_json::{json, Value};

/// The DCGM exporter's series the node dashboard shows (NVIDIA's dcgm-exporter default counters).
const DCGM: &[&str] =
    &["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP"];

/// Series the daemon exports only for GPU jobs (a CPU's peak FLOP/s is not known, so its ranks
/// report no MFU): the CPU daemon of this test cannot show them, so they are checked against the
/// daemon's own registry instead (its `# HELP` text in the source).
const GPU_ONLY: &[&str] = &["gantry_job_mfu"];

/// Every PromQL expression of a dashboard: panel targets and template variable queries.
fn queries(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            out.push(v["definition"].as_str().unwrap().to_string());
        }
    }
    out
}

/// The metric names in an expression: words that start `gantry_` or `DCGM_`.
fn series(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("gantry_") || word.starts_with("DCGM_") {
                names.push(word.clone());
            }
            word.clear();
        }
    }
    names
}

#[tokio::test]
async fn every_dashboard_query_uses_series_the_daemon_exports_and_promtool_accepts_metrics() {
    let db = TestDb::new().await;
    let d = Daemon::start(&db.url, "cpu:1").await;
    // A job that trains (per-rank series) and one that fails once and is restarted (restarts).
    let ok = d.submit(&tiny_spec(4, 0)).await;
    d.wait_state(ok, "succeeded", 60).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("text.bin"), "not tokens at all\n").unwrap();
    let mut bad = tiny_spec(4, 0);
    bad["data"] = json!({"train": dir.path().join("text.bin"), "seq_len": 4});
    bad["restart"]["max_restarts"] = json!(1);
    let failing = d.submit(&bad).await;
    d.wait_state(failing, "failed", 60).await;
    let metrics = d.client.get(format!("{}/metrics", d.http)).send().await.unwrap().text().await.unwrap();

    let mut exported = BTreeSet::new();
    for l in metrics.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            exported.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    assert!(exported.contains("gantry_worker_restarts_total") && exported.contains("gantry_job_loss"), "{metrics}");

    let registered = std::fs::read_to_string(common::repo().join("daemon/src/metrics.rs")).unwrap();
    let dashboards = common::repo().join("dashboards");
    let mut checked = 0;
    for name in ["gantry-cluster.json", "gantry-job.json", "gantry-node.json"] {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(dashboards.join(name)).unwrap()).unwrap();
        assert!(d["uid"].is_string() && d["title"].as_str().unwrap().starts_with("Gantry"), "{name}");
        for expr in queries(&d) {
            let names = series(&expr);
            assert!(!names.is_empty(), "{name}: `{expr}` queries no series");
            for s in names {
                let known = if s.starts_with("DCGM_") {
                    DCGM.contains(&s.as_str())
                } else if GPU_ONLY.contains(&s.as_str()) {
                    !exported.contains(&s) && registered.contains(&format!("\"{s}\""))
                } else {
                    exported.contains(&s)
                };
                assert!(known, "{name}: `{expr}` uses `{s}`, which the daemon does not export");
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "{checked} series checked");
    let node: Value = serde_json::from_str(&std::fs::read_to_string(dashboards.join("gantry-node.json")).unwrap()).unwrap();
    assert!(queries(&node).iter().any(|q| q.contains("DCGM_FI_DEV_GPU_UTIL")), "the node view shows DCGM's GPU utilisation");

    // promtool (Debian's prometheus package; scripts/test installs it) accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test installs Debian's prometheus package)");
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
