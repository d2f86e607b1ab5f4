//! The daemon's settings: defaults ← config file ← `GANTRY_*` environment ← flags (clap reads the
//! last two), validated once here and passed down typed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use gantry_api::Devices;
use serde::Deserialize;

use crate::cli::DaemonArgs;
use crate::roots::ReadRoots;

/// The config file's keys (all optional), named like the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    http: Option<String>,
    grpc: Option<String>,
    metrics: Option<String>,
    database_url: Option<String>,
    data_dir: Option<PathBuf>,
    devices: Option<String>,
    heartbeat_timeout: Option<u64>,
    metrics_retention: Option<u64>,
    stall_timeout: Option<u64>,
    tokens: Option<PathBuf>,
    insecure: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    read_roots: Option<Vec<PathBuf>>,
    max_connections: Option<usize>,
    read_timeout: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// A listener of its own for /metrics, if configured.
    pub metrics: Option<SocketAddr>,
    pub database_url: String,
    pub data_dir: PathBuf,
    /// One slot per device (`cpu:0`, `cpu:1`, … or `cuda:0`, …).
    pub slots: Vec<String>,
    pub heartbeat_timeout: Duration,
    /// How long a finished job's per-rank series stay on /metrics (so the last scrape sees the
    /// final values) before they are dropped (so series do not pile up over thousands of jobs).
    pub metrics_retention: Duration,
    /// How long a started rank may take to register (model and data loading included).
    pub register_timeout: Duration,
    /// How long a rank may go without finishing a step before it counts as hung; `None`: derived
    /// from its own step times (see `supervisor::stall_limit`).
    pub stall_timeout: Option<Duration>,
    /// The tokens file (`None`: every caller is an anonymous admin, on loopback only).
    pub tokens: Option<PathBuf>,
    /// TLS for REST and gRPC: (certificate chain, key), PEM.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where jobs may read their files from.
    pub read_roots: ReadRoots,
    pub max_connections: usize,
    /// How long a client may take to send a request's headers or body.
    pub read_timeout: Duration,
    /// The memory the node's CPU ranks share (the smaller of the machine's and its cgroup's).
    pub host_memory: Option<u64>,
    /// This data directory's runs of this database (`DATA_DIR/runs/<database id>`), known once
    /// the store is bound (see `datadir`).
    pub runs_root: PathBuf,
    /// The database's identity, known once the store is bound.
    pub database_id: String,
}

