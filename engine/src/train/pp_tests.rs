//! Pipeline parallelism in training, on CPU ranks (threads of this process, over sockets): every
//! schedule trains a 6-block LLaMA with the per-step losses and gradient norms of one device
//! (stages cut by cost and by `parallel.pp_layers`, unevenly; with a dp group under ZeRO-1), a
//! GPT-2 with its embedding tied across the first and last stages does too, and a checkpoint
//! written by two stages resumes on one rank and on four.

use std::path::{Path, PathBuf};

use super::tp_tests::{assert_same, fixture, on_ranks, write_tokens};
use crate::config::{Devices, ParallelPlan, ScheduleKind, TrainConfig};
use crate::models::ModelConfig;

/// A LLaMA of 6 blocks (GQA: 4 heads, 2 key/value heads), random init from the seed.
fn write_llama6(dir: &Path) -> PathBuf {
    let model = dir.join("llama6");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":96,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":64,"num_hidden_layers":6,"max_position_embeddings":32,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    model
}

/// 8 steps of 8 sequences of 16 tokens in micro-batches of 2, on `dp × pp` CPU ranks.
fn config(model: &Path, data: &Path, dp: usize, pp: usize, kind: ScheduleKind, chunks: usize, layers: Option<Vec<usize>>) -> TrainConfig {
    let mut c = TrainConfig::new(model, data);
    c.data.seq_len = 16;
    (c.optim.steps, c.optim.global_batch, c.optim.lr, c.optim.min_lr, c.optim.warmup_steps) = (8, 8, 1e-3, 1e-4, 2);
    let zero = u8::from(dp > 1);
    let plan = ParallelPlan { dp, pp, pp_schedule: kind, pp_chunks: chunks, pp_layers: layers, zero, ..ParallelPlan::default() };
    c.with_plan(plan, Devices::Cpu(dp * pp), Some(2))
}

/// Every rank's per-step losses and gradient norms.
fn run(config: TrainConfig) -> Vec<(Vec<f64>, Vec<f64>)> {
    on_ranks(config, |t| {
        let steps: Vec<_> = (0..t.config.optim.steps).map(|_| t.train_step().unwrap()).collect();
        (steps.iter().map(|s| s.loss).collect(), steps.iter().map(|s| s.grad_norm).collect())
    })
}

#[test]
fn every_schedule_trains_with_the_losses_of_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = (write_llama6(dir.path()), write_tokens(dir.path()));
    let one = run(config(&model, &data, 1, 1, ScheduleKind::OneFOneB, 1, None)).remove(0);
    use ScheduleKind::*;
    // (what, dp, pp, schedule, chunks per rank, pp_layers)
    type Layout = (&'static str, usize, usize, ScheduleKind, usize, Option<Vec<usize>>);
    let layouts: [Layout; 7] = [
        ("pp=2 gpipe", 1, 2, GPipe, 1, None),
        ("pp=2 1f1b", 1, 2, OneFOneB, 1, None),
        ("pp=4 1f1b, cut by cost", 1, 4, OneFOneB, 1, None),
        ("pp=4 1f1b, pp_layers [1, 2, 2, 1]", 1, 4, OneFOneB, 1, Some(vec![1, 2, 2, 1])),
        ("pp=2 interleaved, 2 chunks", 1, 2, Interleaved, 2, None),
        ("pp=2 zbv", 1, 2, Zbv, 2, None),
        ("pp=2 × dp=2, ZeRO-1", 2, 2, OneFOneB, 1, None),
    ];
    for (what, dp, pp, kind, chunks, layers) in layouts {
        let ranks = run(config(&model, &data, dp, pp, kind, chunks, layers));
        for (r, (losses, norms)) in ranks.iter().enumerate() {
            assert_same(&format!("{what}, rank {r}: loss"), &one.0, losses);
            assert_same(&format!("{what}, rank {r}: gradient norm"), &one.1, norms);
        }
    }
}

#[test]
fn a_tied_embedding_trains_across_the_first_and_last_stage() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    for fixture_name in ["gpt2", "llama_tied"] {
        let model = fixture(fixture_name);
        assert!(ModelConfig::from_dir(&model).unwrap().tie_embeddings);
        let one = run(config(&model, &data, 1, 1, ScheduleKind::OneFOneB, 1, None)).remove(0);
        for (r, (losses, norms)) in run(config(&model, &data, 1, 2, ScheduleKind::OneFOneB, 1, None)).iter().enumerate() {
            assert_same(&format!("{fixture_name} pp=2, rank {r}: loss"), &one.0, losses);
            // The tied tensor's two gradients are summed in another order than one device's
            // single buffer adds them (each stage's micro-batches first), and GPT-2's key bias,
            // whose gradient is rounding noise, turns that into AdamW steps of about the learning
            // rate (see `tp_tests::config`): the norms drift apart by a few 1e-4 over the steps.
            for (i, (a, b)) in one.1.iter().zip(norms).enumerate() {
                assert!((a - b).abs() <= 1e-3 * a, "{fixture_name} pp=2, rank {r}: gradient norm of step {}: {b} vs {a}", i + 1);
            }
        }
    }
}

#[test]
fn a_checkpoint_of_two_stages_resumes_on_one_rank_and_on_four() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data) = (write_llama6(dir.path()), write_tokens(dir.path()));
    let whole = run(config(&model, &data, 1, 1, ScheduleKind::OneFOneB, 1, None)).remove(0).0;
    let ck = dir.path().join("step_3");
    let at = ck.clone();
    // Three steps at pp = 2, then the checkpoint (the whole model's state, put together on the
    // first stage) and the final model.
    on_ranks(config(&model, &data, 1, 2, ScheduleKind::GPipe, 1, None), move |t| {
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        t.start_checkpoint(&at).unwrap();
        t.finish_checkpoint().unwrap();
    });
    assert!(ck.join("model.safetensors").is_file(), "the checkpoint is the whole model's");
    for (what, pp, kind) in [("pp=1", 1, ScheduleKind::OneFOneB), ("pp=4", 4, ScheduleKind::OneFOneB)] {
        let from = ck.clone();
        let ranks = on_ranks(config(&model, &data, 1, pp, kind, 1, None), move |t| {
            t.resume(&from).unwrap();
            t.check_ranks_resumed_alike().unwrap();
            assert_eq!(t.step, 3);
            (3..t.config.optim.steps).map(|_| t.train_step().unwrap().loss).collect::<Vec<_>>()
        });
        for (r, losses) in ranks.iter().enumerate() {
            assert_same(&format!("resumed at {what}, rank {r}"), &whole[3..], losses);
        }
    }
}
