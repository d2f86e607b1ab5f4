//! Tensor parallelism on CPU ranks (threads of this process, over sockets): every layout trains
//! with the per-step losses of one device, on GPT-2 (tied embedding, biases) and LLaMA (GQA with
//! fewer key/value heads than ranks, SwiGLU, RoPE), with uneven MLP and vocabulary cuts; and the
//! whole model is put back together from the ranks' parts. Megatron's sequence parallelism
//! (split_gather) runs inside the same groups.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::comm::Comm;
use crate::config::{Devices, ParallelPlan, SpMode, TrainConfig};

use super::Trainer;

pub(super) fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).join("model")
}

/// 4096 tokens below 96: a motif with noise, so the loss moves.
pub(super) fn write_tokens(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.bin");
    let tokens: Vec<u8> =
        (0..4096u32).flat_map(|i| (if i % 5 == 4 { (i * 7919) % 96 } else { (i % 23) * 4 } as u16).to_le_bytes()).collect();
    std::fs::write(&path, tokens).unwrap();
    path
}

/// A LLaMA whose MLP (172) and vocabulary (300) do not divide by 4, and one key/value head.
fn write_uneven_llama(dir: &Path) -> PathBuf {
    let model = dir.join("uneven");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":300,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":1,"intermediate_size":172,"num_hidden_layers":2,"max_position_embeddings":32,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    model
}

/// 12 steps of 8 sequences of 16 tokens on `dp × tp` CPU ranks. The learning rate is 1e-3, not
/// larger: some gradients are rounding noise in exact arithmetic zero (GPT-2's key bias: the
/// softmax does not see a shift of every key), which AdamW scales up to a step of about the
/// learning rate whatever their size, so any other order of summation (a cut layer, another
/// thread count) moves those parameters differently, by more the larger the rate.
fn config(model: &Path, data: &Path, dp: usize, tp: usize, zero: u8) -> TrainConfig {
    let mut c = TrainConfig::new(model, data);
    c.data.seq_len = 16;
    (c.optim.steps, c.optim.global_batch, c.optim.lr, c.optim.min_lr, c.optim.warmup_steps) = (12, 8, 1e-3, 1e-4, 2);
    let plan = ParallelPlan { dp, tp, zero, ..ParallelPlan::default() };
    c.with_plan(plan, Devices::Cpu(dp * tp), Some(2))
}

