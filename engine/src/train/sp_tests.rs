//! Sequence parallelism, DeepSpeed Ulysses (`all_to_all`), on CPU ranks (threads of this process,
//! over sockets): each rank runs half of every sequence, and the per-step losses are one
//! device's, on GPT-2 (learned positions) and LLaMA (GQA, RoPE), alone and with dp and ZeRO; the
//! activations a rank holds at T = 2048 fall to at most 0.6× of one device's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::comm::Comm;
use crate::config::{Devices, ParallelPlan, SpMode, TrainConfig};
use crate::models::{Model, ModelConfig, SpRank, TpRank};
use crate::params::{Chunking, DEFAULT_CHUNK_ELEMS};

use super::Trainer;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).join("model")
}

/// 4096 tokens below 96: a motif with noise, so the loss moves.
fn write_tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.bin");
    let tokens: Vec<u8> =
        (0..4096u32).flat_map(|i| (if i % 5 == 4 { (i * 7919) % 96 } else { (i % 23) * 4 } as u16).to_le_bytes()).collect();
    std::fs::write(&path, tokens).unwrap();
    path
}

/// 12 steps of 8 sequences of 16 tokens on `dp × sp` CPU ranks (see `tp_tests::config` for the
/// learning rate).
fn config(model: &Path, data: &Path, dp: usize, sp: usize, zero: u8) -> TrainConfig {
    let mut c = TrainConfig::new(model, data);
    c.data.seq_len = 16;
    (c.optim.steps, c.optim.global_batch, c.optim.lr, c.optim.min_lr, c.optim.warmup_steps) = (12, 8, 1e-3, 1e-4, 2);
    let sp_mode = if sp > 1 { SpMode::AllToAll } else { SpMode::None };
    let plan = ParallelPlan { dp, sp, sp_mode, zero, ..ParallelPlan::default() };
    c.with_plan(plan, Devices::Cpu(dp * sp), Some(2))
}

fn losses(config: TrainConfig) -> Vec<Vec<f64>> {
    let world = config.plan.world().unwrap();
    let steps = config.optim.steps;
    if world == 1 {
        let mut t = Trainer::new(config).unwrap();
        return vec![(0..steps).map(|_| t.train_step().unwrap().loss).collect()];
    }
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let config = Arc::new(config);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (config, addr) = (config.clone(), addr.clone());
            std::thread::spawn(move || {
                let comm = Comm::connect(rank, world, &addr, Duration::from_secs(60)).unwrap();
                let mut t = Trainer::with_comm((*config).clone(), Some(comm)).unwrap();
                let (seq, sp) = (config.data.seq_len, config.plan.sp);
                let want = if config.plan.sp_mode == SpMode::RingAttn { seq / (2 * sp) } else { seq / sp };
                assert_eq!(t.acts.seq(), want, "each rank runs its part of each sequence");
                (0..steps).map(|_| t.train_step().unwrap().loss).collect::<Vec<f64>>()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank failed")).collect()
}

/// Ring attention: sp = 2 and sp = 4 (zigzag chunks of 4 and 2 tokens), sp = 2 × dp = 2 with
/// ZeRO-1, and sp = 2 with ZeRO-3.
#[test]
fn ring_attn_gives_the_losses_of_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    for model in [fixture("gpt2"), fixture("llama_gqa")] {
        let one = losses(config(&model, &data, 1, 1, 0)).remove(0);
        for (dp, sp, zero) in [(1, 2, 0), (1, 4, 0), (2, 2, 1), (1, 2, 3)] {
            let mut c = config(&model, &data, dp, sp, zero);
            c.plan.sp_mode = SpMode::RingAttn;
            for (rank, got) in losses(c).iter().enumerate() {
                for (i, (a, b)) in one.iter().zip(got).enumerate() {
                    let rel = (a - b).abs() / a;
                    assert!(rel <= 1e-4, "{} ring dp={dp} sp={sp} rank {rank} step {}: {b} vs {a} ({rel:e})", model.display(), i + 1);
                }
            }
        }
    }
}

/// The mesh multiplies the axes: tp = 2 inside sp = 2 (Ulysses splits each tp rank's heads
/// further; the ring passes each tp rank's key/value heads), with one device's losses.
#[test]
fn sequence_parallelism_composes_with_tensor_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    // LLaMA GQA at tp = 2 leaves each rank one key/value head, which Ulysses cannot split again.
    for (model, modes) in [(fixture("gpt2"), &[SpMode::AllToAll, SpMode::RingAttn][..]), (fixture("llama_gqa"), &[SpMode::RingAttn][..])] {
        let one = losses(config(&model, &data, 1, 1, 0)).remove(0);
        for &mode in modes {
            let mut c = config(&model, &data, 1, 2, 0);
            c.plan.sp_mode = mode;
            c.plan.tp = 2;
            c.devices = Devices::Cpu(4);
            for (rank, got) in losses(c).iter().enumerate() {
                for (i, (a, b)) in one.iter().zip(got).enumerate() {
                    let rel = (a - b).abs() / a;
                    assert!(rel <= 1e-4, "{} {} tp=2 sp=2 rank {rank} step {}: {b} vs {a} ({rel:e})", model.display(), mode.name(), i + 1);
                }
            }
        }
    }
}

