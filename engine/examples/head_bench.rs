//! Times the fused LM head + loss (forward and backward) on the bench shapes:
//! `cargo run --release -p gantry-engine --example head_bench [threads]`.

use std::time::Instant;

use gantry_engine::backend::{Cpu, Ids, Weights};
use gantry_engine::nn::LmHead;
use gantry_engine::params::ParamRef;

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().unwrap();
    for (name, rows, vocab, hidden) in [("gpt2-tiny B8 T256", 2048, 8192, 256), ("gpt2 B4 T256", 1024, 50257, 768)] {
        let head = LmHead::whole(ParamRef { offset: 0, len: vocab * hidden }, vocab, hidden);
        let params: Vec<f32> = (0..vocab * hidden).map(|i| ((i * 7919) % 1000) as f32 * 1e-4 - 0.05).collect();
        let h: Vec<f32> = (0..rows * hidden).map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5).collect();
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 31) % vocab) as u32).collect();
        let mut scratch = vec![0.0; head.scratch_len(rows)];
        let (mut grads, mut dh) = (vec![0.0; params.len()], vec![0.0; h.len()]);
        let mut times = Vec::new();
        for _ in 0..6 {
            let t = Instant::now();
            let (p, ids, mut losses) =
                (Weights::<Cpu> { w: &params, master: &params }, Ids::<Cpu> { host: &targets, dev: &(), at: 0 }, 0.0);
            let grad = Some((&mut grads[..], &mut dh[..], 1.0 / rows as f32));
            rayon::join(|| head.loss(&Cpu, p, &h, ids, &mut scratch, &mut losses, grad).unwrap(), || ());
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let flops = 6.0 * (rows * vocab * hidden) as f64;
        println!("{name}: {:.1} ms (best {:.1}), {:.0} GFLOP/s", times[3] * 1e3, times[0] * 1e3, flops / times[3] / 1e9);
    }
}

#[allow(dead_code)]
fn unused() {}
