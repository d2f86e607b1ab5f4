//! What a job must pass before it is stored: everything the schema cannot say. A job that could
//! never run (its files missing or out of the read roots, a data format Gantry does not read, text
//! without a tokenizer, `pretrained` without weights, a layout whose ranks cannot fit this node's
//! memory) would fail every attempt, its restarts included: it is refused now, naming the field to
//! change. Messages about a file's contents quote none of its text (see docs/security.md).

use std::path::{Path, PathBuf};

use gantry_api::{Devices, JobSpec, MemoryEstimate, ModelInit, SpecError};
use gantry_engine::data::TokenFormat;
use gantry_engine::models::ModelConfig;
use gantry_engine::train::{estimate_memory, human_bytes};

use crate::config::{fits_node, DaemonConfig};
use crate::error::{Error, Result};

/// Checks that `spec` can run on this node, making its paths absolute (relative ones are taken
/// from the daemon's working directory: workers run elsewhere) and resolved; returns the memory
/// each rank is estimated to need.
pub fn check_runnable(config: &DaemonConfig, spec: &mut JobSpec) -> Result<MemoryEstimate> {
    let cwd = std::env::current_dir().map_err(Error::io("."))?;
    let abs = |p: &str| -> String { absolute(&cwd, p).to_string_lossy().into_owned() };
    spec.model.path = abs(&spec.model.path);
    spec.data.train = abs(&spec.data.train);
    if let Some(t) = &spec.data.tokenizer {
        spec.data.tokenizer = Some(abs(t));
    }
    // Every file the job names must lie under the read roots, checked before any is read.
    crate::roots::check_job(spec, &config.read_roots)?;
    let model_dir = PathBuf::from(&spec.model.path);
    if !model_dir.join("config.json").is_file() {
        return Err(SpecError::new("model.path", format!("{} holds no config.json", spec.model.path)).into());
    }
    // Files read whole here are bounded first: a user-named file must not fill the daemon's memory.
    not_larger("model.path", &model_dir.join("config.json"), MAX_CONFIG_BYTES)?;
    let model = ModelConfig::from_dir(&model_dir).map_err(|e| SpecError::new("model.path", e.to_string()))?;
    if spec.data.seq_len > model.max_positions {
        return Err(SpecError::new(
            "data.seq_len",
            format!("{} exceeds the model's {} positions ({})", spec.data.seq_len, model.max_positions, spec.model.path),
        )
        .into());
    }
    if spec.model.init == ModelInit::Pretrained && !gantry_engine::checkpoint::has_weights(&model_dir) {
        return Err(SpecError::new(
            "model.init",
            format!(
                "\"pretrained\" but {} has no weights (model.safetensors or an index of shards): use \"random\" or \"auto\"",
                spec.model.path
            ),
        )
        .into());
    }
    let data = PathBuf::from(&spec.data.train);
    if !data.is_file() {
        return Err(SpecError::new("data.train", format!("{} is not a file on the daemon's machine", spec.data.train)).into());
    }
    let format = TokenFormat::of(&data).map_err(|e| SpecError::new("data.train", strip_path(&e.to_string(), &data)))?;
    let text = matches!(format, TokenFormat::Text | TokenFormat::Jsonl);
    // The tokenizer: named, or the model directory's. Text needs one; the trainer reads a named one
    // whatever the data (every checkpoint copies it), so either is read now.
    let tokenizer = match &spec.data.tokenizer {
        Some(t) => Some(("data.tokenizer", PathBuf::from(t))),
        None => Some(("model.path", model_dir.join("tokenizer.json"))).filter(|(_, p)| p.is_file()),
    };
    match &tokenizer {
        None if text => {
            return Err(SpecError::new(
                "data.tokenizer",
                format!(
                    "{} is text, which needs a tokenizer: set data.tokenizer, or put a tokenizer.json in {}",
                    spec.data.train, spec.model.path
                ),
            )
            .into())
        }
        Some((field, path)) if text || *field == "data.tokenizer" => check_tokenizer(field, path)?,
        _ => {}
    }
    fits_node(&spec.resources.devices, &config.slots).map_err(|m| SpecError::new("resources.devices", m))?;
    // What the trainer cannot run is refused here, with the field to change, rather than
    // accepted and failed by its workers.
    let run = crate::engine_config::train_config(spec);
    gantry_engine::train::check_layout(&run).map_err(|e| match e {
        gantry_engine::Error::Unsupported { field, message } => SpecError::new(&field, message),
        other => SpecError::new("resources.devices", other.to_string()),
    })?;
    gantry_engine::train::check_model_layout(&run, &model).map_err(|e| match e {
        gantry_engine::Error::Unsupported { field, message } => SpecError::new(&field, message),
        other => SpecError::new("model.path", other.to_string()),
    })?;
    let text_bytes = if text { std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0) } else { 0 };
    check_memory(config, spec, &model, text_bytes)
}

