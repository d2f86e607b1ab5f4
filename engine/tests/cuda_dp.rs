//! Data parallelism across GPU ranks (feature `cuda`): dp = 2 with ZeRO 0 and 1 against one GPU at
//! the same global batch, through the trainer (data split, gradient sums, sharded AdamW, clipping,
//! fp16 loss scaling), a ZeRO-1 checkpoint resumed exactly, and one rank over NCCL.
//!
//! The ranks are threads of this process. On the host-staged communicator (`parallel.gpu_comm =
//! "host"`) both share GPU 0, so these run on any one-GPU machine; over NCCL they need a GPU each
//! (NCCL refuses two ranks on one device) and run where the machine has two. Without a GPU each
//! test says it was skipped and passes, unless `GANTRY_REQUIRE_GPU=1`.
#![cfg(feature = "cuda")]

mod common;

use common::{example_config, gpu_count, rendezvous};

use std::time::Duration;

use gantry_engine::comm::Comm;
use gantry_engine::config::{Devices, GpuComm, ParallelPlan, Precision, TrainConfig};
use gantry_engine::train::{StepReport, Trainer};

/// The example run for `ranks` ranks, each with its GPU (set per rank by `on_ranks`), at a global
/// batch of 8.
fn spec(ranks: usize, precision: &str, zero: u8, gpu_comm: &str) -> TrainConfig {
    let mut c = example_config(10);
    c.optim.global_batch = 8;
    c.precision = match precision {
        "fp32" => Precision::Fp32,
        "bf16" => Precision::Bf16,
        _ => Precision::Fp16,
    };
    let gpu_comm = if gpu_comm == "host" { GpuComm::Host } else { GpuComm::Nccl };
    let plan = ParallelPlan { gpu_comm, ..ParallelPlan::data_parallel(ranks, zero) };
    // As a daemon worker's config: the rank's own GPU.
    c.with_plan(plan, Devices::Cuda(vec![0]), Some(2))
}

