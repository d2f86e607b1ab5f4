//! `gantry export SOURCE --out DIR`: a Hugging Face directory (config.json, safetensors sharded
//! above a size with an index, the tokenizer if the source has one) from a run, a checkpoint or a
//! model directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gantry_engine::checkpoint::{
    final_step, is_training_checkpoint, load_checkpoint_params, newest_intact_checkpoint, save_hf_dir_sharded, verify_checkpoint,
};
use gantry_engine::config::ModelInit;
use gantry_engine::models::{Model, ModelConfig};
use gantry_engine::train::load_model;

use crate::cli::ExportArgs;

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let max = parse_size(&a.max_shard_size)?;
    let dir = model_dir(&a.source)?;
    let (model, params) = if is_training_checkpoint(&dir) {
        // A checkpoint: its weights, or (ZeRO-3) its parameter shards assembled.
        verify_checkpoint(&dir)?;
        let model = Model::new(ModelConfig::from_dir(&dir)?)?;
        let params = load_checkpoint_params(&dir, &model.config, &model.table)?;
        (model, params)
    } else {
        load_model(&dir, ModelInit::Pretrained, 0)?
    };
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    save_hf_dir_sharded(&a.out, &model.config, &model.table, &params, tokenizer.as_deref(), max)?;
    let files =
        std::fs::read_dir(&a.out)?.filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))).count();
    eprintln!("exported {} ({} parameters) to {} in {files} safetensors file(s)", dir.display(), model.table.len(), a.out.display());
    println!("{}", serde_json::json!({"source": dir, "out": a.out, "parameters": model.table.len(), "shards": files}));
    Ok(())
}

/// The directory holding the model to export: a run's `final/`, else its newest checkpoint that
/// passes its checksums; or the source itself. A `final/` older than the newest checkpoint (the
/// run was continued with `--resume` and stopped before its end) gives way to that checkpoint.
fn model_dir(source: &Path) -> anyhow::Result<PathBuf> {
    if source.join("config.json").is_file() {
        return Ok(source.to_path_buf());
    }
    let run = gantry_engine::run_dir::RunDir::new(source);
    let final_dir = run.final_model();
    let has_final = final_dir.join("config.json").is_file();
    if !has_final && !run.checkpoints().is_dir() {
        bail!("{} is neither a model directory nor a run directory", source.display());
    }
    let final_step = if has_final { final_step(&final_dir) } else { None };
    if has_final && final_step.is_none() {
        return Ok(final_dir);
    }
    let skipped = |ck: &Path, e: &gantry_engine::Error| eprintln!("warning: skipping checkpoint {}: {e}", ck.display());
    if let Some((ck, step)) = newest_intact_checkpoint(source, final_step.unwrap_or(0), skipped) {
        if let Some(done) = final_step {
            eprintln!(
                "note: {} is of step {done}, and the run went on to step {step} (continued with --resume): exporting {}",
                final_dir.display(),
                ck.display()
            );
        }
        return Ok(ck);
    }
    if has_final {
        return Ok(final_dir);
    }
    bail!("{} has no final model and no intact checkpoint", source.display())
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [("GB", 1u64 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1));
    let n: f64 = num.parse().with_context(|| format!("--max-shard-size `{s}`: expected a size like 500MB or 5GB"))?;
    if !n.is_finite() || n <= 0.0 {
        bail!("--max-shard-size must be positive");
    }
    Ok((n * mult as f64) as u64)
}
