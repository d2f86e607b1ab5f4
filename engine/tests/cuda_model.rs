//! The one model on the CUDA backend against the CPU backend (feature `cuda`): the loss and every
//! gradient of one forward/backward, block ranges with two micro-batches in flight, and the losses
//! of several training steps in f32, bf16 and fp16. Without a
//! GPU each test says it was skipped and passes, unless `GANTRY_REQUIRE_GPU=1`.
//!
//! Tolerances: f32 matmuls run on TF32 tensor cores (10-bit mantissas, as PyTorch with
//! `allow_tf32`), so f32 agrees with the CPU to about 1e-3 relative, not to the last bit; bf16 and
//! fp16 store activations in 16 bits.
#![cfg(feature = "cuda")]

mod common;

use common::{example_config, gpu};

use gantry_engine::backend::{Cuda, Weights};
use gantry_engine::cuda::GpuTrainer;
use gantry_engine::models::{Model, ModelConfig};
use gantry_engine::optim::{clip_grad_norm, AdamW};
use gantry_engine::params::{Chunking, ParamBuffers};
use gantry_engine::rng::Rng;
use gantry_kernels::cuda::half::{bf16, f16};
use gantry_kernels::cuda::ops::Storage;
use gantry_kernels::cuda::Gpu;

fn model(json: &str) -> Model {
    Model::new(ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap()).unwrap()
}

fn gpt2() -> Model {
    model(r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":211,"n_embd":64,"n_layer":2,"n_head":4,"n_positions":64}"#)
}

fn llama_gqa() -> Model {
    model(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":211,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"max_position_embeddings":64,"rope_theta":10000.0,
            "tie_word_embeddings":false}"#,
    )
}

const OPTIM: AdamW = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };

fn params_and_windows(m: &Model, batch: usize, seq: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut params = vec![0.0; m.table.len()];
    m.table.init(&mut params, seed);
    let mut rng = Rng::new(seed, 7);
    // Non-trivial norms and biases, so their gradients are exercised.
    for p in params.iter_mut() {
        *p += (rng.normal() * 0.05) as f32;
    }
    let windows = (0..batch * (seq + 1)).map(|_| rng.below(m.config.vocab as u64) as u32).collect();
    (params, windows)
}

fn one_pass_matches(m: &Model, g: Gpu) {
    let (batch, seq) = (3, 40);
    let (params, windows) = params_and_windows(m, batch, seq, 1);
    let scale = 1.0 / (batch * seq) as f32;
    let mut acts = m.activations(batch, seq).unwrap();
    let mut grads = vec![0.0; params.len()];
    let want = m.forward_backward(&params, &mut grads, &mut acts, &windows, scale).unwrap();
    let mut t = GpuTrainer::<f32>::new(g, m, &params, batch, seq, OPTIM).unwrap();
    let got = t.forward_backward(&windows, scale).unwrap();
    assert!((got - want).abs() < 2e-3 * want.abs(), "loss {got} vs CPU {want}");
    let got_g = t.grads_to_host().unwrap();
    for e in m.table.entries() {
        let (gg, wg) = (&got_g[e.at.range()], &grads[e.at.range()]);
        let scale = wg.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-6);
        let worst = gg.iter().zip(wg).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst <= 2e-2 * scale, "{}: gradients differ by {worst} (largest {scale})", e.name);
    }
    let fwd = t.loss(&windows).unwrap();
    assert!((fwd - want * scale as f64).abs() < 2e-3 * want * scale as f64, "forward-only loss {fwd}");
}

#[test]
fn gpt2_loss_and_gradients_match_the_cpu() {
    let Some(g) = gpu() else { return };
    one_pass_matches(&gpt2(), g);
}

#[test]
fn llama_gqa_loss_and_gradients_match_the_cpu() {
    let Some(g) = gpu() else { return };
    one_pass_matches(&llama_gqa(), g);
}

