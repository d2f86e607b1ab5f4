use gantry_engine::models::{presets::config_for, Model};
use gantry_engine::train::bench;
use serde_json::json;

use gantry_engine::config::Precision;

use crate::cli::{BenchArgs, BenchWhat};

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.what {
        Some(BenchWhat::Comm(c)) => return super::bench_comm::run(c),
        Some(BenchWhat::Checkpoint(c)) => return super::bench_checkpoint::run(c),
        None => {}
    }
    // clap requires these without a subcommand.
    let (Some(name), Some(seq_len), Some(batch)) = (a.model.clone(), a.seq_len, a.batch) else {
        anyhow::bail!("gantry bench needs --model, --seq-len and --batch");
    };
    let precision: Precision = match a.precision.as_str() {
        "fp32" => Precision::Fp32,
        "bf16" => Precision::Bf16,
        "fp16" => Precision::Fp16,
        p => anyhow::bail!("--precision {p:?}: expected fp32, bf16 or fp16"),
    };
    let gpu = match a.device.as_str() {
        "cpu" => None,
        d => match d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => anyhow::bail!("--device {d:?}: expected cpu or cuda:N"),
        },
    };
    if gpu.is_none() && precision != Precision::Fp32 {
        anyhow::bail!("--precision {}: the CPU trains in fp32 (use --device cuda:N)", a.precision);
    }
    match a.sp_mode.as_str() {
        "none" if a.sp == 1 => {}
        "split_gather" if a.sp == 1 && a.tp > 1 => {}
        "split_gather" => anyhow::bail!("--sp-mode split_gather splits the sequence inside the tp group: it needs --tp > 1 and --sp 1"),
        "none" | "all_to_all" | "ring_attn" => {
            anyhow::bail!("--sp {} --sp-mode {}: this sequence parallelism is not in gantry bench yet", a.sp, a.sp_mode)
        }
        m => anyhow::bail!("--sp-mode {m:?}: expected none, split_gather, all_to_all or ring_attn"),
    }
    if a.tp == 0 {
        anyhow::bail!("--tp must be at least 1");
    }
    let threads = super::set_threads(a.threads)?;
    let config = config_for(&name)?;
    if a.tp > 1 {
        if gpu.is_some() {
            anyhow::bail!("--tp {}: tensor parallelism on GPUs is not built yet (use --device cpu)", a.tp);
        }
        return bench_tensor_parallel(config, &name, &a, batch, seq_len, threads);
    }
    let model = Model::new(config)?;
    if let Some(ordinal) = gpu {
        return bench_on_gpu(&model, &name, ordinal, precision, &a, batch, seq_len);
    }
    eprintln!("bench {name}: {} parameters, batch {batch} × seq {seq_len}, {threads} threads", model.table.len());
    let run = || {
        bench(&model, batch, seq_len, a.warmup, a.steps, a.seed, |i, ms| {
            let tag = if i < a.warmup { " (warmup)" } else { "" };
            eprintln!("step {:>3}: {ms:>9.1} ms{tag}", i + 1);
        })
    };
    let r = super::on_pool(run)?;
    let mut out = serde_json::to_value(&r)?;
    out["model"] = json!(name);
    out["peak_rss_bytes"] = json!(super::peak_rss_bytes());
    println!("{out}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn bench_on_gpu(
    model: &Model,
    name: &str,
    ordinal: usize,
    precision: Precision,
    a: &BenchArgs,
    batch: usize,
    seq_len: usize,
) -> anyhow::Result<()> {
    eprintln!("bench {name}: {} parameters, batch {batch} × seq {seq_len}, cuda:{ordinal}, {}", model.table.len(), a.precision);
    let r = gantry_engine::cuda::bench_gpu(model, ordinal, precision, batch, seq_len, a.warmup, a.steps, a.seed, |i, ms| {
        let tag = if i < a.warmup { " (warmup)" } else { "" };
        eprintln!("step {:>3}: {ms:>9.1} ms{tag}", i + 1);
    })?;
    let mut out = serde_json::to_value(&r)?;
    out["model"] = json!(name);
    out["peak_rss_bytes"] = json!(super::peak_rss_bytes());
    println!("{out}");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn bench_on_gpu(_: &Model, _: &str, _: usize, _: Precision, _: &BenchArgs, _: usize, _: usize) -> anyhow::Result<()> {
    Err(gantry_kernels::Error::NotBuilt.into())
}

/// `--tp N`: the model cut across N CPU ranks, with what the layout costs.
fn bench_tensor_parallel(
    config: gantry_engine::models::ModelConfig,
    name: &str,
    a: &BenchArgs,
    batch: usize,
    seq_len: usize,
    threads: usize,
) -> anyhow::Result<()> {
    let split_seq = a.sp_mode == "split_gather";
    eprintln!("bench {name}: tp = {} (sp_mode {}), batch {batch} × seq {seq_len}, {threads} threads shared by the ranks", a.tp, a.sp_mode);
    if split_seq && !seq_len.is_multiple_of(a.tp) {
        anyhow::bail!("--sp-mode split_gather cuts each sequence over the tp ranks: --seq-len {seq_len} does not divide by --tp {}", a.tp);
    }
    let warmup = a.warmup;
    // Not on the pool: the ranks are threads of their own that share it (a pool thread waiting
    // for them would leave a one-thread pool with none to run their kernels).
    let r =
        gantry_engine::train::bench_tensor_parallel(&config, a.tp, split_seq, batch, seq_len, a.warmup, a.steps, a.seed, move |i, ms| {
            let tag = if i < warmup { " (warmup)" } else { "" };
            eprintln!("step {:>3}: {ms:>9.1} ms{tag}", i + 1);
        })?;
    eprintln!(
        "tp = {}: {:.1}% of the step in the tp group's collectives; a rank holds {:.3}× of one device's model state and {:.3}× of its activations",
        r.tp,
        100.0 * r.comm_share,
        r.mem_bytes as f64 / r.whole_mem_bytes as f64,
        r.activation_bytes as f64 / r.whole_activation_bytes as f64
    );
    let mut out = serde_json::to_value(&r)?;
    out["model"] = json!(name);
    out["peak_rss_bytes"] = json!(super::peak_rss_bytes());
    println!("{out}");
    Ok(())
}