/// The per-rank estimate, refused if the job's ranks cannot fit the node's memory.
fn check_memory(config: &DaemonConfig, spec: &JobSpec, model: &ModelConfig, text_bytes: u64) -> Result<MemoryEstimate> {
    let run = crate::engine_config::train_config(spec);
    let plan = estimate_memory(&run, model, text_bytes).map_err(|e| SpecError::new("model.path", e.to_string()))?;
    // CPU ranks share the host's memory; each GPU rank has a GPU of its own.
    let (ranks, node) = match &spec.resources.devices {
        Devices::Cpu(n) => (*n as u32, config.host_memory),
        Devices::Cuda(_) => (1, gpu_memory(config)),
    };
    let estimate = MemoryEstimate {
        parameters: plan.parameters,
        gradients: plan.gradients,
        optimizer: plan.optimizer,
        activations: plan.activations,
        other: plan.other,
        per_rank: plan.per_rank(),
        ranks: spec.resources.devices.count() as u32,
        node_bytes: node,
    };
    if let Some(node) = node {
        let need = plan.per_rank().saturating_mul(u64::from(ranks));
        if need > node {
            let on = match &spec.resources.devices {
                Devices::Cpu(n) => {
                    format!("× {n} rank{} exceeds this node's {} of memory", if *n == 1 { "" } else { "s" }, human_bytes(node))
                }
                Devices::Cuda(_) => format!("exceeds the {} of this node's GPU", human_bytes(node)),
            };
            return Err(SpecError::new(
                plan.field_to_change(&run.plan),
                format!(
                    "each rank would need about {} (parameters {}, gradients {}, optimizer state {}, activations {}, other {}), which {on}: \
                     the job could only run out of memory",
                    human_bytes(plan.per_rank()),
                    human_bytes(plan.parameters),
                    human_bytes(plan.gradients),
                    human_bytes(plan.optimizer),
                    human_bytes(plan.activations),
                    human_bytes(plan.other),
                )
            )
            .into());
        }
    }
    Ok(estimate)
}

/// The smallest memory among this node's GPU slots (a rank may be placed on any), if the driver
/// can say.
fn gpu_memory(config: &DaemonConfig) -> Option<u64> {
    config
        .slots
        .iter()
        .filter_map(|s| s.strip_prefix("cuda:").and_then(|o| o.parse::<usize>().ok()))
        .map(|o| gantry_kernels::cuda::gpu_memory(o).ok())
        .collect::<Option<Vec<u64>>>()
        .and_then(|m| m.into_iter().min())
}

/// The largest `config.json` and `tokenizer.json` read at submission (real ones are a few KiB
/// and a few tens of MiB).
const MAX_CONFIG_BYTES: u64 = 4 << 20;
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

fn not_larger(field: &str, path: &Path, max: u64) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > max => {
            Err(SpecError::new(field, format!("{} is larger than the {} MiB a file of its kind may be", path.display(), max >> 20)).into())
        }
        _ => Ok(()),
    }
}

/// Reads a tokenizer the way the trainer will; refuses one it cannot use without quoting it.
fn check_tokenizer(field: &str, path: &Path) -> Result<()> {
    if !path.is_file() {
        return Err(SpecError::new(field, format!("{} is not a file on the daemon's machine", path.display())).into());
    }
    not_larger(field, path, MAX_TOKENIZER_BYTES)?;
    if gantry_engine::data::load_tokenizer(path).is_err() {
        return Err(SpecError::new(field, format!("{} is not a tokenizer.json the tokenizers library can read", path.display())).into());
    }
    Ok(())
}

/// An engine message about `path` without the path it starts with (the field already names it).
fn strip_path(message: &str, path: &Path) -> String {
    message.strip_prefix(&format!("{}: ", path.display())).unwrap_or(message).to_string()
}

fn absolute(cwd: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}