/// The one model on the CUDA backend a part at a time, as pipeline stages will run it: two
/// micro-batches embedded and run forward over blocks 0..1 then 1..2 (both alive at once), then
/// each backward over the same ranges in reverse, accumulating into one gradient buffer. The loss
/// and gradients are those of two whole `forward_backward_on` passes, exactly (the same kernels
/// in the same order).
fn block_ranges_match_whole_passes(m: &Model, g: Gpu) {
    let (batch, seq) = (2, 24);
    let (params, w1) = params_and_windows(m, batch, seq, 5);
    let (_, w2) = params_and_windows(m, batch, seq, 6);
    let scale = 0.01;
    let be = Cuda::<f32>::new(g);
    let s = be.gpu().stream().clone();
    let p = s.clone_htod(&params).unwrap();
    let weights = || Weights::<Cuda<f32>> { w: &p, master: &p };
    let mut whole_grads = s.alloc_zeros::<f32>(params.len()).unwrap();
    let mut acts = m.activations_on(&be, batch, seq).unwrap();
    let mut want = 0.0;
    for w in [&w1, &w2] {
        want += m.forward_backward_on(&be, &mut weights(), &mut whole_grads, &mut acts, w, scale).unwrap();
    }
    let mut grads = s.alloc_zeros::<f32>(params.len()).unwrap();
    let (mut a1, mut a2) = (m.activations_on(&be, batch, seq).unwrap(), m.activations_on(&be, batch, seq).unwrap());
    let layers = m.config.layers;
    m.embed_on(&be, &mut weights(), &mut a1, &w1).unwrap();
    m.embed_on(&be, &mut weights(), &mut a2, &w2).unwrap();
    for a in [&mut a1, &mut a2] {
        m.forward_blocks_on(&be, &mut weights(), a, 0..1).unwrap();
        m.forward_blocks_on(&be, &mut weights(), a, 1..layers).unwrap();
    }
    let mut got = 0.0;
    for a in [&mut a1, &mut a2] {
        got += m.head_backward_on(&be, &mut weights(), &mut grads, a, scale).unwrap();
        m.backward_blocks_on(&be, &mut weights(), &mut grads, a, 1..layers).unwrap();
        m.backward_blocks_on(&be, &mut weights(), &mut grads, a, 0..1).unwrap();
        m.embed_backward_on(&be, &mut weights(), &mut grads, a).unwrap();
    }
    assert_eq!(got, want, "summed loss of the block ranges");
    let (got_g, want_g) = (s.clone_dtoh(&grads).unwrap(), s.clone_dtoh(&whole_grads).unwrap());
    for e in m.table.entries() {
        assert_eq!(&got_g[e.at.range()], &want_g[e.at.range()], "{}", e.name);
    }
}

