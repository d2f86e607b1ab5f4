use gantry_engine::models::{presets::config_for, Model};
use gantry_engine::train::bench;
use serde_json::json;

use gantry_engine::config::{Precision, SpMode};
use gantry_engine::train::BenchLayout;

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
    let sp_mode = match a.sp_mode.as_str() {
        "none" if a.sp == 1 => SpMode::None,
        "split_gather" if a.sp == 1 && a.tp > 1 => SpMode::SplitGather,
        "split_gather" => anyhow::bail!("--sp-mode split_gather splits the sequence inside the tp group: it needs --tp > 1 and --sp 1"),
        "all_to_all" if a.sp > 1 => SpMode::AllToAll,
        "ring_attn" if a.sp > 1 => SpMode::RingAttn,
        "none" => anyhow::bail!("--sp {} needs a way to split the sequence: --sp-mode all_to_all or ring_attn", a.sp),
        "all_to_all" | "ring_attn" => anyhow::bail!("--sp-mode {} splits the sequence over --sp ranks: it needs --sp > 1", a.sp_mode),
        m => anyhow::bail!("--sp-mode {m:?}: expected none, split_gather, all_to_all or ring_attn"),
    };
    if a.tp == 0 || a.sp == 0 {
        anyhow::bail!("--tp and --sp must be at least 1");
    }
    let threads = super::set_threads(a.threads)?;
    let config = config_for(&name)?;
    if a.pp > 1 {
        if gpu.is_some() || a.tp > 1 || a.sp > 1 {
            anyhow::bail!("--pp {}: the pipeline bench runs CPU stages alone (no --device cuda:N, --tp or --sp yet)", a.pp);
        }
        return bench_pipeline(config, &name, &a, batch, seq_len, threads);
    }
    if a.tp > 1 || a.sp > 1 {
        if gpu.is_some() {
            anyhow::bail!("--tp {} --sp {}: tensor and sequence parallelism on GPUs are not built yet (use --device cpu)", a.tp, a.sp);
        }
        return bench_tensor_parallel(config, &name, &a, sp_mode, batch, seq_len, threads);
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
    sp_mode: SpMode,
    batch: usize,
    seq_len: usize,
    threads: usize,
) -> anyhow::Result<()> {
    eprintln!(
        "bench {name}: tp = {}, sp = {} (sp_mode {}), batch {batch} × seq {seq_len}, {threads} threads shared by the ranks",
        a.tp, a.sp, a.sp_mode
    );
    let parts = match sp_mode {
        SpMode::SplitGather => a.tp,
        SpMode::RingAttn => 2 * a.sp,
        _ => a.sp,
    };
    if !seq_len.is_multiple_of(parts) {
        anyhow::bail!("--sp-mode {} cuts each sequence into {parts} equal parts: --seq-len {seq_len} does not divide", a.sp_mode);
    }
    let layout = BenchLayout { tp: a.tp, sp: a.sp, sp_mode };
    let warmup = a.warmup;
    // Not on the pool: the ranks are threads of their own that share it (a pool thread waiting
    // for them would leave a one-thread pool with none to run their kernels).
    let r = gantry_engine::train::bench_tensor_parallel(&config, layout, batch, seq_len, a.warmup, a.steps, a.seed, move |i, ms| {
        let tag = if i < warmup { " (warmup)" } else { "" };
        eprintln!("step {:>3}: {ms:>9.1} ms{tag}", i + 1);
    })?;
    eprintln!(
        "tp = {}, sp = {}: {:.1}% of the step in the groups' collectives; a rank holds {:.3}× of one device's model state and {:.3}× of its activations",
        r.tp,
        r.sp,
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

/// `--pp N`: the model's blocks cut into N stages run by the pipeline runner, with the measured
/// bubble beside the schedule's ideal.
fn bench_pipeline(
    config: gantry_engine::models::ModelConfig,
    name: &str,
    a: &BenchArgs,
    batch: usize,
    seq_len: usize,
    threads: usize,
) -> anyhow::Result<()> {
    use gantry_engine::pipeline::{bench_pipeline, PipelineBenchSpec, ScheduleKind};
    let kind = ScheduleKind::parse(&a.pp_schedule)?;
    let chunks = a.pp_chunks.unwrap_or(match kind {
        ScheduleKind::Interleaved | ScheduleKind::Zbv => 2,
        _ => 1,
    });
    let micro_batches = a.micro_batches.unwrap_or(2 * a.pp);
    eprintln!(
        "bench {name}: pp = {} ({}, {chunks} chunk(s) per rank), {micro_batches} micro-batches of {batch} × seq {seq_len}, {threads} threads shared by the stages",
        a.pp, a.pp_schedule
    );
    let spec = PipelineBenchSpec {
        pp: a.pp,
        kind,
        chunks,
        micro_batches,
        batch,
        seq: seq_len,
        threads,
        warmup: a.warmup,
        steps: a.steps,
        seed: a.seed,
    };
    let r = bench_pipeline(&config, spec)?;
    eprintln!(
        "{} at pp = {}, m = {micro_batches}: bubble {:.3} measured, {:.3} in theory; stages idle {:?}",
        r.pp_schedule, r.pp, r.bubble_fraction, r.bubble_theory, r.stage_idle
    );
    let mut out = serde_json::to_value(&r)?;
    out["model"] = json!(name);
    out["peak_rss_bytes"] = json!(super::peak_rss_bytes());
    println!("{out}");
    Ok(())
}
