use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

use crate::models::{Arch, ModelConfig};
use crate::params::ParamTable;
use crate::{Error, Result};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Whether `dir` holds safetensors weights.
pub fn has_weights(dir: &Path) -> bool {
    dir.join(SINGLE).is_file() || dir.join(INDEX).is_file()
}

/// Buffers that transformers keeps in some checkpoints but that are not parameters.
fn is_known_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name.ends_with("rotary_emb.inv_freq")
}

/// Writes a safetensors file whose mode follows the umask, as the run's other files do (the
/// safetensors crate writes through a temporary file, always 0600).
pub fn write_safetensors<V: safetensors::View>(
    views: impl IntoIterator<Item = (String, V)>,
    meta: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| Error::Weights { path: path.into(), message: e.to_string() })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask())).map_err(|e| Error::io(path, e))
}

/// This process's umask (read from /proc: setting it to read it would race with other threads).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok())))
        .unwrap_or(0o022)
}

/// A safetensors error by its kind (its header's own text is not quoted: see `config::kind_of`).
fn safetensors_error(e: &safetensors::SafeTensorError) -> String {
    match e {
        safetensors::SafeTensorError::JsonError(j) => format!("its header {}", crate::models::config::json_error(j)),
        safetensors::SafeTensorError::IoError(io) => io.to_string(),
        other => {
            // The other kinds name sizes and offsets, except those that carry the header's text.
            let s = other.to_string();
            if s.contains('"') || s.contains('`') {
                "its header is not a valid safetensors header".into()
            } else {
                s
            }
        }
    }
}

/// A file name with no directory part (`model-00001-of-00002.safetensors`).
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// The weight files a model directory names: `model.safetensors`, or every shard its index names
/// (checked to be files of the directory itself). Empty if it has no weights.
pub fn weight_file_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    if !has_weights(dir) {
        return Ok(Vec::new());
    }
    weight_files(dir).map(|(files, _)| files)
}

/// The files holding the weights and, for each tensor name, which file.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, HashMap<String, usize>)> {
    let index = dir.join(INDEX);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Weights { path: index.clone(), message: crate::models::config::json_error(&e) })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::Weights { path: index.clone(), message: "has no `weight_map` object".into() })?;
        let mut files: Vec<PathBuf> = Vec::new();
        let mut by_name = HashMap::new();
        for (name, file) in map {
            // A shard is a file of the model's own directory: an entry naming a path elsewhere
            // (`../`, `/etc/…`) would read whatever it names.
            let file = file.as_str().filter(|f| is_plain_file_name(f)).ok_or_else(|| Error::Weights {
                path: index.clone(),
                message: "a `weight_map` entry is not the name of a file in the model's directory".into(),
            })?;
            let path = dir.join(file);
            let i = match files.iter().position(|f| *f == path) {
                Some(i) => i,
                None => {
                    files.push(path);
                    files.len() - 1
                }
            };
            by_name.insert(name.clone(), i);
        }
        return Ok((files, by_name));
    }
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok((vec![single], HashMap::new()));
    }
    Err(Error::Weights { path: dir.to_path_buf(), message: format!("no {SINGLE} or {INDEX} here") })
}