/// Under ZeRO-3 chunking the token embedding and the head are cut into slices of whole rows and
/// run a slice at a time (`models/sliced.rs`); on the CUDA backend that is the `embedding_rows`,
/// `add_positions` kernels and the sliced head. Loss and gradients match the CPU's.
#[test]
fn sliced_embedding_and_head_on_the_gpu_match_the_cpu() {
    for json in [
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":211,"n_embd":64,"n_layer":2,"n_head":4,"n_positions":64}"#,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":211,"hidden_size":64,"intermediate_size":96,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"max_position_embeddings":64,"tie_word_embeddings":false}"#,
    ] {
        let Some(g) = gpu() else { return };
        let config = ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap();
        let m = Model::with_chunks(config, Chunking { elems: 2048, split_large: true }).unwrap();
        let wte = m.table.entries().iter().find(|e| e.name.ends_with("wte.weight") || e.name.ends_with("embed_tokens.weight")).unwrap();
        assert!(m.table.slices(wte.at).len() > 1, "the embedding must be cut into slices");
        let (batch, seq) = (2, 24);
        let (params, windows) = params_and_windows(&m, batch, seq, 8);
        let scale = 1.0 / (batch * seq) as f32;
        let mut acts = m.activations(batch, seq).unwrap();
        let mut grads = vec![0.0; params.len()];
        let want = m.forward_backward(&params, &mut grads, &mut acts, &windows, scale).unwrap();
        let be = Cuda::<f32>::new(g);
        let s = be.gpu().stream().clone();
        let p = s.clone_htod(&params).unwrap();
        let mut gd = s.alloc_zeros::<f32>(params.len()).unwrap();
        let mut acts_gpu = m.activations_on(&be, batch, seq).unwrap();
        let got =
            m.forward_backward_on(&be, &mut Weights::<Cuda<f32>> { w: &p, master: &p }, &mut gd, &mut acts_gpu, &windows, scale).unwrap();
        assert!((got - want).abs() < 2e-3 * want.abs(), "{:?}: loss {got} vs CPU {want}", m.config.arch);
        let got_g = s.clone_dtoh(&gd).unwrap();
        for e in m.table.entries() {
            let (gg, wg) = (&got_g[e.at.range()], &grads[e.at.range()]);
            let top = wg.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-6);
            let worst = gg.iter().zip(wg).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(worst <= 2e-2 * top, "{}: gradients differ by {worst} (largest {top})", e.name);
        }
    }
}

#[test]
fn block_ranges_on_the_gpu_match_whole_passes() {
    for m in [gpt2(), llama_gqa()] {
        let Some(g) = gpu() else { return };
        block_ranges_match_whole_passes(&m, g);
    }
}

/// Per-step losses of `steps` steps on the CPU (f32) and on the GPU in precision `T`.
fn training_losses<T: Storage>(m: &Model, g: Gpu, steps: usize) -> (Vec<f64>, Vec<f64>)
where
    gantry_kernels::cuda::cudarc::cublaslt::CudaBlasLT: gantry_kernels::cuda::cudarc::cublaslt::Matmul<T>,
{
    let (batch, seq) = (4, 32);
    let (params, _) = params_and_windows(m, batch, seq, 2);
    let mut rng = Rng::new(3, 3);
    let data: Vec<Vec<u32>> =
        (0..steps).map(|_| (0..batch * (seq + 1)).map(|_| rng.below(m.config.vocab as u64) as u32).collect()).collect();
    let lr = 3e-3;
    let mut buf = ParamBuffers::zeros(&m.table);
    buf.params.copy_from_slice(&params);
    let mut acts = m.activations(batch, seq).unwrap();
    let tokens = batch * seq;
    let mut cpu = Vec::new();
    for (i, w) in data.iter().enumerate() {
        buf.grads.iter_mut().for_each(|x| *x = 0.0);
        let loss = m.forward_backward(&buf.params, &mut buf.grads, &mut acts, w, 1.0 / tokens as f32).unwrap();
        clip_grad_norm(&mut buf.grads, 1.0);
        OPTIM.step(&m.table, &mut buf, lr, i as u32 + 1);
        cpu.push(loss / tokens as f64);
    }
    let mut t = GpuTrainer::<T>::new(g, m, &params, batch, seq, OPTIM).unwrap();
    let gpu = data
        .iter()
        .enumerate()
        .map(|(i, w)| t.step(&[w], lr, 1.0, i as u32 + 1, None).unwrap())
        .inspect(|s| assert!(!s.skipped, "no step overflows here"))
        .map(|s| s.loss)
        .collect();
    (cpu, gpu)
}

#[test]
fn training_losses_match_the_cpu_in_every_precision() {
    for m in [gpt2(), llama_gqa()] {
        for (name, tol) in [("f32", 3e-3), ("bf16", 3e-2), ("f16", 1e-2)] {
            let Some(g) = gpu() else { return };
            let (cpu, gpu) = match name {
                "f32" => training_losses::<f32>(&m, g, 8),
                "bf16" => training_losses::<bf16>(&m, g, 8),
                _ => training_losses::<f16>(&m, g, 8),
            };
            for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
                assert!((c - g).abs() <= tol * c.abs(), "{:?} {name} step {}: GPU loss {g} vs CPU {c}", m.config.arch, i + 1);
            }
            assert!(gpu.last() < gpu.first(), "{name}: the loss falls ({gpu:?})");
        }
    }
}

