//! GFLOP/s of the CPU matmul on the products a GPT-2 124M training step runs (B4 T256):
//! `cargo run --release -p gantry-kernels --example gemm_shapes [threads]`.

use std::time::Instant;

use gantry_kernels::cpu::matmul::{matmul, Accumulate, MatMut, MatRef, Threads};

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    let n = 1024;
    let t = 2048;
    // (name, m, k, n, a transposed, b transposed)
    let shapes = [
        ("square", 2048, 2048, 2048, false, false),
        ("tiny qkv fwd", t, 256, 768, false, false),
        ("tiny proj dx = dy·Wᵀ", t, 1024, 256, false, true),
        ("tiny proj dx = dy·(Wᵀ copy)", t, 1024, 256, false, false),
        ("tiny fc dx = dy·Wᵀ", t, 256, 1024, false, true),
        ("tiny fc dx = dy·(Wᵀ copy)", t, 256, 1024, false, false),
        ("tiny dW = xᵀ·dy", 256, t, 1024, true, false),
        ("tiny head fwd h·Eᵀ", t, 256, 8192, false, true),
        ("tiny head dh = dl·E", t, 8192, 256, false, false),
        ("tiny head dE += dlᵀ·h", 8192, t, 256, true, false),
        ("tiny head dE += (pre-transposed dl)·h", 8192, t, 256, false, false),
        ("tiny head dEᵀ-style hᵀ·dl", 256, t, 8192, true, false),
        ("qkv fwd  x·W[in,out]", n, 768, 2304, false, false),
        ("fc fwd   x·W", n, 768, 3072, false, false),
        ("proj fwd x·W", n, 3072, 768, false, false),
        ("dx = dy·Wᵀ", n, 3072, 768, false, true),
        ("dW = xᵀ·dy", 768, n, 3072, true, false),
        ("head fwd h·Eᵀ (V=50257 block)", 333, 768, 50257, false, true),
        ("head dh = dl·E", 333, 50257, 768, false, false),
        ("head dE += dlᵀ·h", 50257, 333, 768, true, false),
    ];
    for (name, m, k, nn, ta, tb) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * nn];
        let mut c = vec![0.0f32; m * nn];
        let av = if ta { MatRef::new(&a, k, m).t() } else { MatRef::new(&a, m, k) };
        let bv = if tb { MatRef::new(&b, nn, k).t() } else { MatRef::new(&b, k, nn) };
        matmul(MatMut::new(&mut c, m, nn), av, bv, Accumulate::Overwrite, Threads::Pool);
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            matmul(MatMut::new(&mut c, m, nn), av, bv, Accumulate::Add, Threads::Pool);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{name:34} {m:>6}x{k:>6}x{nn:>6}: {:>7.1} GFLOP/s", 2.0 * (m * k * nn) as f64 / s / 1e9);
    }
}
