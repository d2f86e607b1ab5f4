//! `gantry bench`: full training steps (forward, backward, clipping, AdamW) on random tokens.

use std::time::Instant;

use serde::Serialize;

use crate::models::Model;
use crate::optim::{clip_grad_norm, AdamW};
use crate::params::ParamBuffers;
use crate::rng::Rng;
use crate::Result;

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub params: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub threads: usize,
    /// Tokens per second of the median step.
    pub tokens_per_s: f64,
    pub step_ms: f64,
    pub step_ms_min: f64,
    /// Median milliseconds in forward+backward and in the optimizer (clip + AdamW).
    pub fwd_bwd_ms: f64,
    pub optim_ms: f64,
    pub model_flops_per_s: f64,
    pub mem_bytes: u64,
    pub loss_first: f64,
    pub loss_last: f64,
    /// Where it ran (`cpu`, or `cuda:N` with the GPU's name).
    pub device: String,
    /// `fp32`, `bf16` or `fp16`.
    pub precision: String,
    /// GPU runs: model FLOPs per second over the device's dense peak at this precision, and the
    /// device memory in use at the end of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mem_bytes: Option<u64>,
}

/// The optimizer of every `gantry bench` run, CPU or GPU (the PyTorch peers' settings).
pub(crate) const BENCH_OPTIM: AdamW = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
/// The random-number stream the benchmarks draw their tokens from.
pub(crate) const BENCH_DATA_STREAM: u64 = 0xBE7C;

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `steps` training steps after `warmup` untimed ones; `on_step(i, ms)` sees each.
pub fn bench(
    model: &Model,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    seed: u64,
    mut on_step: impl FnMut(usize, f64),
) -> Result<BenchResult> {
    let mut buf = ParamBuffers::zeros(&model.table);
    model.table.init(&mut buf.params, seed);
    let mut acts = model.activations(batch, seq)?;
    let optim = BENCH_OPTIM;
    let mut rng = Rng::new(seed, BENCH_DATA_STREAM);
    let vocab = model.config.vocab as u64;
    let tokens = batch * seq;
    let (mut times, mut fb, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut first, mut last) = (0.0, 0.0);
    let mut windows = vec![0u32; batch * (seq + 1)];
    for i in 0..warmup + steps.max(1) {
        windows.iter_mut().for_each(|t| *t = rng.below(vocab) as u32);
        let t0 = Instant::now();
        gantry_kernels::cpu::vec::zero(&mut buf.grads);
        let loss = model.forward_backward(&buf.params, &mut buf.grads, &mut acts, &windows, 1.0 / tokens as f32)? / tokens as f64;
        let t1 = Instant::now();
        clip_grad_norm(&mut buf.grads, 1.0);
        optim.step(&model.table, &mut buf, 3e-4, i as u32 + 1);
        let t2 = Instant::now();
        let ms = (t2 - t0).as_secs_f64() * 1e3;
        on_step(i, ms);
        if i == 0 {
            first = loss;
        }
        last = loss;
        if i >= warmup {
            times.push(ms);
            fb.push((t1 - t0).as_secs_f64() * 1e3);
            opt.push((t2 - t1).as_secs_f64() * 1e3);
        }
    }
    let step_ms = median(&mut times);
    let tokens_per_s = tokens as f64 / (step_ms / 1e3);
    Ok(BenchResult {
        params: model.table.len(),
        batch,
        seq_len: seq,
        threads: rayon::current_num_threads(),
        tokens_per_s,
        step_ms,
        step_ms_min: times[0],
        fwd_bwd_ms: median(&mut fb),
        optim_ms: median(&mut opt),
        model_flops_per_s: model.flops_per_token(seq) * tokens_per_s,
        mem_bytes: buf.bytes(),
        loss_first: first,
        loss_last: last,
        device: "cpu".into(),
        precision: "fp32".into(),
        mfu: None,
        gpu_mem_bytes: None,
    })
}
