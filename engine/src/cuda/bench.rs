//! `gantry bench --device cuda:N`: full training steps (forward, backward, clipping, AdamW) on
//! random tokens on one GPU, timed after the device has finished each step.

use std::time::Instant;

use crate::config::Precision;
use gantry_kernels::cuda::Gpu;

use super::{gpu_trainer, StartState};
use crate::models::Model;
use crate::rng::Rng;
use crate::train::bench::{median, BENCH_DATA_STREAM, BENCH_OPTIM};
use crate::train::BenchResult;
use crate::Result;

/// Dense peak FLOP/s of `gpu_name` at `precision` (NVIDIA's data-sheet figures, without
/// sparsity), when the GPU is one we know.
pub fn peak_flops(gpu_name: &str, precision: Precision) -> Option<f64> {
    let name = gpu_name.to_ascii_uppercase();
    // (name fragment, fp32 via TF32 tensor cores, bf16/fp16), the specific variants first.
    let table: &[(&str, f64, f64)] = &[
        ("H100 PCIE", 378e12, 756e12),
        ("H100 NVL", 417.5e12, 835e12),
        ("H200", 494.7e12, 989.4e12),
        ("H100", 494.7e12, 989.4e12),
        ("A100", 156e12, 312e12),
    ];
    table.iter().find(|(k, _, _)| name.contains(k)).map(|(_, tf32, half)| if precision == Precision::Fp32 { *tf32 } else { *half })
}

/// Times `steps` training steps after `warmup` untimed ones on GPU `ordinal`.
#[allow(clippy::too_many_arguments)]
pub fn bench_gpu(
    model: &Model,
    ordinal: usize,
    precision: Precision,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    mut on_step: impl FnMut(usize, f64),
) -> Result<BenchResult> {
    let gpu = Gpu::open(ordinal)?;
    let name = gpu.context().name().unwrap_or_else(|_| "unknown GPU".into());
    let ctx = gpu.context().clone();
    let mut params = vec![0.0f32; model.table.len()];
    model.table.init(&mut params, seed);
    let mut t = gpu_trainer(precision, gpu, model, StartState::fresh(&params), batch, seq, BENCH_OPTIM)?;
    drop(params);
    let mut rng = Rng::new(seed, BENCH_DATA_STREAM);
    let vocab = model.config.vocab as u64;
    let tokens = batch * seq;
    let mut times = Vec::new();
    let (mut first, mut last) = (0.0, 0.0);
    let mut windows = vec![0u32; batch * (seq + 1)];
    for i in 0..warmup + steps.max(1) {
        windows.iter_mut().for_each(|t| *t = rng.below(vocab) as u32);
        let t0 = Instant::now();
        let r = t.step(&[&windows], 3e-4, 1.0, i as u32 + 1, None)?;
        t.synchronize()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        on_step(i, ms);
        if i == 0 {
            first = r.loss;
        }
        last = r.loss;
        if i >= warmup {
            times.push(ms);
        }
    }
    let step_ms = median(&mut times);
    let tokens_per_s = tokens as f64 / (step_ms / 1e3);
    let flops = model.flops_per_token(seq) * tokens_per_s;
    let (free, total) = ctx.mem_get_info().unwrap_or((0, 0));
    let tag = precision.name();
    Ok(BenchResult {
        params: model.table.len(),
        batch,
        seq_len: seq,
        threads: 0,
        tokens_per_s,
        step_ms,
        step_ms_min: times.iter().cloned().fold(f64::INFINITY, f64::min),
        fwd_bwd_ms: 0.0,
        optim_ms: 0.0,
        model_flops_per_s: flops,
        mem_bytes: t.state_bytes(),
        loss_first: first,
        loss_last: last,
        device: format!("cuda:{ordinal} ({name})"),
        precision: tag.into(),
        mfu: peak_flops(&name, precision).map(|p| flops / p),
        gpu_mem_bytes: Some((total - free) as u64),
    })
}