pub(super) fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Runs `f` on every rank of `config`'s job (threads of this process); results in rank order.
pub(super) fn on_ranks<R: Send + 'static>(config: TrainConfig, f: impl Fn(&mut Trainer) -> R + Send + Sync + 'static) -> Vec<R> {
    let world = config.plan.world().unwrap();
    if world == 1 {
        return vec![f(&mut Trainer::new(config).unwrap())];
    }
    let addr = free_addr();
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (config, addr, f) = (config.clone(), addr.clone(), f.clone());
            std::thread::spawn(move || {
                let comm = Comm::connect(rank, world, &addr, Duration::from_secs(60)).unwrap();
                let mut t = Trainer::with_comm(config, Some(comm)).unwrap();
                f(&mut t)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank failed")).collect()
}

/// Every rank's per-step losses and first-step `mem_bytes`.
fn losses(config: TrainConfig) -> Vec<(Vec<f64>, u64)> {
    on_ranks(config, |t| {
        let p = t.config.plan.clone();
        assert_eq!(t.model.tp.splits_seq(), p.tp > 1 && p.sp_mode == SpMode::SplitGather, "the rank runs the layout asked for");
        let steps: Vec<_> = (0..t.config.optim.steps).map(|_| t.train_step().unwrap()).collect();
        (steps.iter().map(|s| s.loss).collect(), steps[0].mem_bytes)
    })
}

pub(super) fn assert_same(what: &str, want: &[f64], got: &[f64]) {
    assert_eq!(want.len(), got.len());
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        let rel = (a - b).abs() / a;
        assert!(rel <= 1e-4, "{what} step {}: {b} vs {a} ({rel:e})", i + 1);
    }
}

#[test]
fn every_tensor_parallel_layout_gives_the_losses_of_one_device() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    let uneven = write_uneven_llama(dir.path());
    for model in [fixture("gpt2"), fixture("llama_gqa"), uneven] {
        let one = losses(config(&model, &data, 1, 1, 0)).remove(0);
        assert!(one.0[11] < one.0[0], "{} learns: {:?}", model.display(), one.0);
        for (dp, tp, zero, sp_mode) in [
            (1, 2, 0, SpMode::None),
            (1, 4, 0, SpMode::None),
            (2, 2, 1, SpMode::None),
            (1, 2, 0, SpMode::SplitGather),
            (1, 4, 0, SpMode::SplitGather),
            (2, 2, 1, SpMode::SplitGather),
            (2, 2, 2, SpMode::None),
            (2, 2, 3, SpMode::None),
            (2, 2, 3, SpMode::SplitGather),
        ] {
            let mut c = config(&model, &data, dp, tp, zero);
            c.plan.sp_mode = sp_mode;
            let ranks = losses(c);
            let what = format!("{} dp={dp} tp={tp} zero={zero} sp_mode={}", model.display(), sp_mode.name());
            for (rank, (got, mem)) in ranks.iter().enumerate() {
                assert_same(&format!("{what} rank {rank}"), &one.0, got);
                // Each rank holds about 1/tp of the model's state (more under dp without ZeRO).
                assert!(*mem < one.1 * 3 / 4, "{what} rank {rank}: {mem} bytes against one device's {}", one.1);
            }
        }
    }
}

/// A checkpoint of tp = 2 × dp = 2 under ZeRO-3 (and ZeRO-1) holds the whole model's state, put
/// together over dp and then tp: it resumes on one device and under another layout, and the
/// losses go on as the uninterrupted one-device run's.
#[test]
fn a_checkpoint_of_zero_with_tensor_parallelism_resumes_under_another_layout() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    let model = fixture("llama_gqa");
    let one = losses(config(&model, &data, 1, 1, 0)).remove(0).0;
    for zero in [1, 3] {
        let ck = dir.path().join(format!("step-6-zero-{zero}"));
        let at = ck.clone();
        let first = on_ranks(config(&model, &data, 2, 2, zero), move |t| {
            let l: Vec<f64> = (0..6).map(|_| t.train_step().unwrap().loss).collect();
            t.start_checkpoint(&at).unwrap();
            let outcome = t.finish_checkpoint().unwrap();
            (l, outcome.map(|o| o.result.is_ok()))
        });
        assert_eq!(first.iter().filter(|(_, o)| o.is_some()).count(), 1, "one rank writes it");
        assert!(first.iter().all(|(_, o)| o.unwrap_or(true)), "the checkpoint is written");
        for (dp, tp, z) in [(1, 1, 0), (2, 2, 1), (1, 4, 0)] {
            let at = ck.clone();
            let ranks = on_ranks(config(&model, &data, dp, tp, z), move |t| {
                t.resume(&at).unwrap();
                t.check_ranks_resumed_alike().unwrap();
                (0..6).map(|_| t.train_step().unwrap().loss).collect::<Vec<f64>>()
            });
            for (rank, got) in ranks.iter().enumerate() {
                assert_same(&format!("zero={zero} checkpoint resumed at dp={dp} tp={tp} zero={z} rank {rank}"), &one[6..], got);
            }
        }
    }
}