/// Runs `f` on each of `ranks` trainers (rank r on GPU `gpus[r]`), one thread each; returns each
/// rank's result.
fn on_ranks<R: Send + 'static>(spec: TrainConfig, gpus: &[u32], f: impl Fn(&mut Trainer) -> R + Send + Sync + 'static) -> Vec<R> {
    let ranks = gpus.len();
    let rv = rendezvous();
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = gpus
        .iter()
        .enumerate()
        .map(|(rank, &gpu)| {
            let (mut spec, rv, f) = (spec.clone(), rv.clone(), f.clone());
            spec.devices = Devices::Cuda(vec![gpu]);
            std::thread::spawn(move || {
                let comm = (ranks > 1).then(|| Comm::connect(rank, ranks, &rv, Duration::from_secs(120)).unwrap());
                let mut t = Trainer::with_comm(spec, comm).unwrap();
                f(&mut t)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank failed")).collect()
}

fn steps(t: &mut Trainer, n: usize) -> Vec<StepReport> {
    (0..n).map(|_| t.train_step().unwrap()).collect()
}

/// dp = 2 × ZeRO 0, 1 against one GPU, on `gpus` with `gpu_comm`.
fn two_ranks_follow_one(gpus: [u32; 2], gpu_comm: &str) {
    for (precision, tol) in [("fp32", 1e-4), ("bf16", 1e-2), ("fp16", 1e-2)] {
        let one = on_ranks(spec(1, precision, 0, gpu_comm), &[gpus[0]], |t| steps(t, 10)).remove(0);
        let mut mem = Vec::new();
        for zero in [0u8, 1] {
            let two = on_ranks(spec(2, precision, zero, gpu_comm), &gpus, |t| steps(t, 10));
            for (rank, reports) in two.iter().enumerate() {
                for (a, b) in one.iter().zip(reports) {
                    let rel = (a.loss - b.loss).abs() / a.loss;
                    assert!(
                        rel <= tol,
                        "{precision} ZeRO-{zero} rank {rank} step {}: loss {} vs one GPU {} ({rel:.2e})",
                        a.step,
                        b.loss,
                        a.loss
                    );
                    assert_eq!(a.grad_norm.is_finite(), b.grad_norm.is_finite(), "{precision} step {}: skipped differently", a.step);
                    assert!(b.grad_comm_ms > 0.0, "the gradient collectives were timed");
                }
            }
            mem.push(two[0][9].mem_bytes);
        }
        // ZeRO-1 keeps half the moments: 8 bytes per parameter less over two ranks... of 16 (f32
        // state) or 18 (16-bit working copy too).
        assert!(mem[1] < mem[0], "{precision}: ZeRO-1 holds {} bytes, ZeRO-0 {}", mem[1], mem[0]);
        let per_param = if precision == "fp32" { 16.0 } else { 18.0 };
        let ratio = mem[1] as f64 / mem[0] as f64;
        assert!((ratio - (per_param - 4.0) / per_param).abs() < 0.01, "{precision}: ZeRO-1/ZeRO-0 memory {ratio}");
        eprintln!("{precision} on {gpu_comm}: dp=2 ZeRO 0/1 within {tol} of one GPU; memory ZeRO-1/ZeRO-0 = {ratio:.3}");
    }
}

#[test]
fn two_ranks_on_host_memory_follow_one_gpu() {
    if gpu_count().is_none() {
        return;
    }
    two_ranks_follow_one([0, 0], "host");
}

#[test]
fn two_ranks_over_nccl_follow_one_gpu() {
    let Some(n) = gpu_count() else { return };
    if n < 2 {
        eprintln!("skipped: {n} GPU; NCCL ranks need a GPU each");
        return;
    }
    two_ranks_follow_one([0, 1], "nccl");
}

/// A ZeRO-1 checkpoint written by GPU ranks (each its shard of the moments) resumes exactly.
#[test]
fn a_zero1_checkpoint_of_gpu_ranks_resumes_exactly() {
    let Some(n) = gpu_count() else { return };
    let (gpus, comm) = if n >= 2 { ([0, 1], "nccl") } else { ([0, 0], "host") };
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("step_00000004");
    let c = ckpt.clone();
    let straight = on_ranks(spec(2, "fp16", 1, comm), &gpus, move |t| {
        let mut r = steps(t, 4);
        t.start_checkpoint(&c).unwrap();
        r.extend(steps(t, 6));
        let done = t.finish_checkpoint().unwrap();
        if t.dp_rank() == 0 {
            done.expect("rank 0 commits the checkpoint").result.unwrap();
        }
        r
    });
    let c = ckpt.clone();
    let resumed = on_ranks(spec(2, "fp16", 1, comm), &gpus, move |t| {
        t.resume(&c).unwrap();
        assert_eq!(t.step, 4);
        steps(t, 6)
    });
    // As the one-GPU resume test: equal but for the last bits (a fresh allocation may get another
    // cuBLASLt algorithm).
    for (a, b) in straight[0][4..].iter().zip(&resumed[0]) {
        assert_eq!(a.step, b.step);
        for (x, y, what) in [(a.loss, b.loss, "loss"), (a.grad_norm, b.grad_norm, "gradient norm")] {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "step {} after resuming: {what} {y} vs {x}", a.step);
        }
    }
}

/// The NCCL path of the GPU step on a one-GPU machine: a dp group of one over NCCL (real NCCL
/// calls on the trainer's stream, in place) gives the plain one-GPU run's losses.
#[test]
fn one_rank_over_nccl_gives_the_plain_gpu_run() {
    if gpu_count().is_none() {
        return;
    }
    let plain = on_ranks(spec(1, "bf16", 0, "nccl"), &[0], |t| steps(t, 10)).remove(0);
    let comm = Comm::connect(0, 1, &rendezvous(), Duration::from_secs(60)).unwrap();
    let mut t = Trainer::with_comm(spec(1, "bf16", 0, "nccl"), Some(comm)).unwrap();
    let grouped = steps(&mut t, 10);
    for (a, b) in plain.iter().zip(&grouped) {
        for (x, y, what) in [(a.loss, b.loss, "loss"), (a.grad_norm, b.grad_norm, "gradient norm")] {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "step {}: {what} {y} over NCCL vs {x}", a.step);
        }
        assert!(b.grad_comm_ms > 0.0, "the all-reduce was timed");
    }
}
