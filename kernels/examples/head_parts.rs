//! Times each part of the fused LM head in place (logits GEMM, softmax, dh GEMM, dW GEMM, and
//! optionally a transposed copy of the block): `cargo run --release -p gantry-kernels --example
//! head_parts [rows] [vocab] [hidden]`; `STRIDED=1` reads the block through a transposed view.

use std::time::Instant;

use gantry_kernels::cpu::loss::softmax_xent;
use gantry_kernels::cpu::matmul::{matmul, Accumulate, MatMut, MatRef, Threads};
use rayon::prelude::*;

/// `dst = srcᵀ` (`src` row-major `[rows, cols]`), in 32-wide stripes: the copy whose cost this
/// example weighs against reading the block through a transposed view.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 32;
    dst[..rows * cols].par_chunks_mut(TILE * rows).enumerate().for_each(|(stripe, out)| {
        let (c0, width) = (stripe * TILE, out.len() / rows);
        for r0 in (0..rows).step_by(TILE) {
            for c in 0..width {
                for r in r0..(r0 + TILE).min(rows) {
                    out[c * rows + r] = src[r * cols + c0 + c];
                }
            }
        }
    });
}

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(2).build_global().unwrap();
    let rows: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let v: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(8192);
    let c: usize = std::env::args().nth(3).and_then(|a| a.parse().ok()).unwrap_or(256);
    let w: Vec<f32> = (0..v * c).map(|i| ((i * 7919) % 1000) as f32 * 1e-4 - 0.05).collect();
    let h: Vec<f32> = (0..rows * c).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
    let targets: Vec<u32> = (0..rows).map(|r| ((r * 31) % v) as u32).collect();
    let mut logits = vec![0.0f32; rows * v];
    let mut lt = vec![0.0f32; rows * v];
    let mut dh = vec![0.0f32; rows * c];
    let mut dw = vec![0.0f32; v * c];
    for rep in 0..4 {
        let t0 = Instant::now();
        matmul(
            MatMut::new(&mut logits, rows, v),
            MatRef::new(&h, rows, c),
            MatRef::new(&w, v, c).t(),
            Accumulate::Overwrite,
            Threads::Pool,
        );
        let t1 = Instant::now();
        softmax_xent(&mut logits, &targets, v, Some(1e-3));
        let t2 = Instant::now();
        matmul(MatMut::new(&mut dh, rows, c), MatRef::new(&logits, rows, v), MatRef::new(&w, v, c), Accumulate::Overwrite, Threads::Pool);
        let t3 = Instant::now();
        let strided = std::env::var("STRIDED").is_ok();
        if !strided {
            transpose(&logits, rows, v, &mut lt);
        }
        let t4 = Instant::now();
        if strided {
            matmul(MatMut::new(&mut dw, v, c), MatRef::new(&logits, rows, v).t(), MatRef::new(&h, rows, c), Accumulate::Add, Threads::Pool);
        } else {
            matmul(MatMut::new(&mut dw, v, c), MatRef::new(&lt, v, rows), MatRef::new(&h, rows, c), Accumulate::Add, Threads::Pool);
        }
        let t5 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        if rep > 0 {
            println!(
                "logits {:.1} softmax {:.1} dh {:.1} transpose {:.1} dW {:.1} (one block of {rows} rows)",
                ms(t0, t1),
                ms(t1, t2),
                ms(t2, t3),
                ms(t3, t4),
                ms(t4, t5)
            );
        }
    }
}
