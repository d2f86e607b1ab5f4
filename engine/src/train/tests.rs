//! The trainer on CPU ranks with gradients made non-finite on purpose: the step is skipped on
//! every rank with parameters and moments untouched, and the run stops after
//! `MAX_NONFINITE_STEPS_IN_A_ROW` of them, under every ZeRO stage.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Devices, ParallelPlan, TrainConfig};

use super::{StepReport, Trainer, MAX_NONFINITE_STEPS_IN_A_ROW};
use crate::comm::Comm;
use crate::Error;

/// A tiny GPT-2 (28k parameters, several chunks once split for dp) and 2048 tokens of
/// data in `dir`.
fn write_model_and_data(dir: &Path) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":64,"n_embd":32,"n_layer":2,"n_head":2,"n_positions":16}"#,
    )
    .unwrap();
    // `.bin`: little-endian u16 tokens, a fixed scramble of the vocabulary.
    let tokens: Vec<u8> = (0..2048u32).flat_map(|i| ((((i * 31 + 7) ^ (i >> 3)) % 64) as u16).to_le_bytes()).collect();
    std::fs::write(dir.join("tokens.bin"), tokens).unwrap();
}

/// A run of the model and data in `dir` on `dp` CPU ranks under ZeRO stage `zero`: 2 sequences
/// per micro-batch, 4 per step.
fn config(dir: &Path, dp: usize, zero: u8) -> TrainConfig {
    let mut c = TrainConfig::new(dir.join("model"), dir.join("tokens.bin"));
    c.data.seq_len = 8;
    (c.optim.steps, c.optim.global_batch, c.optim.lr, c.optim.min_lr) = (50, 4, 1e-3, 1e-4);
    c.with_plan(ParallelPlan::data_parallel(dp, zero), Devices::Cpu(dp), Some(2))
}

/// The bits of this rank's parameters (the parts it updates: all of them without ZeRO, its
/// pieces under ZeRO, which under ZeRO-3 are all it holds) and of its AdamW moments.
#[derive(PartialEq)]
struct State {
    params: Vec<u32>,
    m: Vec<u32>,
    v: Vec<u32>,
}

fn state(t: &Trainer) -> State {
    let b = &t.buffers;
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    State { params: b.pieces.iter().flat_map(|p| bits(&b.params[p.clone()])).collect(), m: bits(&b.m), v: bits(&b.v) }
}

/// Makes every gradient NaN from the next step on: the final LayerNorm's bias feeds every
/// position's logits, so one NaN there makes the loss and all of backward NaN, whatever the data.
/// Every rank calls it (under ZeRO-3 the value that counts is the one in its owner's piece).
/// Returns the element's index and the value it had.
fn poison(t: &mut Trainer) -> (usize, f32) {
    let at = t.model.table.find("transformer.ln_f.bias").expect("a GPT-2 has ln_f").at.offset;
    let was = t.buffers.params[at];
    t.buffers.params[at] = f32::NAN;
    (at, was)
}

/// Every parameter this rank updates but the poisoned one, and both moments, are finite.
fn assert_finite(t: &Trainer, poisoned: usize) {
    let b = &t.buffers;
    for p in &b.pieces {
        for i in p.clone() {
            assert!(i == poisoned || b.params[i].is_finite(), "parameter {i} is {}", b.params[i]);
        }
    }
    assert!(b.m.iter().chain(&b.v).all(|x| x.is_finite()), "a moment is not finite");
}

/// One step that must be skipped, leaving `before` as it was.
fn skipped_step(t: &mut Trainer, before: &State, poisoned: usize) -> StepReport {
    let r = t.train_step().unwrap();
    assert!(r.skipped && !r.grad_norm.is_finite() && !r.loss.is_finite(), "step {} was not skipped: {r:?}", r.step);
    assert_eq!(r.step, t.step, "a skipped step still counts");
    assert_eq!(serde_json::to_value(&r).unwrap()["skipped"].as_bool(), Some(true), "metrics.jsonl says so");
    assert!(state(t) == *before, "step {}: a skipped step changed parameters or moments", r.step);
    assert_finite(t, poisoned);
    r
}

