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
    let threads = super::set_threads(a.threads)?;
    let config = config_for(&name)?;
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