impl DaemonConfig {
    pub fn resolve(a: &DaemonArgs) -> anyhow::Result<DaemonConfig> {
        let file: FileConfig = match &a.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("{}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let pick = |flag: &Option<String>, file: &Option<String>, default: &str| flag.clone().or(file.clone()).unwrap_or(default.into());
        let addr = |name: &str, v: String| -> anyhow::Result<SocketAddr> {
            v.parse().with_context(|| format!("--{name} `{v}` is not an address like 127.0.0.1:8080"))
        };
        let data_dir = a.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("gantry-data"));
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating the data dir {}", data_dir.display()))?;
        let data_dir = data_dir.canonicalize().with_context(|| format!("{}", data_dir.display()))?;
        let database_url =
            a.database_url.clone().or(file.database_url).unwrap_or_else(|| format!("sqlite://{}", data_dir.join("gantry.db").display()));
        let devices: Devices = pick(&a.devices, &file.devices, "cpu:1").parse().map_err(|e: String| anyhow::anyhow!("--devices: {e}"))?;
        if let Devices::Cuda(ids) = &devices {
            check_gpus(&devices, ids)?;
        }
        let heartbeat = a.heartbeat_timeout.or(file.heartbeat_timeout).unwrap_or(30);
        if heartbeat == 0 {
            bail!("--heartbeat-timeout must be at least 1 second");
        }
        let stall = a.stall_timeout.or(file.stall_timeout);
        if stall == Some(0) {
            bail!("--stall-timeout must be at least 1 second");
        }
        let tokens = a.tokens.clone().or(file.tokens);
        let insecure = a.insecure || file.insecure.unwrap_or(false);
        let tls = match (a.tls_cert.clone().or(file.tls_cert), a.tls_key.clone().or(file.tls_key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("TLS needs both --tls-cert and --tls-key"),
        };
        let http = addr("http", pick(&a.http, &file.http, "127.0.0.1:8080"))?;
        let grpc = addr("grpc", pick(&a.grpc, &file.grpc, "127.0.0.1:8081"))?;
        // Without tokens anyone who reaches the port steers every job: only this machine's users
        // may, unless the operator says otherwise.
        if tokens.is_none() && !insecure {
            for (flag, a) in [("--http", http), ("--grpc", grpc)] {
                if !a.ip().is_loopback() {
                    bail!(
                        "{flag} {a} is not a loopback address and no --tokens file is given: anyone who reaches it could submit, cancel and delete jobs; give --tokens FILE (see `gantry token new`), or --insecure to do it anyway"
                    );
                }
            }
        }
        let roots = if a.read_roots.is_empty() { file.read_roots.unwrap_or_default() } else { a.read_roots.clone() };
        // With tokens, jobs come from users who may not read what the daemon can: by default they
        // read only from DATA_DIR/inputs.
        let read_roots = match (roots.is_empty(), &tokens) {
            (false, _) => ReadRoots::new(&roots).map_err(anyhow::Error::msg)?,
            (true, Some(_)) => {
                let inputs = data_dir.join("inputs");
                std::fs::create_dir_all(&inputs).with_context(|| format!("creating {}", inputs.display()))?;
                ReadRoots::new(&[inputs]).map_err(anyhow::Error::msg)?
            }
            (true, None) => ReadRoots::anywhere(),
        };
        // The daemon's own files, whatever the roots.
        let own = ["worker.key", "gantry.db", "gantry.db-wal", "gantry.db-shm", "daemon.lock", "identity.json", "worker.sock"];
        let read_roots =
            read_roots.deny(own.iter().map(|f| data_dir.join(f)).chain(tokens.clone()).chain(tls.as_ref().map(|(_, key)| key.clone())));
        let max_connections = a.max_connections.or(file.max_connections).unwrap_or(512);
        if max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        let read_timeout = a.read_timeout.or(file.read_timeout).unwrap_or(30);
        if read_timeout == 0 {
            bail!("--read-timeout must be at least 1 second");
        }
        Ok(DaemonConfig {
            http,
            grpc,
            metrics: a.metrics.clone().or(file.metrics).map(|m| addr("metrics", m)).transpose()?,
            database_url,
            slots: slots(&devices),
            runs_root: data_dir.join("runs"),
            database_id: String::new(),
            data_dir,
            heartbeat_timeout: Duration::from_secs(heartbeat),
            metrics_retention: Duration::from_secs(a.metrics_retention.or(file.metrics_retention).unwrap_or(600)),
            register_timeout: Duration::from_secs(180),
            stall_timeout: stall.map(Duration::from_secs),
            tokens,
            tls,
            read_roots,
            max_connections,
            read_timeout: Duration::from_secs(read_timeout),
            host_memory: host_memory(),
        })
    }

    /// The Unix socket the workers report to (in the data directory: only those who may enter it
    /// can connect).
    pub fn worker_socket(&self) -> PathBuf {
        self.data_dir.join("worker.sock")
    }
}

/// The memory this machine gives the daemon's workers: MemTotal, or the cgroup's limit if lower.
pub fn host_memory() -> Option<u64> {
    let total =
        std::fs::read_to_string("/proc/meminfo").ok()?.lines().find_map(|l| {
            l.strip_prefix("MemTotal:").and_then(|v| v.trim().strip_suffix("kB")).and_then(|v| v.trim().parse::<u64>().ok())
        })? * 1024;
    let cgroup = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok().and_then(|v| v.trim().parse::<u64>().ok()));
    Some(cgroup.map_or(total, |c| c.min(total)))
}

/// GPU slots must name GPUs this machine has, so that jobs are not placed on devices that do not
/// exist (each would fail at its worker's start, again at every restart). Only the driver's count
/// is read: opening the GPUs would fail, or take memory, where a re-adopted worker is training.
fn check_gpus(devices: &Devices, ids: &[u32]) -> anyhow::Result<()> {
    let count = gantry_kernels::cuda::gpu_count().map_err(|e| anyhow::anyhow!("--devices {devices}: {e}"))?;
    if let Some(id) = ids.iter().find(|&&i| i as usize >= count) {
        bail!("--devices {devices}: there is no cuda:{id}; this machine has {count} GPU(s) (see `gantry devices`)");
    }
    Ok(())
}

pub fn slots(devices: &Devices) -> Vec<String> {
    match devices {
        Devices::Cpu(n) => (0..*n).map(|i| format!("cpu:{i}")).collect(),
        Devices::Cuda(ids) => ids.iter().map(|i| format!("cuda:{i}")).collect(),
    }
}

/// The kind of a slot (`cpu` or `cuda`).
pub fn slot_kind(slot: &str) -> &str {
    slot.split(':').next().unwrap_or(slot)
}

/// Whether a job's devices (`cpu:N` / `cuda:…`) can ever run on these slots.
pub fn fits_node(devices: &Devices, slots: &[String]) -> Result<(), String> {
    let kind = device_kind(devices);
    let have = slots.iter().filter(|s| slot_kind(s) == kind).count();
    let need = devices.count();
    if have < need {
        return Err(format!("needs {need} {kind} device{}; this node has {have}", if need == 1 { "" } else { "s" }));
    }
    Ok(())
}

/// The slot kind a device list asks for.
pub fn device_kind(devices: &Devices) -> &'static str {
    match devices {
        Devices::Cpu(_) => "cpu",
        Devices::Cuda(_) => "cuda",
    }
}
