//! Training checkpoints: what `gantry train` and the daemon's workers restart from.
//!
//! A checkpoint directory is a Hugging Face model directory (so any checkpoint can be loaded by
//! `transformers` or exported as it is) plus `optimizer.safetensors` (the AdamW moments, flat, in
//! the parameter table's layout) and `trainer_state.json` (the step; the data position follows from
//! the step and the seed). It is written under a temporary name and renamed into place only when
//! complete, so a directory named `step_N` is always whole.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::hf::{load_weights, save_hf_dir};
use super::sharded::{read_rank_shards, shard_files};
use crate::models::ModelConfig;
use crate::params::{ParamBuffers, ParamTable};
use crate::{Error, Result};

const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "trainer_state.json";
/// Written last: the list of the checkpoint's files with their sizes and CRC-32 checksums.
const MANIFEST: &str = "manifest.json";

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: u64,
    files: std::collections::BTreeMap<String, FileSum>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileSum {
    bytes: u64,
    crc32: String,
}

fn file_sum(path: &Path) -> Result<FileSum> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum { bytes, crc32: format!("{:08x}", h.finalize()) })
}

/// Fsyncs every file of `tmp`, writes the manifest of their sizes and checksums last, and renames
/// the directory into place.
fn seal(tmp: &Path, dir: &Path, step: u64) -> Result<()> {
    // Files whose writers already fsynced them and recorded their sums (`.sums-*.json`, see
    // `record_sums`) are not read again: rank 0 commits a sharded checkpoint without re-reading
    // every rank's shard.
    let mut files = std::collections::BTreeMap::new();
    let mut entries = Vec::new();
    for f in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))? {
        entries.push(f.map_err(|e| Error::io(tmp, e))?.path());
    }
    for sums in entries.iter().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".sums-"))) {
        let text = std::fs::read_to_string(sums).map_err(|e| Error::io(sums, e))?;
        let recorded: BTreeMap<String, FileSum> =
            serde_json::from_str(&text).map_err(|e| Error::Weights { path: sums.clone(), message: e.to_string() })?;
        files.extend(recorded);
        std::fs::remove_file(sums).map_err(|e| Error::io(sums, e))?;
    }
    for path in entries.iter().filter(|p| p.file_name().is_some_and(|n| !n.to_string_lossy().starts_with(".sums-"))) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let std::collections::btree_map::Entry::Vacant(slot) = files.entry(name) {
            std::fs::File::open(path).and_then(|h| h.sync_all()).map_err(|e| Error::io(path, e))?;
            slot.insert(file_sum(path)?);
        }
    }
    let manifest = serde_json::to_string_pretty(&Manifest { step, files }).expect("serialises");
    let mpath = tmp.join(MANIFEST);
    std::fs::write(&mpath, manifest).and_then(|_| std::fs::File::open(&mpath)?.sync_all()).map_err(|e| Error::io(&mpath, e))?;
    replace_dir(tmp, dir)
}

/// Where `dir` is written before it is put in place (`replace_dir`): a hidden sibling, which
/// `committed_checkpoints` never lists.
pub fn partial_dir(dir: &Path) -> std::path::PathBuf {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    dir.with_file_name(format!(".{name}.partial"))
}

/// Puts the complete directory `tmp` in place as `dir`: its files and entries are synced, then it
/// is renamed (or, where `dir` exists, swapped in with one atomic rename, the old one deleted
/// after), and the rename is synced before anything (a clean-up of older checkpoints, say)
/// counts on it. So `dir` always holds a complete directory, the old or the new.
pub fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(tmp).map_err(|e| Error::io(tmp, e))? {
        let path = entry.map_err(|e| Error::io(tmp, e))?.path();
        if path.is_file() {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io(&path, e))?;
        }
    }
    std::fs::File::open(tmp).and_then(|d| d.sync_all()).map_err(|e| Error::io(tmp, e))?;
    let replacing = dir.exists();
    let renamed = if replacing { swap_dirs(tmp, dir) } else { std::fs::rename(tmp, dir) };
    renamed.map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| Error::io(parent, e))?;
    }
    if replacing {
        let _ = std::fs::remove_dir_all(tmp);
    }
    Ok(())
}

