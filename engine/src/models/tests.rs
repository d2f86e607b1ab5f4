//! Whole-model gradient checks by finite differences, on tiny random GPT-2 and LLaMA models.

use super::*;
use crate::params::{Chunking, ParamTable};

fn config(json: &str) -> ModelConfig {
    ModelConfig::from_json(json, std::path::Path::new("config.json")).unwrap()
}

/// Every parameter's gradient against central differences of the loss, computed in f32 by the
/// model's own forward pass (so the step is kept large and the tolerance loose enough for f32
/// rounding, but far below the size of a wrong gradient).
fn check_gradients(model: &Model, seed: u64) {
    let table: &ParamTable = &model.table;
    let mut params = vec![0.0f32; table.len()];
    table.init(&mut params, seed);
    // Make norms and biases non-trivial so their gradients are exercised.
    let mut rng = crate::rng::Rng::new(seed, 99);
    for p in params.iter_mut() {
        *p += (rng.normal() * 0.2) as f32;
    }
    let (batch, seq) = (2, 5);
    let vocab = model.config.vocab as u64;
    let windows: Vec<u32> = (0..batch * (seq + 1)).map(|_| rng.below(vocab) as u32).collect();
    let mut acts = model.activations(batch, seq).unwrap();
    let mut grads = vec![0.0f32; table.len()];
    let scale = 1.0 / (batch * seq) as f32;
    model.forward_backward(&params, &mut grads, &mut acts, &windows, scale).unwrap();
    let h = 1e-2f32;
    let mut worst = 0.0f32;
    for e in table.entries() {
        for i in e.at.range() {
            let orig = params[i];
            params[i] = orig + h;
            let up = model.loss(&params, &mut acts, &windows).unwrap() * scale as f64;
            params[i] = orig - h;
            let down = model.loss(&params, &mut acts, &windows).unwrap() * scale as f64;
            params[i] = orig;
            let fd = ((up - down) / (2.0 * h as f64)) as f32;
            let err = (grads[i] - fd).abs();
            worst = worst.max(err);
            assert!(err <= 2e-3 + 2e-2 * fd.abs(), "{}[{}]: backward {} vs finite difference {fd}", e.name, i - e.at.offset, grads[i]);
        }
    }
    assert!(worst > 0.0, "no gradient was compared");
}

#[test]
fn gpt2_backward_matches_finite_differences() {
    let cfg = config(r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":11,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":8}"#);
    check_gradients(&Model::new(cfg).unwrap(), 1);
}

#[test]
fn llama_gqa_backward_matches_finite_differences() {
    let cfg = config(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":11,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"head_dim":4,"max_position_embeddings":8,"rope_theta":100.0}"#,
    );
    check_gradients(&Model::new(cfg).unwrap(), 2);
}

#[test]
fn llama_tied_with_biases_backward_matches_finite_differences() {
    let cfg = config(
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":11,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":1,
            "num_attention_heads":2,"num_key_value_heads":1,"max_position_embeddings":8,"tie_word_embeddings":true,
            "attention_bias":true,"mlp_bias":true}"#,
    );
    check_gradients(&Model::new(cfg).unwrap(), 3);
}

/// Records what a model announces.
#[derive(Default)]
struct Recorder {
    needed: Vec<std::ops::Range<usize>>,
    ready: Vec<std::ops::Range<usize>>,
    /// For each gradient range, its values when it was announced final.
    snapshots: Vec<Vec<f32>>,
}

impl hooks::ParamHooks for Recorder {
    fn need_params(&mut self, _: &mut [f32], ranges: &[std::ops::Range<usize>]) -> Result<()> {
        self.needed.extend(ranges.iter().cloned());
        Ok(())
    }

    fn grads_ready(&mut self, grads: &mut [f32], range: std::ops::Range<usize>) -> Result<()> {
        self.snapshots.push(grads[range.clone()].to_vec());
        self.ready.push(range);
        Ok(())
    }
}