#[test]
fn all_to_all_gives_the_losses_of_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    for model in [fixture("gpt2"), fixture("llama_gqa")] {
        let one = losses(config(&model, &data, 1, 1, 0)).remove(0);
        assert!(one[11] < one[0], "{} learns: {one:?}", model.display());
        for (dp, sp, zero) in [(1, 2, 0), (2, 2, 1), (1, 2, 3)] {
            for (rank, got) in losses(config(&model, &data, dp, sp, zero)).iter().enumerate() {
                for (i, (a, b)) in one.iter().zip(got).enumerate() {
                    let rel = (a - b).abs() / a;
                    assert!(
                        rel <= 1e-4,
                        "{} dp={dp} sp={sp} zero={zero} rank {rank} step {}: {b} vs {a} ({rel:e})",
                        model.display(),
                        i + 1
                    );
                }
            }
        }
    }
}

/// The 34M-parameter LLaMA of the memory figures (hidden 512, 6 layers, GQA 8/2, vocabulary
/// 16384).
fn llama_34m() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":16384,"hidden_size":512,"intermediate_size":1376,
            "num_hidden_layers":6,"num_attention_heads":8,"num_key_value_heads":2,"max_position_embeddings":2048,
            "tie_word_embeddings":false}"#,
        Path::new("llama-34m/config.json"),
    )
    .unwrap()
}

/// The activation buffers a rank allocates (`Model::activation_bytes`: the lengths `activations`
/// allocates, which `acts_elems_tells_the_truth` checks against the buffers) for a micro-batch of
/// 2 sequences of 2048 tokens on the 34M-parameter LLaMA, at sp = 2 against one device.
#[test]
fn all_to_all_at_sp_2_holds_at_most_0_6_of_the_activations() {
    let config = llama_34m();
    let one = Model::new(config.clone()).unwrap().activation_bytes(2, 2048);
    let whole = Chunking::whole(DEFAULT_CHUNK_ELEMS);
    let half = Model::with_parallel(config, whole, TpRank::WHOLE, SpRank::ulysses(1, 2)).unwrap().activation_bytes(2, 1024);
    let ratio = half as f64 / one as f64;
    eprintln!("all_to_all, sp = 2, T = 2048: {half} of {one} bytes of activations ({ratio:.3}×)");
    assert!(ratio <= 0.6, "{ratio:.3}× of one device's activations");
}

/// Ring attention on the same model and batch: a rank runs two chunks of 512 tokens of each
/// sequence; attention's own buffers hold those rows only (the key/value blocks in flight are
/// two `[1024, 256]` blocks per layer call, freed after it).
#[test]
fn ring_attn_at_sp_2_holds_at_most_0_6_of_the_activations() {
    let config = llama_34m();
    let one = Model::new(config.clone()).unwrap().activation_bytes(2, 2048);
    let whole = Chunking::whole(DEFAULT_CHUNK_ELEMS);
    let sp = SpRank { rank: 1, size: 2, ring: true };
    let (b, t) = sp.local_batch(2, 2048);
    let half = Model::with_parallel(config, whole, TpRank::WHOLE, sp).unwrap().activation_bytes(b, t);
    let ratio = half as f64 / one as f64;
    eprintln!("ring_attn, sp = 2, T = 2048: {half} of {one} bytes of activations ({ratio:.3}×)");
    assert!(ratio <= 0.6, "{ratio:.3}× of one device's activations");
}

/// Megatron's sequence parallelism on the same model and batch: tp = 2 alone cuts the
/// projections', attention's and the MLP's activations but leaves the residual stream and the
/// norms whole on each rank; split_gather cuts those too, so a rank holds about half of one
/// device's activations.
#[test]
fn split_gather_at_tp_2_holds_half_of_the_activations() {
    let config = llama_34m();
    let one = Model::new(config.clone()).unwrap().activation_bytes(2, 2048);
    let at = |split_seq| {
        let whole = Chunking::whole(DEFAULT_CHUNK_ELEMS);
        let tp = TpRank { rank: 1, size: 2, split_seq };
        Model::with_parallel(config.clone(), whole, tp, SpRank::WHOLE).unwrap().activation_bytes(2, 2048) as f64 / one as f64
    };
    let (tp_only, split) = (at(false), at(true));
    eprintln!("T = 2048: tp = 2 holds {tp_only:.3}× of one device's activations, with split_gather {split:.3}×");
    assert!(split <= 0.55 && split < tp_only - 0.1, "tp = 2: {tp_only:.3}×, with split_gather {split:.3}×");
}