/// Exchanges two directories atomically (Linux `renameat2(RENAME_EXCHANGE)`). Where the file
/// system cannot, the old one is moved aside first (a crash in between leaves it, complete, as
/// `.NAME.replaced` beside the new one's `.NAME.partial`).
fn swap_dirs(new: &Path, old: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(None, new, None, old, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let aside = old.with_file_name(format!(".{}.replaced", old.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint")));
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::rename(old, &aside)?;
    if let Err(e) = std::fs::rename(new, old) {
        let _ = std::fs::rename(&aside, old);
        return Err(e);
    }
    // `new` is where the caller deletes the old checkpoint from.
    std::fs::rename(&aside, new)
}

/// Fsyncs `names` in `tmp` and records their sizes and checksums in `.sums-{tag}.json`, for the
/// commit to use: each rank of a sharded checkpoint does this on its own writer thread.
pub fn record_sums(tmp: &Path, tag: &str, names: &[String]) -> Result<()> {
    let mut sums = BTreeMap::new();
    for name in names {
        let path = tmp.join(name);
        std::fs::File::open(&path).and_then(|h| h.sync_all()).map_err(|e| Error::io(&path, e))?;
        sums.insert(name.clone(), file_sum(&path)?);
    }
    let path = tmp.join(format!(".sums-{tag}.json"));
    std::fs::write(&path, serde_json::to_string(&sums).expect("serialises")).map_err(|e| Error::io(&path, e))
}

/// Checks every file a checkpoint's manifest lists against its size and checksum.
pub fn verify_checkpoint(dir: &Path) -> Result<u64> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::Weights { path: path.clone(), message: format!("not a checkpoint manifest: {e}") })?;
    for (name, want) in &manifest.files {
        let file = dir.join(name);
        let got = file_sum(&file)?;
        if got != *want {
            return Err(Error::Weights {
                path: file,
                message: format!(
                    "does not match the checkpoint's manifest: {} bytes with CRC-32 {}, expected {} bytes with CRC-32 {} (truncated or altered)",
                    got.bytes, got.crc32, want.bytes, want.crc32
                ),
            });
        }
    }
    Ok(manifest.step)
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    /// Optimizer steps taken when the checkpoint was written.
    step: u64,
    /// Parameters in the table (a check that the checkpoint belongs to this model).
    params: usize,
    /// fp16 runs: the dynamic loss scale, so a resumed run continues with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<LossScaleState>,
}

/// fp16's dynamic loss scale: the scale, and the good steps counted towards its next growth.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    pub scale: f32,
    pub good_steps: u32,
}

/// The loss scale a training checkpoint recorded (fp16 runs), if any.
pub fn checkpoint_loss_scale(dir: &Path) -> Option<LossScaleState> {
    let text = std::fs::read_to_string(dir.join(STATE)).ok()?;
    serde_json::from_str::<TrainerState>(&text).ok()?.loss_scale
}

/// Whether `dir` is a committed training checkpoint (its manifest, written last, exists).
pub fn is_training_checkpoint(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file() && dir.join(STATE).is_file() && (dir.join(OPTIMIZER).is_file() || !shard_files(dir).is_empty())
}

/// The committed checkpoints of a run directory (`RUN_DIR/checkpoints/step_*` with a manifest),
/// oldest first. Their files are not checked here (`verify_checkpoint` does that).
pub fn committed_checkpoints(run_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all: Vec<std::path::PathBuf> = std::fs::read_dir(crate::run_dir::RunDir::new(run_dir).checkpoints())
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step_")))
                .filter(|p| is_training_checkpoint(p))
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all
}

/// The newest committed checkpoint of `run_dir` past step `after` that passes its checksums,
/// and its step; a damaged one is handed to `skipped` and passed over.
pub fn newest_intact_checkpoint(run_dir: &Path, after: u64, mut skipped: impl FnMut(&Path, &Error)) -> Option<(std::path::PathBuf, u64)> {
    for ck in committed_checkpoints(run_dir).into_iter().rev() {
        if checkpoint_step(&ck).is_some_and(|s| s <= after) {
            break;
        }
        match verify_checkpoint(&ck) {
            Ok(step) => return Some((ck, step)),
            Err(e) => skipped(&ck, &e),
        }
    }
    None
}

/// The step in a checkpoint directory's name (`step_00000100` → 100).
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix("step_")?.parse().ok()
}