/// Loads every parameter of `table` from the checkpoint in `dir` into `params`, converting
/// f16/bf16 to f32. Missing or misshapen tensors are errors that name them; a GPT-2 checkpoint
/// written without the `transformer.` prefix (as the original OpenAI conversion was) also loads.
pub fn load_weights(dir: &Path, config: &ModelConfig, table: &ParamTable, params: &mut [f32]) -> Result<()> {
    let (files, _) = weight_files(dir)?;
    let mut found = vec![false; table.entries().len()];
    for path in &files {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives only inside this loop iteration; a concurrent
        // writer truncating the file could fault the process, which is the documented risk of
        // every safetensors reader and the same one transformers takes.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Weights {
            path: path.clone(),
            message: format!("not a valid safetensors file: {}", safetensors_error(&e)),
        })?;
        for (name, view) in st.tensors() {
            let canonical = canonical_name(&name, config);
            let Some(i) = table.entries().iter().position(|e| e.name == canonical) else {
                let tied_head = canonical == "lm_head.weight" && config.tie_embeddings;
                if !tied_head && !is_known_buffer(&name) && !table.held_elsewhere(&canonical) {
                    // Named only when it looks like a tensor's name (see `config::kind_of`).
                    let shown = if name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "._".contains(c)) {
                        name.to_string()
                    } else {
                        "(a name that is not a tensor's)".into()
                    };
                    tracing::warn!(file = %path.display(), tensor = %shown, "tensor is not a parameter of this model; ignored");
                }
                continue;
            };
            let e = &table.entries()[i];
            if view.shape() != e.global_shape.as_slice() {
                return Err(Error::Weights {
                    path: path.clone(),
                    message: format!("tensor `{name}` has shape {:?}, the model expects {:?}", view.shape(), e.global_shape),
                });
            }
            let bad = |m: String| Error::Weights { path: path.clone(), message: format!("tensor `{name}`: {m}") };
            match &e.shard {
                // A tensor-parallel rank's part: one tensor whole at a time, then its slice.
                Some(shard) => {
                    let mut whole = vec![0.0f32; e.global_shape.iter().product()];
                    convert_into(&view, &mut whole).map_err(bad)?;
                    shard.take(&e.global_shape, &whole, e.at.get_mut(params));
                }
                None => convert_into(&view, e.at.get_mut(params)).map_err(bad)?,
            }
            found[i] = true;
        }
    }
    let missing: Vec<&str> = table.entries().iter().zip(&found).filter(|(_, f)| !**f).map(|(e, _)| e.name.as_str()).collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        let more = if missing.len() > 5 { format!(" and {} more", missing.len() - 5) } else { String::new() };
        return Err(Error::Weights { path: dir.to_path_buf(), message: format!("missing {} tensors: {shown}{more}", missing.len()) });
    }
    Ok(())
}

fn canonical_name(name: &str, config: &ModelConfig) -> String {
    if config.arch == Arch::Gpt2 && !name.starts_with("transformer.") && name != "lm_head.weight" {
        return format!("transformer.{name}");
    }
    name.to_string()
}

fn convert_into(view: &TensorView<'_>, out: &mut [f32]) -> std::result::Result<(), String> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        other => return Err(format!("dtype {other:?} is not supported (f32, f16, bf16)")),
    }
    Ok(())
}

/// Writes a Hugging Face directory: `config.json` (the original config, marked float32),
/// `model.safetensors` with every parameter under its Hugging Face name, and `tokenizer.json` when
/// given. Files are written under temporary names and renamed, so a reader never sees half a model.
pub fn save_hf_dir(dir: &Path, config: &ModelConfig, table: &ParamTable, params: &[f32], tokenizer: Option<&Path>) -> Result<()> {
    save_hf_dir_sharded(dir, config, table, params, tokenizer, u64::MAX)
}

/// The file in a run's `final/` that says after how many steps it was written: a run continued
/// with `--resume` writes newer checkpoints, and a `final/` older than them is not the newest
/// model (transformers ignores the file).
pub const FINAL_STEP_FILE: &str = "gantry_step.json";

/// Records in the model directory `dir` that it holds the parameters after `step` steps.
pub fn write_final_step(dir: &Path, step: u64) -> Result<()> {
    write_replacing(&dir.join(FINAL_STEP_FILE), serde_json::json!({ "step": step }).to_string().as_bytes())
}

/// The step `write_final_step` recorded in `dir`, if any (a model directory from elsewhere, or a
/// run of an earlier version, has none).
pub fn final_step(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(FINAL_STEP_FILE)).ok()?;
    serde_json::from_str::<Value>(&text).ok()?.get("step")?.as_u64()
}

/// Writes a model directory's `config.json` (the original config, marked float32, with
/// `model_type` filled in when missing).
pub fn save_hf_config(dir: &Path, config: &ModelConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut cfg = config.raw.clone();
    cfg.insert("dtype".into(), Value::String("float32".into()));
    cfg.remove("torch_dtype");
    // transformers finds the model class by `model_type`; configs written by hand may lack it.
    if !cfg.contains_key("model_type") {
        let t = match config.arch {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        };
        cfg.insert("model_type".into(), Value::String(t.into()));
    }
    let cfg_text = serde_json::to_string_pretty(&Value::Object(cfg)).expect("a JSON map serialises");
    write_replacing(&dir.join("config.json"), cfg_text.as_bytes())?;

    Ok(())
}