/// A good step, then poisoned steps until the trainer gives up: the error, and the step count
/// when it did. Every rank runs it.
fn diverge(t: &mut Trainer) -> (Error, u64) {
    let r = t.train_step().unwrap();
    assert!(!r.skipped && r.grad_norm.is_finite() && r.loss.is_finite(), "{r:?}");
    assert!(t.buffers.m.iter().any(|&x| x != 0.0), "the good step moved the moments");
    let (at, _) = poison(t);
    let before = state(t);
    for _ in 1..MAX_NONFINITE_STEPS_IN_A_ROW {
        skipped_step(t, &before, at);
    }
    let err = t.train_step().expect_err("the run stops after too many non-finite steps in a row");
    assert!(state(t) == before, "the step that stopped the run changed parameters or moments");
    assert_finite(t, at);
    (err, t.step)
}

fn assert_stopped(err: &Error, step: u64) {
    let n = MAX_NONFINITE_STEPS_IN_A_ROW;
    match err {
        Error::NonFiniteGradients { steps, first, last } => {
            assert_eq!((*steps, *first, *last), (n, step + 1 - u64::from(n), step));
        }
        other => panic!("expected NonFiniteGradients, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&format!("{n} steps in a row")) && msg.contains("train.lr"), "{msg}");
}

#[test]
fn non_finite_gradients_skip_the_update_and_eight_in_a_row_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    write_model_and_data(dir.path());
    let mut t = Trainer::new(config(dir.path(), 1, 0)).unwrap();
    let r = t.train_step().unwrap();
    assert!(!r.skipped && r.grad_norm.is_finite(), "{r:?}");
    assert_eq!((r.mfu, t.peak_flops()), (None, None), "a CPU's peak is not known");
    // A few bad steps, then the parameter mended: the next step updates, and the count of
    // non-finite steps in a row starts over.
    let (at, good) = poison(&mut t);
    let before = state(&t);
    for _ in 0..3 {
        skipped_step(&mut t, &before, at);
    }
    t.buffers.params[at] = good;
    let r = t.train_step().unwrap();
    assert!(!r.skipped && r.grad_norm.is_finite(), "the mended model trains again: {r:?}");
    let after = state(&t);
    assert!(after.m != before.m && after.params != before.params, "the mended step updated");
    assert_finite(&t, usize::MAX);
    // From here, the full count is needed again.
    let (err, step) = diverge(&mut t);
    assert_eq!(step, 1 + 3 + 1 + 1 + u64::from(MAX_NONFINITE_STEPS_IN_A_ROW));
    assert_stopped(&err, step);
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Runs `f` on each rank of a dp = 2 job (threads of this process); their results in rank order.
fn on_two_ranks<R: Send + 'static>(config: TrainConfig, f: impl Fn(&mut Trainer) -> R + Send + Sync + 'static) -> Vec<R> {
    let addr = free_addr();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (config, addr, f) = (config.clone(), addr.clone(), f.clone());
            std::thread::spawn(move || {
                let comm = Comm::connect(rank, 2, &addr, Duration::from_secs(30)).unwrap();
                let mut t = Trainer::with_comm(config, Some(comm)).unwrap();
                f(&mut t)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank failed")).collect()
}

/// Every rank skips the same steps (the norm they agree on decides) and stops at the same one,
/// so none is left waiting in a collective; each rank's parameters and moments (its shards,
/// under ZeRO) are untouched.
#[test]
fn every_zero_stage_skips_on_every_rank_and_stops_together() {
    let dir = tempfile::tempdir().unwrap();
    write_model_and_data(dir.path());
    for zero in 0..=3u8 {
        let ranks = on_two_ranks(config(dir.path(), 2, zero), diverge);
        for (rank, (err, step)) in ranks.iter().enumerate() {
            assert_eq!(*step, 1 + u64::from(MAX_NONFINITE_STEPS_IN_A_ROW), "ZeRO-{zero} rank {rank}");
            assert_stopped(err, *step);
        }
    }
}