/// A rank loads its part a tensor at a time (Hugging Face weights sliced, random ones drawn whole
/// and cut): the same values as the whole model's, cut.
#[test]
fn a_rank_loads_its_part_of_the_whole_model() {
    use crate::config::ModelInit;
    use crate::models::TpRank;
    for (name, init) in [("gpt2", ModelInit::Pretrained), ("llama_gqa", ModelInit::Pretrained), ("llama_gqa", ModelInit::Random)] {
        let (whole, params) = super::load_model(&fixture(name), init, 7).unwrap();
        for rank in 0..4 {
            let (part, got) = super::load_model_part(&fixture(name), init, 7, TpRank::new(rank, 4)).unwrap();
            // A part alone cannot evaluate the model: that is refused, not answered wrongly.
            let mut acts = part.activations(1, 4).unwrap();
            let err = part.loss(&got, &mut acts, &[1, 2, 3, 4, 5]).unwrap_err();
            assert!(err.to_string().contains("cut across ranks"), "{err}");
            let mut want = vec![0.0; part.table.len()];
            part.table.take_shards(&whole.table, &params, &mut want);
            assert!(got == want, "{name} {init:?} rank {rank} of 4");
        }
    }
}

/// The final model a tp = 4 run, or a tp = 2 × dp = 2 one under ZeRO-3, writes is the whole model,
/// equal to a one-device run's.
#[test]
fn the_ranks_parts_make_the_whole_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    let model = write_uneven_llama(dir.path());
    // One device, tp = 4, and tp = 2 × dp = 2 under ZeRO-3 (each part gathered over dp first).
    let finals: Vec<_> = [(1, 1, 0), (1, 4, 0), (2, 2, 3)]
        .into_iter()
        .map(|(dp, tp, zero)| {
            let out = dir.path().join(format!("final-{dp}-{tp}-{zero}"));
            let mut c = config(&model, &data, dp, tp, zero);
            c.optim.steps = 3;
            let o = out.clone();
            on_ranks(c, move |t| {
                for _ in 0..3 {
                    t.train_step().unwrap();
                }
                t.save_final(&o).unwrap()
            });
            let (_, params) = super::load_model(&out, crate::config::ModelInit::Pretrained, 0).unwrap();
            params
        })
        .collect();
    for other in &finals[1..] {
        assert_eq!(finals[0].len(), other.len());
        let worst = finals[0].iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "final models differ by {worst}");
    }
}

/// What a layout cannot do is refused before anything runs, naming the field to change.
#[test]
fn layouts_that_cannot_run_are_refused_by_field() {
    use crate::config::TpMode;
    use crate::models::ModelConfig;
    let dir = tempfile::tempdir().unwrap();
    let data = write_tokens(dir.path());
    let gpt2 = ModelConfig::from_dir(&fixture("gpt2")).unwrap();
    let field = |e: crate::Error| match e {
        crate::Error::Unsupported { field, message } => (field, message),
        other => panic!("{other}"),
    };
    // 4 heads over 3 ranks.
    let (f, m) = field(super::check_model_layout(&config(&fixture("gpt2"), &data, 1, 3, 0), &gpt2).unwrap_err());
    assert_eq!(f, "parallel.tp");
    assert!(m.contains("4 attention heads"), "{m}");
    super::check_model_layout(&config(&fixture("gpt2"), &data, 1, 4, 0), &gpt2).unwrap();
    let mut c = config(&fixture("gpt2"), &data, 2, 2, 3);
    c.checkpoint_every = 5;
    super::check_layout(&c).unwrap();
    c.plan.tp_mode = TpMode::TwoD;
    assert_eq!(field(super::check_layout(&c).unwrap_err()).0, "parallel.tp_mode");
    c.plan.tp_mode = TpMode::OneD;
    c.plan.sp_mode = SpMode::SplitGather;
    super::check_layout(&c).unwrap();
    c.data.seq_len = 15;
    assert_eq!(field(super::check_layout(&c).unwrap_err()).0, "data.seq_len");
    c.data.seq_len = 16;
    c.plan.sp_mode = SpMode::RingAttn;
    assert_eq!(field(super::check_layout(&c).unwrap_err()).0, "parallel.sp_mode");
}
