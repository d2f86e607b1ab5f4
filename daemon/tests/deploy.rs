//! The deployment files (deploy/): `deploy/check` validates them offline (the Dockerfile with
//! hadolint, the compose file against the compose-spec schema, the Helm chart rendered by Helm's
//! SDK and validated against Kubernetes' schemas, and every `gantry daemon` command line in them
//! against this build's `gantry daemon --help`), and fails on a broken input, naming what broke.
//! The first run installs its tools from PyPI into target/deploy-check (see deploy/check).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `deploy/check ARGS` with this build's gantry: whether it passed, and what it printed.
fn check(args: &[&str]) -> (bool, String) {
    let out = Command::new(root().join("deploy/check"))
        .args(args)
        .env("GANTRY_BIN", env!("CARGO_BIN_EXE_gantry"))
        .output()
        .expect("running deploy/check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The check's summary line (`deploy/check: N checks passed, M failed`). Not simply the last
/// line: stderr follows stdout in `check`'s text, and the first run says on stderr that it installs
/// the tools.
fn summary(out: &str) -> &str {
    out.lines().rev().find(|l| l.starts_with("deploy/check: ") && l.contains(" checks passed, ")).unwrap_or_default()
}

fn fail_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("FAIL")).collect()
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("gantry-deploy-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// `text` with its one occurrence of `from` replaced by `to` (the test's premise, checked).
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "expected exactly one `{from}` in the file");
    text.replacen(from, to, 1)
}

#[test]
fn deploy_files_pass_the_offline_check() {
    let (ok, out) = check(&[]);
    assert!(ok, "deploy/check failed:\n{out}");
    assert!(fail_lines(&out).is_empty(), "{out}");

    // The real tools ran, each named with its version.
    for tool in ["hadolint: 2.", "check-jsonschema: 0.", "yamllint: 1.", "shellcheck: 0.", "helm: Helm SDK v4.", "kubernetes-validate: 1."]
    {
        assert!(out.contains(tool), "`{tool}` is not in the summary:\n{out}");
    }
    if on_path("promtool") {
        assert!(out.contains("deploy/prometheus/prometheus.yml: promtool check config: accepted"), "{out}");
    }

    // Both image targets, the compose file and each rendering of the chart were checked.
    for line in [
        "ok    deploy/Dockerfile: hadolint: no findings",
        "ok    deploy/Dockerfile: targets: cpu, cuda",
        "ok    deploy/Dockerfile: cuda build: cargo build --release --locked -p gantry --features cuda",
        "ok    deploy/compose.yaml: compose-spec schema",
        "ok    deploy/prometheus/prometheus.yml: target daemon:8080: port 8080 serves /metrics",
        "ok    deploy/compose.yaml: grafana data source Prometheus: http://prometheus:9090 is the prometheus service",
        "ok    chart [default values]: helm template: 4 manifests (DaemonSet, PersistentVolumeClaim, Secret, Service)",
        "ok    chart [postgresql + serviceMonitor]: helm template: 9 manifests (DaemonSet, PersistentVolumeClaim, Secret, \
         Secret, Secret, Service, Service, ServiceMonitor, StatefulSet)",
        "ok    chart [postgresql + serviceMonitor]: StatefulSet/gantry-postgresql schema: Kubernetes 1.25.0 and 1.37.0",
        "ok    chart [postgresql + serviceMonitor]: ServiceMonitor/gantry schema",
    ] {
        assert!(out.lines().any(|l| l.starts_with(line)), "no line `{line}` in:\n{out}");
    }

    // Every place that starts `gantry daemon` had its command line parsed by this binary.
    for place in [
        "deploy/Dockerfile cpu CMD",
        "deploy/Dockerfile cuda CMD",
        "deploy/compose.yaml daemon",
        "chart [default values] DaemonSet",
        "chart [postgresql + serviceMonitor] DaemonSet",
    ] {
        let line = format!("ok    {place}: daemon flags: `gantry daemon ");
        assert!(out.lines().any(|l| l.starts_with(&line) && l.ends_with("` parses")), "`{place}` was not checked:\n{out}");
    }
    let flags = out
        .lines()
        .find_map(|l| l.strip_prefix("  - daemon flags checked against `gantry daemon --help`: "))
        .unwrap_or_else(|| panic!("no list of the flags checked:\n{out}"));
    for flag in ["--http", "--grpc", "--devices", "--tokens", "--data-dir", "--config", "--metrics", "--tls-cert"] {
        assert!(flags.split(' ').any(|f| f == flag), "{flag} is not among the flags checked: {flags}");
    }
    let last = summary(&out);
    assert!(last.starts_with("deploy/check: ") && last.ends_with(" checks passed, 0 failed"), "{last}");
}

#[test]
fn deploy_check_names_an_unknown_daemon_flag_in_the_compose_file() {
    let dir = TempDir::new("compose");
    let compose = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    let file = dir.0.join("compose.yaml");
    std::fs::write(&file, replace_once(&compose, "      - --grpc\n", "      - --grcp\n")).unwrap();
    // Relative paths in the copy resolve from deploy/, as for the original.
    let project = root().join("deploy");
    let (ok, out) = check(&["--only", "compose", "--compose", file.to_str().unwrap(), "--project-directory", project.to_str().unwrap()]);
    assert!(!ok, "deploy/check passed a compose file with `--grcp`:\n{out}");
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 1, "{out}");
    assert!(fails[0].contains("daemon flags: `gantry daemon` has no flag --grcp"), "{out}");
    assert!(summary(&out).ends_with(" checks passed, 1 failed"), "{out}");
}

#[test]
fn deploy_check_names_an_unknown_daemon_flag_in_the_chart() {
    let dir = TempDir::new("chart-flag");
    let chart = dir.0.join("gantry");
    copy_dir(&root().join("deploy/helm/gantry"), &chart);
    let values = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    std::fs::write(chart.join("values.yaml"), replace_once(&values, "  extraArgs: []\n", "  extraArgs: [\"--no-such-flag\"]\n")).unwrap();
    let (ok, out) = check(&["--only", "chart", "--chart", chart.to_str().unwrap()]);
    assert!(!ok, "deploy/check passed a chart that gives the daemon `--no-such-flag`:\n{out}");
    // The two renderings that keep values.yaml's extraArgs (the third sets its own).
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 2, "{out}");
    assert!(fails.iter().all(|l| l.contains("DaemonSet: daemon flags: `gantry daemon` has no flag --no-such-flag")), "{out}");
}

#[test]
fn deploy_check_validates_rendered_manifests_against_kubernetes_schemas() {
    let dir = TempDir::new("chart-schema");
    let chart = dir.0.join("gantry");
    copy_dir(&root().join("deploy/helm/gantry"), &chart);
    // A Service port as a string: valid YAML and a valid template, refused by Kubernetes' schema.
    let service = std::fs::read_to_string(chart.join("templates/service.yaml")).unwrap();
    std::fs::write(
        chart.join("templates/service.yaml"),
        replace_once(&service, "port: {{ .Values.daemon.httpPort }}\n", "port: \"{{ .Values.daemon.httpPort }}\"\n"),
    )
    .unwrap();
    let (ok, out) = check(&["--only", "chart", "--chart", chart.to_str().unwrap()]);
    assert!(!ok, "deploy/check passed a Service whose port is a string:\n{out}");
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 3, "one per rendering:\n{out}");
    assert!(fails.iter().all(|l| l.contains("Service/gantry schema: Kubernetes 1.25.0: spec.ports.0.port")), "{out}");
}