/// As `save_hf_dir`, splitting the weights into `model-0000i-of-0000n.safetensors` files of at
/// most `max_shard_bytes` each (a tensor is never split) with a `model.safetensors.index.json`,
/// as `save_pretrained` does, when they do not fit in one.
pub fn save_hf_dir_sharded(
    dir: &Path,
    config: &ModelConfig,
    table: &ParamTable,
    params: &[f32],
    tokenizer: Option<&Path>,
    max_shard_bytes: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    save_hf_config(dir, config)?;
    // Group tensors, in table order, into shards of at most `max_shard_bytes`.
    let mut shards: Vec<Vec<&crate::params::ParamEntry>> = vec![Vec::new()];
    let mut size = 0u64;
    for e in table.entries() {
        let bytes = 4 * e.at.len as u64;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(e);
        size += bytes;
    }
    let n = shards.len();
    let name = |i: usize| if n == 1 { SINGLE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let views: BTreeMap<String, TensorView<'_>> = shard
            .iter()
            .map(|e| {
                let bytes: &[u8] = bytemuck::cast_slice(e.at.get(params));
                let view = TensorView::new(Dtype::F32, e.shape.clone(), bytes).expect("shape and byte length agree by construction");
                weight_map.insert(e.name.clone(), Value::String(name(i)));
                (e.name.clone(), view)
            })
            .collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let path = dir.join(name(i));
        let tmp = dir.join(format!(".{}.tmp", name(i)));
        write_safetensors(views, meta, &tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    // Shards of an earlier, differently split write would sit beside these and be counted.
    let written: std::collections::HashSet<String> = (0..n).map(name).collect();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let f = entry.file_name().to_string_lossy().into_owned();
        if f.starts_with("model-") && f.ends_with(".safetensors") && !written.contains(&f) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    if n > 1 {
        let total: u64 = table.entries().iter().map(|e| 4 * e.at.len as u64).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_replacing(&dir.join(INDEX), serde_json::to_string_pretty(&index).expect("serialises").as_bytes())?;
        // A single-file model left from an earlier write would shadow nothing but confuse readers.
        let _ = std::fs::remove_file(dir.join(SINGLE));
    } else {
        let _ = std::fs::remove_file(dir.join(INDEX));
    }
    if let Some(tok) = tokenizer {
        let bytes = std::fs::read(tok).map_err(|e| Error::io(tok, e))?;
        write_replacing(&dir.join("tokenizer.json"), &bytes)?;
    }
    Ok(())
}

/// Replaces `path` with `bytes` so that a failure (a full disk) or a crash leaves the old file
/// whole, never a truncated one: written beside it, synced (a power loss cannot leave an empty
/// file under the name), then renamed over it.
pub fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    write_replacing_with(path, |w| w.write_all(bytes))
}

/// As `write_replacing`, with the contents streamed by `write` (through a buffer).
pub fn write_replacing_with(path: &Path, write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = (|| {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The weights follow the umask like the rest of a run (they were always 0600).
    #[test]
    fn safetensors_files_follow_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model.safetensors");
        let data = [0u8; 8];
        let views = [("w".to_string(), TensorView::new(Dtype::F32, vec![2], &data).unwrap())];
        write_safetensors(views, HashMap::new(), &p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask(), "{mode:o}");
        let plain = d.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert_eq!(std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777, mode, "as a file made with the umask");
    }

    /// An index naming a shard outside the model's directory is refused, not read.
    #[test]
    fn an_index_may_name_only_files_of_its_own_directory() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["../secret", "/etc/passwd", "a/../../b", ".."] {
            std::fs::write(d.path().join(INDEX), serde_json::json!({"weight_map": {"w": bad}}).to_string()).unwrap();
            let err = weight_file_paths(d.path()).unwrap_err().to_string();
            assert!(
                err.contains("not the name of a file in the model's directory") && !err.contains(bad.trim_start_matches('/')),
                "{bad}: {err}"
            );
        }
        std::fs::write(d.path().join(INDEX), serde_json::json!({"weight_map": {"w": "model-1.safetensors"}}).to_string()).unwrap();
        assert_eq!(weight_file_paths(d.path()).unwrap(), [d.path().join("model-1.safetensors")]);
    }

    #[test]
    fn a_replaced_file_is_whole_or_untouched() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("spec.toml");
        write_replacing(&p, b"one").unwrap();
        write_replacing(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        // A directory in the way of the temporary file: the write fails and the file is untouched.
        std::fs::create_dir(d.path().join(".spec.toml.tmp")).unwrap();
        assert!(write_replacing(&p, b"three").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }
}