/// The example spec's first steps through the trainer (data, schedule, accumulation, clipping)
/// on the GPU against the CPU; the final model the GPU run writes gives the CPU run's loss.
#[test]
fn the_trainer_on_a_gpu_follows_the_cpu_run() {
    let Some(g) = gpu() else { return };
    drop(g);
    use gantry_engine::config::{Devices, ModelInit, Precision};
    use gantry_engine::train::{load_model, Trainer};
    let spec = |devices: Devices, precision: Precision| {
        let mut c = example_config(10);
        (c.devices, c.precision) = (devices, precision);
        c
    };
    let run = |c| {
        let mut t = Trainer::new(c).unwrap();
        let losses: Vec<f64> = (0..10).map(|_| t.train_step().unwrap().loss).collect();
        let dir = tempfile::tempdir().unwrap();
        t.save_final(dir.path()).unwrap();
        let (m, params) = load_model(dir.path(), ModelInit::Pretrained, 0).unwrap();
        (losses, m, params, dir)
    };
    let (cpu, m, cpu_params, _d1) = run(spec(Devices::Cpu(1), Precision::Fp32));
    for (precision, tol) in [(Precision::Fp32, 3e-3), (Precision::Bf16, 3e-2)] {
        let (gpu, _, gpu_params, _d2) = run(spec(Devices::Cuda(vec![0]), precision));
        for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
            assert!((c - g).abs() <= tol * c, "{precision} step {}: GPU {g} vs CPU {c}", i + 1);
        }
        // The saved model: the CPU model's loss on a batch, with either run's parameters.
        let mut acts = m.activations(2, 64).unwrap();
        let windows: Vec<u32> = (0..2 * 65).map(|i| (i * 37 % m.config.vocab) as u32).collect();
        let (a, b) = (m.loss(&cpu_params, &mut acts, &windows).unwrap(), m.loss(&gpu_params, &mut acts, &windows).unwrap());
        assert!((a - b).abs() <= tol * a, "{precision}: final models' losses {b} vs {a}");
    }
}

/// A checkpoint written while the GPU keeps training (the state copied on a stream of its own)
/// holds the state of its step: a run resumed from it on the GPU continues with the losses of the
/// uninterrupted run, in every precision (fp16's loss scale is in the checkpoint).
#[test]
fn a_gpu_checkpoint_taken_beside_training_resumes_exactly() {
    let Some(g) = gpu() else { return };
    drop(g);
    use gantry_engine::config::{Devices, Precision};
    use gantry_engine::train::Trainer;
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp16] {
        let mut spec = example_config(8);
        (spec.devices, spec.precision, spec.checkpoint_every) = (Devices::Cuda(vec![0]), precision, 3);
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("step_3");
        let mut t = Trainer::new(spec.clone()).unwrap();
        let mut full = Vec::new();
        for step in 1..=8 {
            full.push(t.train_step().unwrap().loss);
            if step == 3 {
                assert!(t.start_checkpoint(&ck).unwrap().is_none());
            }
        }
        let o = t.finish_checkpoint().unwrap().expect("the checkpoint was written");
        o.result.unwrap();
        let mut r = Trainer::new(spec).unwrap();
        r.resume(&ck).unwrap();
        assert_eq!(r.step, 3);
        let resumed: Vec<f64> = (4..=8).map(|_| r.train_step().unwrap().loss).collect();
        for (i, (a, b)) in full[3..].iter().zip(&resumed).enumerate() {
            assert!((a - b).abs() <= 1e-6 * a, "{precision} step {}: resumed {b} vs uninterrupted {a}", i + 4);
        }
    }
}