/// Commits a checkpoint whose files (rank shards, and rank 0's model) are complete in `tmp`:
/// writes the trainer state (with fp16's loss scale, if any) and the manifest, then renames `tmp`
/// to `dir`.
pub fn commit_checkpoint(tmp: &Path, dir: &Path, step: u64, params: usize, loss_scale: Option<LossScaleState>) -> Result<()> {
    let r = (|| {
        let state = serde_json::to_string_pretty(&TrainerState { step, params, loss_scale }).expect("serialises");
        std::fs::write(tmp.join(STATE), state).map_err(|e| Error::io(tmp.join(STATE), e))?;
        seal(tmp, dir, step)
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(tmp);
    }
    r
}

/// The parameters a checkpoint holds: its Hugging Face weights, or (ZeRO-3) its rank shards.
pub fn load_checkpoint_params(dir: &Path, config: &ModelConfig, table: &ParamTable) -> Result<Vec<f32>> {
    let mut params = vec![0.0f32; table.len()];
    if super::hf::has_weights(dir) {
        load_weights(dir, config, table, &mut params)?;
    } else {
        params = read_rank_shards(dir, table.len())?
            .params
            .ok_or_else(|| Error::Weights { path: dir.into(), message: "neither model weights nor parameter shards".into() })?;
    }
    Ok(params)
}

/// The state a checkpoint holds, each in the table's full layout.
pub struct TrainingState<'a> {
    pub params: &'a [f32],
    pub m: &'a [f32],
    pub v: &'a [f32],
    pub step: u64,
    /// fp16 runs on a GPU: the loss scale at this step.
    pub loss_scale: Option<LossScaleState>,
}

/// Writes parameters, moments and step to `dir` (replacing any earlier one) atomically: all
/// files go to a temporary directory, the manifest last, then it is renamed into place. A failed
/// write (a full disk) leaves no partial checkpoint behind and the earlier ones untouched.
pub fn save_training_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    table: &ParamTable,
    state: TrainingState<'_>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let tmp = partial_dir(dir);
    let r = write_checkpoint(dir, &tmp, config, table, state, tokenizer);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

fn write_checkpoint(
    dir: &Path,
    tmp: &Path,
    config: &ModelConfig,
    table: &ParamTable,
    state: TrainingState<'_>,
    tokenizer: Option<&Path>,
) -> Result<()> {
    let (step, loss_scale) = (state.step, state.loss_scale);
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    }
    save_hf_dir(tmp, config, table, state.params, tokenizer)?;
    let shape = vec![table.len()];
    let mut views = BTreeMap::new();
    for (key, data) in [("exp_avg", state.m), ("exp_avg_sq", state.v)] {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        views.insert(key.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytes).expect("length matches the table"));
    }
    let opt = tmp.join(OPTIMIZER);
    super::hf::write_safetensors(views, HashMap::new(), &opt)?;
    let state = serde_json::to_string_pretty(&TrainerState { step, params: table.len(), loss_scale }).expect("serialises");
    std::fs::write(tmp.join(STATE), state).map_err(|e| Error::io(tmp.join(STATE), e))?;
    seal(tmp, dir, step)
}

