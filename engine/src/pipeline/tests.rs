//! Every schedule, run by the runner on CPU ranks (threads of this process over sockets), gives
//! the whole model's summed loss and gradients: GPT-2 with its tied embedding split between the
//! first and last stage, LLaMA with GQA, and a 6-block LLaMA cut unevenly over 4 stages, into
//! interleaved chunks, and into zbv's V.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{split_stages, PipelineRank, Schedule, ScheduleKind};
use crate::comm::{AsyncComm, Comm, Group};
use crate::config::ModelInit;
use crate::models::{ModelConfig, PpStage, SpRank, TpRank};
use crate::params::Chunking;
use crate::train::load_model;

const SEQ: usize = 8;

/// Gradients by parameter name.
type Named = Vec<(String, Vec<f32>)>;
/// A rank's summed loss, gradients, and most micro-batches alive at once.
type RankResult = (f64, Named, usize);
const MICRO: usize = 2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name).join("model")
}

/// A 6-block LLaMA with GQA, drawn from the seed.
fn six_blocks(dir: &Path) -> PathBuf {
    let model = dir.join("six");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        r#"{"architectures":["LlamaForCausalLM"],"vocab_size":96,"hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":48,"num_hidden_layers":6,"max_position_embeddings":32,"tie_word_embeddings":false}"#,
    )
    .unwrap();
    model
}

/// `m` micro-batches of `MICRO` windows of `SEQ + 1` tokens below `vocab`.
fn batches(m: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..m).map(|k| (0..MICRO * (SEQ + 1)).map(|i| ((i * 7 + k * 13 + i * i) % vocab) as u32).collect()).collect()
}

/// The whole model's summed loss and gradients (by name) over `batches`.
fn whole(dir: &Path, batches: &[Vec<u32>], scale: f32) -> (f64, Named) {
    let (model, params) = load_model(dir, ModelInit::Auto, 5).unwrap();
    let mut grads = vec![0.0; params.len()];
    let mut acts = model.activations(MICRO, SEQ).unwrap();
    let loss = batches.iter().map(|b| model.forward_backward(&params, &mut grads, &mut acts, b, scale).unwrap()).sum();
    let named = model.table.entries().iter().map(|e| (e.name.clone(), e.at.get(&grads).to_vec())).collect();
    (loss, named)
}

/// Each rank's summed loss and gradients (by name) under `kind` on `pp` ranks of `chunks`.
fn piped(dir: &Path, kind: ScheduleKind, pp: usize, chunks: usize, batches: &[Vec<u32>], scale: f32) -> Vec<RankResult> {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let batches = Arc::new(batches.to_vec());
    let handles: Vec<_> = (0..pp)
        .map(|rank| {
            let (dir, addr, batches) = (dir.to_path_buf(), addr.clone(), batches.clone());
            std::thread::spawn(move || {
                let config = ModelConfig::from_dir(&dir).unwrap();
                let schedule = Schedule::new(kind, pp, chunks, batches.len()).unwrap();
                schedule.check().unwrap();
                let cut = split_stages(&config, pp * chunks, SEQ, None).unwrap();
                let stage = PpStage::new((0..chunks).map(|c| cut[schedule.stage(rank, c)].clone()).collect(), config.layers).unwrap();
                let whole_chunks = Chunking::whole(crate::params::DEFAULT_CHUNK_ELEMS);
                let model = crate::models::Model::with_stage(config, whole_chunks, TpRank::WHOLE, SpRank::WHOLE, stage).unwrap();
                // The stage's values, read or drawn as the whole model's are.
                let (whole, all) = load_model(&dir, ModelInit::Auto, 5).unwrap();
                let mut params = vec![0.0; model.table.len()];
                for e in model.table.entries() {
                    e.at.get_mut(&mut params).copy_from_slice(whole.table.find(&e.name).unwrap().at.get(&all));
                }
                let mut grads = vec![0.0; params.len()];
                let comm = Arc::new(AsyncComm::new(Comm::connect(rank, pp, &addr, Duration::from_secs(60)).unwrap()).unwrap());
                let mut pr = PipelineRank::new(comm, Group { ranks: (0..pp).collect(), me: rank });
                let refs: Vec<&[u32]> = batches.iter().map(Vec::as_slice).collect();
                let run = pr.run(&schedule, &model, &params, &mut grads, &refs, (MICRO, SEQ), scale).unwrap();
                if model.config.tie_embeddings {
                    let wte = model.table.entries()[0].clone();
                    if wte.name.ends_with("wte.weight") || wte.name.ends_with("embed_tokens.weight") {
                        pr.tie(&schedule, &mut grads, wte.at.range()).unwrap();
                    }
                }
                let named = model.table.entries().iter().map(|e| (e.name.clone(), e.at.get(&grads).to_vec())).collect();
                (run.loss, named, run.peak_in_flight)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a stage failed")).collect()
}

fn assert_matches(what: &str, want: &(f64, Named), ranks: &[RankResult]) {
    let loss: f64 = ranks.iter().map(|r| r.0).sum();
    assert!((loss - want.0).abs() <= 1e-6 * want.0.abs(), "{what}: loss {loss} vs {}", want.0);
    let mut seen = std::collections::HashSet::new();
    for (name, g) in ranks.iter().flat_map(|r| r.1.iter()) {
        let w = &want.1.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{what}: {name} is not the model's")).1;
        let top = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let worst = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-5 * top, "{what}: {name} differs by {worst} (largest {top})");
        seen.insert(name.clone());
    }
    assert_eq!(seen.len(), want.1.len(), "{what}: every parameter is held by some stage");
}

#[test]
fn every_schedule_gives_the_whole_models_loss_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let six = six_blocks(dir.path());
    let runs = [
        (fixture("gpt2"), ScheduleKind::GPipe, 2, 1, 4),
        (fixture("gpt2"), ScheduleKind::OneFOneB, 2, 1, 4),
        (fixture("llama_gqa"), ScheduleKind::OneFOneB, 2, 1, 3),
        (fixture("llama_tied"), ScheduleKind::OneFOneB, 2, 1, 2),
        (six.clone(), ScheduleKind::OneFOneB, 4, 1, 5),
        (six.clone(), ScheduleKind::GPipe, 4, 1, 5),
        (six.clone(), ScheduleKind::Interleaved, 2, 2, 4),
        (six.clone(), ScheduleKind::Zbv, 2, 2, 4),
    ];
    for (model, kind, pp, chunks, m) in runs {
        let vocab = ModelConfig::from_dir(&model).unwrap().vocab;
        let data = batches(m, vocab.min(96));
        let scale = 1.0 / (m * MICRO * SEQ) as f32;
        let want = whole(&model, &data, scale);
        let ranks = piped(&model, kind, pp, chunks, &data, scale);
        let what = format!("{} {} pp={pp} chunks={chunks} m={m}", model.display(), kind.name());
        assert_matches(&what, &want, &ranks);
        // Activations alive at once: 1F1B's first stage holds at most pp micro-batches, GPipe's
        // all of them.
        let first = ranks[0].2;
        match kind {
            ScheduleKind::OneFOneB => assert!(first <= pp, "{what}: {first} micro-batches alive"),
            ScheduleKind::GPipe => assert_eq!(first, m, "{what}"),
            _ => {}
        }
    }
}
