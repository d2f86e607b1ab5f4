//! Scalar oracles: the plainest loops that state what each optimised kernel computes. Tests
//! compare the kernels against these (in f64 where it matters); nothing in the training path calls
//! them.
#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

/// `c (+)= op(a) · op(b)` with `a` stored `[m, k]` (or `[k, m]` when `ta`) and `b` stored
/// `[k, n]` (or `[n, k]` when `tb`).
pub fn matmul(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, ta: bool, tb: bool, acc: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = if acc { c[i * n + j] + s as f32 } else { s as f32 };
        }
    }
}

pub fn layernorm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(c).zip(out.chunks_mut(c)) {
        let mean = row.iter().map(|v| *v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for i in 0..c {
            o[i] = ((row[i] as f64 - mean) * rstd * w[i] as f64 + b[i] as f64) as f32;
        }
    }
    out
}

pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len();
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(c).zip(out.chunks_mut(c)) {
        let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / c as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..c {
            o[i] = (row[i] as f64 * r * w[i] as f64) as f32;
        }
    }
    out
}

/// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    let k = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())) as f32
}

pub fn silu(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// Rotary embedding in the Hugging Face (`rotate_half`) convention, on `[rows, heads, dim]` with
/// the position of row `r` being `r % seq`.
pub fn rope(x: &mut [f32], seq: usize, heads: usize, dim: usize, theta: f32) {
    let half = dim / 2;
    for (r, row) in x.chunks_mut(heads * dim).enumerate() {
        let pos = (r % seq) as f64;
        for h in row.chunks_mut(dim) {
            for i in 0..half {
                let inv = 1.0 / (theta as f64).powf(2.0 * i as f64 / dim as f64);
                let (s, c) = (pos * inv).sin_cos();
                let (a, b) = (h[i] as f64, h[i + half] as f64);
                h[i] = (a * c - b * s) as f32;
                h[i + half] = (b * c + a * s) as f32;
            }
        }
    }
}

/// Causal attention with grouped KV heads, materialising the whole score matrix. `q` is
/// `[batch*seq, heads*dim]`, `k` and `v` are `[batch*seq, kv_heads*dim]`.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], batch: usize, seq: usize, heads: usize, kv_heads: usize, dim: usize) -> Vec<f32> {
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f64).sqrt();
    let mut out = vec![0.0f32; batch * seq * heads * dim];
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / group;
            for i in 0..seq {
                let qi = &q[(b * seq + i) * heads * dim + h * dim..][..dim];
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[(b * seq + j) * kv_heads * dim + kh * dim..][..dim];
                        qi.iter().zip(kj).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..dim {
                    let mut acc = 0.0;
                    for j in 0..=i {
                        acc += (s[j] - m).exp() / z * v[(b * seq + j) * kv_heads * dim + kh * dim + d] as f64;
                    }
                    out[(b * seq + i) * heads * dim + h * dim + d] = acc as f32;
                }
            }
        }
    }
    out
}

/// Mean cross-entropy of `logits` (`[rows, vocab]`) against `targets`.
pub fn cross_entropy(logits: &[f32], targets: &[u32], vocab: usize) -> f64 {
    let mut total = 0.0;
    for (row, &t) in logits.chunks(vocab).zip(targets) {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|v| (*v as f64 - m).exp()).sum();
        total += z.ln() + m - row[t as usize] as f64;
    }
    total / targets.len() as f64
}

/// One AdamW step (PyTorch's formulation: decoupled decay applied first, bias-corrected moments).
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], lr: f32, b1: f32, b2: f32, eps: f32, wd: f32, step: u32) {
    let bc1 = 1.0 - (b1 as f64).powi(step as i32);
    let bc2 = 1.0 - (b2 as f64).powi(step as i32);
    for i in 0..p.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        let mut x = p[i] as f64 * (1.0 - lr as f64 * wd as f64);
        let denom = (v[i] as f64).sqrt() / bc2.sqrt() + eps as f64;
        x -= lr as f64 / bc1 * m[i] as f64 / denom;
        p[i] = x as f32;
    }
}

/// Gradients of [`attention`] with respect to `q`, `k`, `v` for the output gradient `dout`.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let group = heads / kv_heads;
    let scale = 1.0 / (dim as f64).sqrt();
    let (mut dq, mut dk, mut dv) = (vec![0.0f64; q.len()], vec![0.0f64; k.len()], vec![0.0f64; v.len()]);
    let qi = |b: usize, i: usize, h: usize| (b * seq + i) * heads * dim + h * dim;
    let ki = |b: usize, j: usize, h: usize| (b * seq + j) * kv_heads * dim + h * dim;
    for b in 0..batch {
        for h in 0..heads {
            let kh = h / group;
            for i in 0..seq {
                let s: Vec<f64> = (0..=i)
                    .map(|j| (0..dim).map(|x| q[qi(b, i, h) + x] as f64 * k[ki(b, j, kh) + x] as f64).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                let dp: Vec<f64> =
                    (0..=i).map(|j| (0..dim).map(|x| dout[qi(b, i, h) + x] as f64 * v[ki(b, j, kh) + x] as f64).sum()).collect();
                let delta: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - delta) * scale;
                    for x in 0..dim {
                        dq[qi(b, i, h) + x] += ds * k[ki(b, j, kh) + x] as f64;
                        dk[ki(b, j, kh) + x] += ds * q[qi(b, i, h) + x] as f64;
                        dv[ki(b, j, kh) + x] += p[j] * dout[qi(b, i, h) + x] as f64;
                    }
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    (f(dq), f(dk), f(dv))
}