/// Loads a training checkpoint into `buffers` (the moments of `buffers.shard` only, so a checkpoint
/// loads under any ZeRO sharding); returns the step it was written at.
pub fn load_training_checkpoint(dir: &Path, config: &ModelConfig, table: &ParamTable, buffers: &mut ParamBuffers) -> Result<u64> {
    verify_checkpoint(dir)?;
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::Weights { path: state_path.clone(), message: format!("not a trainer state: {e}") })?;
    if state.params != table.len() {
        return Err(Error::Weights {
            path: state_path,
            message: format!("written for a model of {} parameters; this one has {}", state.params, table.len()),
        });
    }
    // Same count is not the same model: heads, norms and positions change the numbers but not
    // the count (and a ZeRO-3 checkpoint's flat shards would load into any model of that count).
    let written = ModelConfig::from_dir(dir)?;
    if !written.same_network(config) {
        let brief = |c: &ModelConfig| {
            format!(
                "{:?} with {} layers, hidden {}, {} heads ({} key/value), head dim {}, MLP {}, vocab {}, {} positions, norm eps {}, rope theta {}",
                c.arch, c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim, c.intermediate, c.vocab, c.max_positions, c.norm_eps, c.rope_theta
            )
        };
        return Err(Error::Weights {
            path: dir.join("config.json"),
            message: format!("written for another model: {}; this run's model is {}", brief(&written), brief(config)),
        });
    }
    if !shard_files(dir).is_empty() {
        // A sharded checkpoint: assemble the full buffers, keep this rank's pieces.
        let super::sharded::Assembled { params, m, v } = read_rank_shards(dir, table.len())?;
        buffers.params = match params {
            Some(p) => p,
            None => load_checkpoint_params(dir, config, table)?,
        };
        let mut at = 0;
        for piece in buffers.pieces.clone() {
            buffers.m[at..at + piece.len()].copy_from_slice(&m[piece.clone()]);
            buffers.v[at..at + piece.len()].copy_from_slice(&v[piece.clone()]);
            at += piece.len();
        }
        return Ok(state.step);
    }
    load_weights(dir, config, table, &mut buffers.params)?;
    let pieces = buffers.pieces.clone();
    let opt = dir.join(OPTIMIZER);
    let bytes = std::fs::read(&opt).map_err(|e| Error::io(&opt, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights { path: opt.clone(), message: e.to_string() })?;
    for (key, out) in [("exp_avg", &mut buffers.m), ("exp_avg_sq", &mut buffers.v)] {
        let t = st.tensor(key).map_err(|e| Error::Weights { path: opt.clone(), message: format!("{key}: {e}") })?;
        if t.dtype() != Dtype::F32 || t.shape() != [table.len()] {
            return Err(Error::Weights {
                path: opt.clone(),
                message: format!("{key} is {:?} {:?}, expected F32 [{}]", t.dtype(), t.shape(), table.len()),
            });
        }
        let data = t.data();
        let mut at = 0;
        for piece in &pieces {
            let bytes = &data[piece.start * 4..piece.end * 4];
            for (o, c) in out[at..at + piece.len()].iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            at += piece.len();
        }
    }
    Ok(state.step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Model, ModelConfig};

    /// The fp16 loss scale goes into the trainer state and comes back; a checkpoint without one
    /// (any non-fp16 run, or one written before the field existed) reads as none and loads.
    #[test]
    fn the_loss_scale_round_trips_and_is_optional() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":11,"n_embd":8,"n_layer":1,"n_head":2,"n_positions":8}"#,
            Path::new("config.json"),
        )
        .unwrap();
        let model = Model::new(cfg).unwrap();
        let n = model.table.len();
        let (p, m, v) = (vec![0.5f32; n], vec![0.25f32; n], vec![0.125f32; n]);
        let dir = tempfile::tempdir().unwrap();
        let scale = LossScaleState { scale: 8192.0, good_steps: 17 };
        for (name, ls) in [("with", Some(scale)), ("without", None)] {
            let ck = dir.path().join(name);
            let state = TrainingState { params: &p, m: &m, v: &v, step: 5, loss_scale: ls };
            save_training_checkpoint(&ck, &model.config, &model.table, state, None).unwrap();
            assert_eq!(checkpoint_loss_scale(&ck), ls);
            let mut buf = crate::params::ParamBuffers::zeros(&model.table);
            assert_eq!(load_training_checkpoint(&ck, &model.config, &model.table, &mut buf).unwrap(), 5);
            assert_eq!((buf.m[0], buf.v[n - 1]), (0.25, 0.125));
        }
        let legacy: TrainerState = serde_json::from_str(r#"{"step": 3, "params": 10}"#).unwrap();
        assert_eq!(legacy.loss_scale, None);
    }

    fn gpt2(heads: usize) -> Model {
        let json =
            format!(r#"{{"architectures":["GPT2LMHeadModel"],"vocab_size":11,"n_embd":8,"n_layer":1,"n_head":{heads},"n_positions":8}}"#);
        Model::new(ModelConfig::from_json(&json, Path::new("config.json")).unwrap()).unwrap()
    }

    /// A checkpoint of another model with the same parameter count (here: other heads) is
    /// refused by name, not loaded into the wrong shapes.
    #[test]
    fn a_checkpoint_of_another_model_of_the_same_size_is_refused() {
        let (two, four) = (gpt2(2), gpt2(4));
        assert_eq!(two.table.len(), four.table.len());
        let n = two.table.len();
        let z = vec![0.0f32; n];
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step_1");
        let state = TrainingState { params: &z, m: &z, v: &z, step: 1, loss_scale: None };
        save_training_checkpoint(&ck, &two.config, &two.table, state, None).unwrap();
        let mut buf = crate::params::ParamBuffers::zeros(&four.table);
        let err = load_training_checkpoint(&ck, &four.config, &four.table, &mut buf).unwrap_err().to_string();
        assert!(err.contains("written for another model"), "{err}");
        let mut buf = crate::params::ParamBuffers::zeros(&two.table);
        assert_eq!(load_training_checkpoint(&ck, &two.config, &two.table, &mut buf).unwrap(), 1);
    }

    /// A step reached again replaces its checkpoint: the new one is in place, the old one gone,
    /// nothing left beside them.
    #[test]
    fn a_checkpoint_written_again_replaces_the_old_one() {
        let m = gpt2(2);
        let n = m.table.len();
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step_1");
        for value in [0.5f32, 0.75] {
            let p = vec![value; n];
            let state = TrainingState { params: &p, m: &p, v: &p, step: 1, loss_scale: None };
            save_training_checkpoint(&ck, &m.config, &m.table, state, None).unwrap();
        }
        let mut buf = crate::params::ParamBuffers::zeros(&m.table);
        load_training_checkpoint(&ck, &m.config, &m.table, &mut buf).unwrap();
        assert_eq!(buf.m[0], 0.75, "the second write is the checkpoint");
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(names, ["step_1"]);
    }
}
