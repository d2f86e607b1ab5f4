//! Nanoseconds per element of the vectorised exp-sum and of softmax cross-entropy (one thread).
use std::time::Instant;

use gantry_kernels::cpu::activation::{gelu_backward_inplace, gelu_forward, swiglu_backward};
use gantry_kernels::cpu::loss::softmax_xent;
use gantry_kernels::cpu::vec::exp_shifted_sum;
use gantry_kernels::cpu::vec::{dot, max};

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().unwrap();
    let n = 8192 * 256;
    let mut x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let (mut out, mut du) = (vec![1.0f32; n], vec![1.0f32; n]);
    for _ in 0..3 {
        let t = Instant::now();
        let mut s = 0.0;
        for row in x.chunks_mut(8192) {
            s += exp_shifted_sum(row, 1.0, 1.0);
        }
        println!("exp_shifted_sum: {:.3} ns/element ({s})", t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let targets = vec![3u32; 256];
        let t = Instant::now();
        let l = softmax_xent(&mut x, &targets, 8192, Some(1e-3));
        println!("softmax_xent: {:.3} ns/element ({l})", t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        gelu_forward(&mut out, &x);
        println!("gelu_forward: {:.3} ns/element", t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        gelu_backward_inplace(&mut out, &x);
        println!("gelu_backward: {:.3} ns/element", t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        swiglu_backward(&mut out, &mut du, &x, &x);
        println!("swiglu_backward: {:.3} ns/element", t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        let d: f32 = x.chunks(64).zip(out.chunks(64)).map(|(a, b)| dot(a, b)).sum();
        println!("dot (64-long): {:.3} ns/element ({d})", t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        let m: f32 = x.chunks(8192).map(max).sum();
        println!("max: {:.3} ns/element ({m})", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
}
