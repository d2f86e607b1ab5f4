//! `gantry bench checkpoint`: how fast asynchronous checkpoints are written, against the disk's
//! own sequential write speed measured in the same run, and how much they stall training.
//!
//! The stall has two parts: the time the training loop itself spends on a save (the host copy of
//! parameters and optimizer state), and the slowdown of the steps that run while the writer
//! thread shares the machine. Both are reported as fractions of the median step without a save.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use gantry_api::JobSpec;
use gantry_engine::models::presets::config_for;
use gantry_engine::train::Trainer;
use serde_json::json;

use crate::cli::CheckpointBenchArgs;

pub fn run(a: CheckpointBenchArgs) -> anyhow::Result<()> {
    let threads = super::set_threads(a.threads)?;
    let tmp = tempfile::tempdir_in(a.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let work = tmp.path();
    // The model's config as a directory, and random tokens as data.
    let config = config_for(&a.model)?;
    let model_dir = work.join("model");
    std::fs::create_dir_all(&model_dir)?;
    std::fs::write(model_dir.join("config.json"), serde_json::to_string_pretty(&config.raw)?)?;
    let tokens = work.join("tokens.u32");
    let n = (a.batch * (a.seq_len + 1) * 64).max(1 << 16);
    let mut s = 0x9e37_79b9u64;
    let data: Vec<u8> = (0..n)
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s % config.vocab as u64) as u32).to_le_bytes()
        })
        .collect();
    std::fs::write(&tokens, data)?;
    let spec = JobSpec::from_toml(
        &format!(
            // `checkpoint.every` as training sets it: the trainer then keeps its host copy of the
            // state between saves, so no save pays for allocating it.
            "[model]\npath = {:?}\ninit = \"random\"\n[data]\ntrain = {:?}\nseq_len = {}\n[train]\nsteps = {}\nglobal_batch_size = {}\n\
             [checkpoint]\nevery = {}\n",
            model_dir, tokens, a.seq_len, a.steps, a.batch, a.every
        ),
        &[],
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut trainer = Trainer::new(crate::engine_config::train_config(&spec))?;
    let state_bytes = 12 * trainer.model.table.len() as u64;
    eprintln!(
        "bench checkpoint {}: {} parameters ({:.2} GB of weights and optimizer state), {threads} threads",
        a.model,
        trainer.model.table.len(),
        state_bytes as f64 / 1e9
    );

    let disk = disk_speed(work, state_bytes)?;
    eprintln!("disk: sequential write with fsync {:.2} GB/s", disk / 1e9);

    let mut plain = Vec::new();
    let mut overlapped = Vec::new();
    let mut stalls = Vec::new();
    let mut writes = Vec::new();
    let mut writing = false;
    while trainer.step < a.steps {
        let t = Instant::now();
        let was_writing = writing;
        super::on_pool(|| trainer.train_step())?;
        let step_secs = t.elapsed().as_secs_f64();
        if let Some(o) = trainer.poll_checkpoint()? {
            o.result.with_context(|| format!("checkpoint of step {}", o.step))?;
            writes.push((o.bytes, o.write_secs));
            writing = false;
        }
        let step = trainer.step;
        if trainer.step > 1 {
            (if was_writing { &mut overlapped } else { &mut plain }).push(step_secs);
        }
        eprintln!("step {step:>3}: {:8.1} ms{}", step_secs * 1e3, if was_writing { " (a checkpoint was being written)" } else { "" });
        if step % a.every == 0 && step < a.steps {
            let t = Instant::now();
            if let Some(o) = trainer.start_checkpoint(&work.join(format!("ckpt_{step}")))? {
                o.result?;
                writes.push((o.bytes, o.write_secs));
            }
            stalls.push(t.elapsed().as_secs_f64());
            writing = true;
        }
    }
    if let Some(o) = trainer.finish_checkpoint()? {
        o.result?;
        writes.push((o.bytes, o.write_secs));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let step = median(&mut plain);
    let stall = median(&mut stalls);
    let slow = median(&mut overlapped) - step;
    let throughput: f64 = writes.iter().map(|(b, _)| *b as f64).sum::<f64>() / writes.iter().map(|(_, s)| s).sum::<f64>();
    eprintln!(
        "checkpoints: {} written at {:.2} GB/s = {:.0}% of the disk; stall {:.1} ms = {:.1}% of a {:.0} ms step; steps during a write {:+.1}%",
        writes.len(),
        throughput / 1e9,
        100.0 * throughput / disk,
        stall * 1e3,
        100.0 * stall / step,
        step * 1e3,
        100.0 * slow / step
    );
    println!(
        "{}",
        json!({
            "model": a.model,
            "state_bytes": state_bytes,
            "disk_write_bytes_per_s": disk,
            "checkpoint_write_bytes_per_s": throughput,
            "write_fraction_of_disk": throughput / disk,
            "step_ms": step * 1e3,
            "stall_ms": stall * 1e3,
            "stall_fraction_of_step": stall / step,
            "overlapped_step_slowdown": slow / step,
            "checkpoints": writes.len(),
        })
    );
    Ok(())
}

/// Sequential write speed of the disk under `dir`: `bytes` in 8 MiB blocks, then fsync.
fn disk_speed(dir: &std::path::Path, bytes: u64) -> anyhow::Result<f64> {
    let path = dir.join("disk-test.bin");
    let block = vec![0x5au8; 8 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut written = 0u64;
    while written < bytes {
        f.write_all(&block)?;
        written += block.len() as u64;
    }
    f.sync_all()?;
    let speed = written as f64 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(speed)
}
