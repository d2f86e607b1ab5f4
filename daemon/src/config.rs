//! The daemon's settings: defaults ← config file ← `GANTRY_*` environment ← flags (clap reads the
//! last two), validated once here and passed down typed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use gantry_api::Devices;
use serde::Deserialize;

use crate::cli::DaemonArgs;

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
        Ok(DaemonConfig {
            http: addr("http", pick(&a.http, &file.http, "127.0.0.1:8080"))?,
            grpc: addr("grpc", pick(&a.grpc, &file.grpc, "127.0.0.1:8081"))?,
            metrics: a.metrics.clone().or(file.metrics).map(|m| addr("metrics", m)).transpose()?,
            database_url,
            slots: slots(&devices),
            data_dir,
            heartbeat_timeout: Duration::from_secs(heartbeat),
            metrics_retention: Duration::from_secs(a.metrics_retention.or(file.metrics_retention).unwrap_or(600)),
            register_timeout: Duration::from_secs(180),
        })
    }

    pub fn runs_root(&self) -> PathBuf {
        self.data_dir.join("runs")
    }
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
