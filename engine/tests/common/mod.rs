//! Helpers shared by the GPU test crates (each uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use gantry_api::JobSpec;
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

/// The example spec (`examples/tiny-gpt2`) with `sets` applied, and the folder its paths are
/// relative to.
pub fn example_spec(sets: &[String]) -> (JobSpec, PathBuf) {
    let repo = std::env::var("GANTRY_REPO_ROOT").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/..").to_string());
    let root = Path::new(&repo).join("examples/tiny-gpt2");
    let text = std::fs::read_to_string(root.join("spec.toml")).unwrap();
    (JobSpec::from_toml(&text, sets).unwrap(), root)
}