/// Hooks must see every tensor needed and every gradient made final exactly once, and a gradient
/// announced final must not change afterwards (DDP communicates it at that moment).
#[test]
fn hooks_cover_every_parameter_and_final_gradients_do_not_change() {
    let configs = [
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":11,"n_embd":8,"n_layer":3,"n_head":2,"n_positions":8}"#,
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":11,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":8,"tie_word_embeddings":false}"#,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":11,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":3,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":8,"tie_word_embeddings":true}"#,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":11,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
            "num_attention_heads":2,"num_key_value_heads":2,"max_position_embeddings":8}"#,
    ];
    for json in configs {
        let model = Model::with_chunks(config(json), Chunking::split(64)).unwrap();
        let table = &model.table;
        assert!(table.chunks().len() > 3, "small chunks for the test");
        let mut params = vec![0.0f32; table.len()];
        table.init(&mut params, 5);
        let windows: Vec<u32> = (0..2 * 6).map(|i| (i * 7 % 11) as u32).collect();
        let mut acts = model.activations(2, 5).unwrap();
        let mut grads = vec![0.0f32; table.len()];
        let mut rec = Recorder::default();
        let loss = model.forward_backward_hooked(&mut params, &mut grads, &mut acts, &windows, 0.1, &mut rec).unwrap();
        let mut plain = vec![0.0f32; table.len()];
        let want = model.forward_backward(&params, &mut plain, &mut acts, &windows, 0.1).unwrap();
        assert_eq!(loss, want);
        assert_eq!(grads, plain, "hooks change nothing by themselves");
        let mut covered = vec![0u32; table.len()];
        for r in &rec.ready {
            for i in r.clone() {
                covered[i] += 1;
            }
        }
        assert!(covered.iter().all(|c| *c == 1), "{json}: every gradient is announced final exactly once");
        for (r, snap) in rec.ready.iter().zip(&rec.snapshots) {
            assert_eq!(&grads[r.clone()], &snap[..], "{json}: {r:?} changed after it was announced final");
        }
        let mut needed = vec![false; table.len()];
        for r in &rec.needed {
            needed[r.clone()].iter_mut().for_each(|n| *n = true);
        }
        assert!(needed.iter().all(|n| *n), "{json}: every parameter is announced before use");
    }
}

/// A micro-batch run a block range at a time (blocks 0..k then k..L forward, the ranges in
/// reverse backward), with two micro-batches between forward and backward at once, gives exactly
/// the loss and gradients `forward_backward` gives each: what pipeline stages and 1F1B rely on.
#[test]
fn block_ranges_with_two_micro_batches_in_flight_give_the_whole_models_loss_and_gradients() {
    let configs = [
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":23,"n_embd":8,"n_layer":3,"n_head":2,"n_positions":8}"#,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":23,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":3,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":8}"#,
    ];
    for json in configs {
        let model = Model::new(config(json)).unwrap();
        let layers = model.config.layers;
        let mut params = vec![0.0f32; model.table.len()];
        model.table.init(&mut params, 4);
        let windows: [Vec<u32>; 2] =
            [(0..2 * 6).map(|i| (i * 5 % 23) as u32).collect(), (0..2 * 6).map(|i| ((i * 7 + 3) % 23) as u32).collect()];
        let whole: Vec<(f64, Vec<f32>)> = windows
            .iter()
            .map(|w| {
                let mut acts = model.activations(2, 5).unwrap();
                let mut grads = vec![0.0f32; model.table.len()];
                let loss = model.forward_backward(&params, &mut grads, &mut acts, w, 0.1).unwrap();
                (loss, grads)
            })
            .collect();
        for k in 0..=layers {
            let mut acts = [model.activations(2, 5).unwrap(), model.activations(2, 5).unwrap()];
            let mut grads = [vec![0.0f32; model.table.len()], vec![0.0f32; model.table.len()]];
            for i in 0..2 {
                model.embed(&params, &mut acts[i], &windows[i]).unwrap();
                model.forward_blocks(&params, &mut acts[i], 0..k).unwrap();
            }
            let mut losses = [0.0; 2];
            for i in 0..2 {
                model.forward_blocks(&params, &mut acts[i], k..layers).unwrap();
                losses[i] = model.head_backward(&params, &mut grads[i], &mut acts[i], 0.1).unwrap();
            }
            for i in [1, 0] {
                model.backward_blocks(&params, &mut grads[i], &mut acts[i], k..layers).unwrap();
            }
            for i in 0..2 {
                model.backward_blocks(&params, &mut grads[i], &mut acts[i], 0..k).unwrap();
                model.embed_backward(&params, &mut grads[i], &mut acts[i]).unwrap();
                assert_eq!(losses[i], whole[i].0, "{json}: k = {k}, micro-batch {i}: loss");
                assert!(grads[i] == whole[i].1, "{json}: k = {k}, micro-batch {i}: gradients differ");
            }
        }
        let mut acts = model.activations(2, 5).unwrap();
        assert!(model.forward_blocks(&params, &mut acts, 0..1).is_err(), "nothing embedded yet");
        model.embed(&params, &mut acts, &windows[0]).unwrap();
        let err = model.forward_blocks(&params, &mut acts, 0..layers + 1).unwrap_err().to_string();
        assert!(err.contains("of a model (or stage) of 3 blocks"), "{err}");
    }
}

