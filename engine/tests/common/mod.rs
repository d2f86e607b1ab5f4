//! Helpers shared by the GPU test crates (each uses some of them).
#![allow(dead_code)]

use std::path::Path;

use gantry_engine::config::{Schedule, TrainConfig};
use gantry_kernels::cuda::Gpu;

/// Whether to skip: without a GPU the test says so and passes, unless `GANTRY_REQUIRE_GPU=1`.
fn skip(why: &str) {
    if std::env::var("GANTRY_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("GANTRY_REQUIRE_GPU=1 but: {why}");
    }
    eprintln!("skipped: {why}");
}

/// GPU 0, or `None` (the test is skipped) without one.
pub fn gpu() -> Option<Gpu> {
    Gpu::open(0).map_err(|e| skip(&e.to_string())).ok()
}

/// How many GPUs the machine has, or `None` (the test is skipped) without one.
pub fn gpu_count() -> Option<usize> {
    match gantry_kernels::cuda::list_gpus() {
        Ok(l) if !l.is_empty() => Some(l.len()),
        r => {
            skip(&format!("no GPU ({:?})", r.err().map(|e| e.to_string())));
            None
        }
    }
}

/// A free local address for a rendezvous.
pub fn rendezvous() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// The run of the example spec (`examples/tiny-gpt2/spec.toml`: a small GPT-2 from scratch on
/// the example corpus, tokenized on the fly) on one CPU rank, without checkpoints, for `steps`
/// steps with a warmup of 2.
pub fn example_config(steps: u64) -> TrainConfig {
    let repo = std::env::var("GANTRY_REPO_ROOT").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/..").to_string());
    let examples = Path::new(&repo).join("examples");
    let mut c = TrainConfig::new(examples.join("tiny-gpt2/model"), examples.join("data/corpus.txt"));
    c.data.tokenizer = Some(examples.join("data/tokenizer.json"));
    c.data.seq_len = 128;
    let o = &mut c.optim;
    (o.steps, o.global_batch, o.micro_batch, o.warmup_steps, o.schedule) = (steps, 16, 8, 2, Schedule::Cosine);
    (o.lr, o.min_lr, o.weight_decay, o.grad_clip) = (3e-3, 3e-4, 0.1, 1.0);
    c
}