/// A model whose embedding and head span several chunks runs them one vocabulary slice at a
/// time (as under data parallelism): the same loss and gradients as one whole, up to the order
/// of the head's sums. GPT-2 tied and untied, LLaMA untied and tied.
#[test]
fn a_vocabulary_split_across_chunks_gives_the_whole_models_loss_and_gradients() {
    let configs = [
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":37,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":8}"#,
        r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":37,"n_embd":8,"n_layer":2,"n_head":2,"n_positions":8,"tie_word_embeddings":false}"#,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":37,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":8}"#,
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":37,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"max_position_embeddings":8,"tie_word_embeddings":true}"#,
    ];
    for json in configs {
        let whole = Model::new(config(json)).unwrap();
        let sliced = Model::with_chunks(config(json), Chunking::split(64)).unwrap();
        let embed = sliced.table.entries().iter().find(|e| e.name.ends_with("wte.weight") || e.name.ends_with("embed_tokens.weight"));
        assert!(embed.unwrap().chunks.len() >= 4, "{json}: 37 rows of 8 over chunks of 64 elements");
        let mut params = vec![0.0f32; whole.table.len()];
        whole.table.init(&mut params, 11);
        assert_eq!(
            whole.table.entries().iter().map(|e| e.at).collect::<Vec<_>>(),
            sliced.table.entries().iter().map(|e| e.at).collect::<Vec<_>>()
        );
        let windows: Vec<u32> = (0..3 * 7).map(|i| (i * 11 % 37) as u32).collect();
        let run = |m: &Model| {
            let mut acts = m.activations(3, 6).unwrap();
            let mut grads = vec![0.0f32; m.table.len()];
            let loss = m.forward_backward(&params, &mut grads, &mut acts, &windows, 0.05).unwrap();
            (loss, grads)
        };
        let ((l1, g1), (l2, g2)) = (run(&whole), run(&sliced));
        assert!((l1 - l2).abs() <= 1e-6 * l1.abs(), "{json}: loss {l2} against {l1}");
        let worst = g1.iter().zip(&g2).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = g1.iter().map(|g| g.abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5 * scale, "{json}: gradients differ by {worst} (largest {scale})");
    }
}

/// A config's text is never quoted in an error: the daemon reads configs for users who may not
/// read them themselves (docs/security.md). Keys Gantry knows, kinds and numbers are named.
#[test]
fn config_errors_name_keys_and_kinds_but_quote_no_text() {
    let secret = "hunter2-secret";
    for json in [
        format!(r#"{{"architectures": ["{secret}"]}}"#),
        format!(r#"{{"model_type": "{secret}"}}"#),
        format!(
            r#"{{"architectures": ["GPT2LMHeadModel"], "vocab_size": "{secret}", "n_embd": 8, "n_layer": 1, "n_head": 1, "n_positions": 8}}"#
        ),
        format!(r#"{{"architectures": ["GPT2LMHeadModel"], "activation_function": "{secret}"}}"#),
        format!(r#"{{"architectures": ["LlamaForCausalLM"], "hidden_act": "{secret}"}}"#),
        format!(r#"{{"architectures": ["GPT2LMHeadModel"], "scale_attn_weights": "{secret}"}}"#),
        format!(r#""{secret}""#),
        format!(r#"{{"a": "{secret}" "#),
    ] {
        let err = ModelConfig::from_json(&json, std::path::Path::new("config.json")).unwrap_err().to_string();
        assert!(!err.contains(secret), "{err}");
    }
    let json = r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": "x", "n_embd": 8, "n_layer": 1, "n_head": 1, "n_positions": 8}"#;
    let err = ModelConfig::from_json(json, std::path::Path::new("c.json")).unwrap_err().to_string();
    assert!(err.contains("`vocab_size` must be a positive integer, found a string"), "{err}");
}
