//! Every CUDA kernel against its CPU counterpart (itself checked against the scalar oracles and
//! finite differences in `cpu::*`). These need a GPU: without one each test says it was skipped
//! and passes, unless `GANTRY_REQUIRE_GPU=1` (set by `scripts/gpu-check`, which runs them on a GPU
//! machine), where a missing GPU fails.
#![cfg(feature = "cuda")]

use cudarc::driver::CudaSlice;
use gantry_kernels::cpu::adamw::{adamw_update, AdamWStep};
use gantry_kernels::cpu::attention::{attention_backward, attention_forward, AttnShape};
use gantry_kernels::cpu::rope::{rope_apply, RopeTable};
use gantry_kernels::cpu::{activation, embedding, loss, norm, reference, vec};
use gantry_kernels::cuda::ops::{self, Storage};
use gantry_kernels::cuda::Gpu;
use gantry_kernels::Error;

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(g) => Some(g),
        Err(e) if std::env::var("GANTRY_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("GANTRY_REQUIRE_GPU=1 but: {e}"),
    }
}

fn seeded(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Host values to and from each storage type.
trait Host: Storage {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Host for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Host for half::bf16 {
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Host for half::f16 {
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

fn up<T: Host>(g: &Gpu, x: &[f32]) -> CudaSlice<T> {
    let h: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    g.stream().clone_htod(&h).unwrap()
}

fn down<T: Host>(g: &Gpu, x: &CudaSlice<T>) -> Vec<f32> {
    g.stream().clone_dtoh(x).unwrap().into_iter().map(T::to_f32).collect()
}

/// Rounds through the storage type, so the CPU side sees the inputs the GPU saw.
fn rounded<T: Host>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| T::from_f32(v).to_f32()).collect()
}

#[track_caller]
fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "element {i}: got {g}, want {w} (tolerance {tol} of {scale})");
    }
}

/// Relative tolerance per storage type: f32 differs from the CPU in the last bits of exp/tanh;
/// 16-bit outputs are rounded to 8 (bf16) or 11 (f16) bits.
fn tol<T: Storage>() -> f32 {
    match T::SUFFIX {
        "f32" => 2e-5,
        "f16" => 2e-3,
        _ => 1.6e-2,
    }
}

fn activations<T: Host>(g: &Gpu) {
    let n = 10_000;
    let x = rounded::<T>(&seeded(n, 1, 4.0));
    let up_ = rounded::<T>(&seeded(n, 2, 2.0));
    let d = rounded::<T>(&seeded(n, 3, 1.0));

    let mut want = vec![0.0; n];
    activation::gelu_forward(&mut want, &x);
    let (xd, mut out) = (up::<T>(g, &x), up::<T>(g, &vec![0.0; n]));
    ops::gelu_forward(g, &mut out, &xd).unwrap();
    assert_close(&down(g, &out), &want, tol::<T>());

    let mut want = d.clone();
    activation::gelu_backward_inplace(&mut want, &x);
    let mut dd = up::<T>(g, &d);
    ops::gelu_backward_inplace(g, &mut dd, &xd).unwrap();
    assert_close(&down(g, &dd), &want, tol::<T>());

    let mut want = vec![0.0; n];
    activation::swiglu_forward(&mut want, &x, &up_);
    let ud = up::<T>(g, &up_);
    ops::swiglu_forward(g, &mut out, &xd, &ud).unwrap();
    assert_close(&down(g, &out), &want, tol::<T>());

    let (mut want_g, mut want_u) = (d.clone(), vec![0.0; n]);
    activation::swiglu_backward(&mut want_g, &mut want_u, &x, &up_);
    let (mut dg, mut du) = (up::<T>(g, &d), up::<T>(g, &vec![0.0; n]));
    ops::swiglu_backward(g, &mut dg, &mut du, &xd, &ud).unwrap();
    assert_close(&down(g, &dg), &want_g, tol::<T>());
    assert_close(&down(g, &du), &want_u, tol::<T>());
}

#[test]
fn activations_match_cpu() {
    let Some(g) = gpu() else { return };
    activations::<f32>(&g);
    activations::<half::bf16>(&g);
    activations::<half::f16>(&g);
}

#[test]
fn casts_round_to_nearest_even_like_the_half_crate() {
    let Some(g) = gpu() else { return };
    let mut x = seeded(4096, 4, 1000.0);
    x.extend([0.0, -0.0, 1.0 + f32::EPSILON, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, f32::NEG_INFINITY]);
    let xd = g.stream().clone_htod(&x).unwrap();
    let mut b = g.stream().alloc_zeros::<half::bf16>(x.len()).unwrap();
    ops::cast_from_f32(&g, &mut b, &xd).unwrap();
    let got: Vec<u16> = g.stream().clone_dtoh(&b).unwrap().iter().map(|v| v.to_bits()).collect();
    let want: Vec<u16> = x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    assert_eq!(got, want);
    let mut h = g.stream().alloc_zeros::<half::f16>(x.len()).unwrap();
    ops::cast_from_f32(&g, &mut h, &xd).unwrap();
    let got: Vec<u16> = g.stream().clone_dtoh(&h).unwrap().iter().map(|v| v.to_bits()).collect();
    let want: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    assert_eq!(got, want);
    let mut back = g.stream().alloc_zeros::<f32>(x.len()).unwrap();
    ops::cast_to_f32(&g, &mut back, &b).unwrap();
    let want: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(g.stream().clone_dtoh(&back).unwrap(), want);
}

fn norms<T: Host>(g: &Gpu) {
    let (rows, c) = (150, 200); // several row groups of the dw reduction, a partial last block
    let x = rounded::<T>(&seeded(rows * c, 5, 2.0));
    let w = seeded(c, 6, 1.0);
    let bias = seeded(c, 7, 1.0);
    let dout = rounded::<T>(&seeded(rows * c, 8, 1.0));
    let dx0 = rounded::<T>(&seeded(rows * c, 9, 0.5));

    let (mut out, mut mean, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows], vec![0.0; rows]);
    norm::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &bias, 1e-5);
    let (xd, wd, bd) = (up::<T>(g, &x), up::<f32>(g, &w), up::<f32>(g, &bias));
    let (mut od, mut md, mut rd) = (up::<T>(g, &vec![0.0; rows * c]), up::<f32>(g, &vec![0.0; rows]), up::<f32>(g, &vec![0.0; rows]));
    ops::layernorm_forward(g, &mut od, &mut md, &mut rd, &xd, &wd, &bd, 1e-5).unwrap();
    assert_close(&down(g, &od), &out, tol::<T>());
    assert_close(&down(g, &md), &mean, 1e-5);
    assert_close(&down(g, &rd), &rstd, 1e-5);

    let (mut dx, mut dw, mut db) = (dx0.clone(), vec![0.1; c], vec![0.2; c]);
    norm::layernorm_backward(&mut dx, &mut dw, &mut db, &dout, &x, &mean, &rstd, &w);
    let (mut dxd, mut dwd, mut dbd, dod) = (up::<T>(g, &dx0), up::<f32>(g, &vec![0.1; c]), up::<f32>(g, &vec![0.2; c]), up::<T>(g, &dout));
    ops::layernorm_backward(g, &mut dxd, &mut dwd, &mut dbd, &dod, &xd, &md, &rd, &wd).unwrap();
    assert_close(&down(g, &dxd), &dx, tol::<T>().max(1e-4));
    assert_close(&down(g, &dwd), &dw, 1e-4);
    assert_close(&down(g, &dbd), &db, 1e-4);

    let (mut out, mut rstd) = (vec![0.0; rows * c], vec![0.0; rows]);
    norm::rmsnorm_forward(&mut out, &mut rstd, &x, &w, 1e-6);
    ops::rmsnorm_forward(g, &mut od, &mut rd, &xd, &wd, 1e-6).unwrap();
    assert_close(&down(g, &od), &out, tol::<T>());
    assert_close(&down(g, &rd), &rstd, 1e-5);

    let (mut dx, mut dw) = (dx0.clone(), vec![0.1; c]);
    norm::rmsnorm_backward(&mut dx, &mut dw, &dout, &x, &rstd, &w);
    let (mut dxd, mut dwd) = (up::<T>(g, &dx0), up::<f32>(g, &vec![0.1; c]));
    ops::rmsnorm_backward(g, &mut dxd, &mut dwd, &dod, &xd, &rd, &wd).unwrap();
    assert_close(&down(g, &dxd), &dx, tol::<T>().max(1e-4));
    assert_close(&down(g, &dwd), &dw, 1e-4);

    // A bias gradient over a column block of a wider matrix.
    let (cols, stride) = (70, c);
    let mut want = vec![0.5; cols];
    vec::add_col_sums_strided(&mut want, &dout, rows, cols, stride);
    let mut got = up::<f32>(g, &vec![0.5; cols]);
    ops::add_col_sums(g, &mut got, &dod, rows, cols, stride).unwrap();
    assert_close(&down(g, &got), &want, 1e-4);
}

#[test]
fn norms_and_column_sums_match_cpu() {
    let Some(g) = gpu() else { return };
    norms::<f32>(&g);
    norms::<half::bf16>(&g);
}

#[test]
fn rope_matches_cpu_and_inverts() {
    let Some(g) = gpu() else { return };
    let (seq, heads, dim, stride) = (37, 3, 16, 3 * 16 + 8 * 2);
    let x = seeded(2 * seq * stride, 10, 1.0);
    let table = RopeTable::new(64, dim, 10000.0);
    let mut want = x.clone();
    rope_apply(&mut want, stride, heads, seq, 0, &table, false);
    let gt = ops::GpuRopeTable::upload(&g, &table).unwrap();
    let mut xd = up::<f32>(&g, &x);
    ops::rope_apply(&g, &mut xd, stride, heads, seq, 0, &gt, false).unwrap();
    assert_close(&down(&g, &xd), &want, 1e-5);
    ops::rope_apply(&g, &mut xd, stride, heads, seq, 0, &gt, true).unwrap();
    assert_close(&down(&g, &xd), &x, 1e-5);
    let err = ops::rope_apply(&g, &mut xd, stride, heads, 65, 0, &gt, false).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    // A part of a sequence (ring attention's chunk) rotated at its place: positions 20..57.
    let mut want = x.clone();
    rope_apply(&mut want, stride, heads, seq, 20, &table, false);
    let mut xd = up::<f32>(&g, &x);
    ops::rope_apply(&g, &mut xd, stride, heads, seq, 20, &gt, false).unwrap();
    assert_close(&down(&g, &xd), &want, 1e-5);
    let err = ops::rope_apply(&g, &mut xd, stride, heads, seq, 28, &gt, false).unwrap_err();
    assert!(err.to_string().contains("28..65"), "{err}");
}

#[test]
fn embedding_matches_cpu() {
    let Some(g) = gpu() else { return };
    let (vocab, seq, batch, c) = (50, 12, 3, 40);
    let tokens: Vec<u32> = (0..seq * batch).map(|i| ((i * 7) % 11) as u32).collect(); // repeats
    let (wte, wpe) = (seeded(vocab * c, 11, 1.0), seeded(seq * c, 12, 1.0));
    let mut want = vec![0.0; tokens.len() * c];
    embedding::embedding_forward(&mut want, &tokens, &wte, Some(&wpe), seq, c);
    let (td, wted, wped) = (g.stream().clone_htod(&tokens).unwrap(), up::<f32>(&g, &wte), up::<f32>(&g, &wpe));
    let mut out = up::<f32>(&g, &vec![0.0; tokens.len() * c]);
    ops::embedding_forward(&g, &mut out, &td, &wted, Some(&wped.as_view()), seq, c).unwrap();
    assert_close(&down(&g, &out), &want, 1e-6);
    // The same from table slices (as ZeRO-3 runs a table split across chunks): rows 0..4, 4..9
    // and 9..50, then the positions; every output row is written by exactly one slice.
    let mut sliced = up::<f32>(&g, &vec![f32::NAN; tokens.len() * c]);
    for rows in [0..4, 4..9, 9..vocab] {
        ops::embedding_rows(&g, &mut sliced, &td, &wted.slice(rows.start * c..rows.end * c), rows.start, c).unwrap();
    }
    ops::add_positions(&g, &mut sliced, &wped, seq, c).unwrap();
    assert_close(&down(&g, &sliced), &want, 1e-6);

    let dout = seeded(tokens.len() * c, 13, 1.0);
    let (mut dwte, mut dwpe) = (vec![0.25; vocab * c], vec![0.5; seq * c]);
    embedding::embedding_backward(&mut dwte, Some(&mut dwpe), &dout, &tokens, 0, seq, c);
    let (mut dwted, mut dwped) = (up::<f32>(&g, &vec![0.25; vocab * c]), up::<f32>(&g, &vec![0.5; seq * c]));
    ops::embedding_backward(&g, &mut dwted, Some(&mut dwped.as_view_mut()), &up::<f32>(&g, &dout), &tokens, 0, seq, c).unwrap();
    assert_close(&down(&g, &dwted), &dwte, 1e-5);
    assert_close(&down(&g, &dwped), &dwpe, 1e-5);
    // A vocabulary-parallel slice (rows 9..50): only its own tokens' rows, as the whole table's.
    let mut slice = up::<f32>(&g, &vec![0.25; (vocab - 9) * c]);
    ops::embedding_backward(&g, &mut slice, None, &up::<f32>(&g, &dout), &tokens, 9, seq, c).unwrap();
    assert_close(&down(&g, &slice), &dwte[9 * c..], 1e-5);
    let bad = ops::embedding_backward(&g, &mut dwted, None, &up::<f32>(&g, &dout), &[vocab as u32; 36], 0, seq, c).unwrap_err();
    assert!(bad.to_string().contains("outside the vocabulary"), "{bad}");
}

fn xent<T: Host>(g: &Gpu) {
    let (rows, vocab) = (9, 3001);
    let logits = rounded::<T>(&seeded(rows * vocab, 14, 8.0));
    let targets: Vec<u32> = (0..rows).map(|r| (r * 331 % vocab) as u32).collect();
    let mut want = logits.clone();
    let want_loss = loss::softmax_xent(&mut want, &targets, vocab, Some(1.0 / rows as f32));
    let mut ld = up::<T>(g, &logits);
    let got_loss = ops::softmax_xent(g, &mut ld, &g.stream().clone_htod(&targets).unwrap(), vocab, Some(1.0 / rows as f32)).unwrap();
    assert!((got_loss - want_loss).abs() < 1e-4 * want_loss.abs(), "loss {got_loss} vs {want_loss}");
    assert_close(&down(g, &ld), &want, tol::<T>().max(1e-4));
}

/// The vocabulary-parallel halves on two ranks' parts of the vocabulary (one holding no target of
/// some rows): statistics, combined on the host, then the losses and each part of the gradient,
/// against the CPU's, and together against the whole vocabulary's softmax cross-entropy.
fn xent_vocab_parallel<T: Host>(g: &Gpu) {
    let (rows, vocab, split) = (9, 3001, 1500);
    let logits = rounded::<T>(&seeded(rows * vocab, 15, 8.0));
    let targets: Vec<u32> = (0..rows).map(|r| (r * 331 % vocab) as u32).collect();
    let scale = 1.0 / rows as f32;
    let mut whole = logits.clone();
    let whole_loss = loss::softmax_xent(&mut whole, &targets, vocab, Some(scale));
    let td = g.stream().clone_htod(&targets).unwrap();
    let parts = [(0, split), (split, vocab - split)];
    let (mut host_stats, mut dev_parts) = (Vec::new(), Vec::new());
    for &(first, n) in &parts {
        let mine: Vec<f32> = logits.chunks(vocab).flat_map(|row| row[first..first + n].to_vec()).collect();
        let (mut want, mut want_stats) = (mine.clone(), vec![0.0f32; rows * loss::XENT_STATS]);
        loss::xent_stats(&mut want, &targets, n, first, &mut want_stats);
        let (mut ld, mut sd) = (up::<T>(g, &mine), g.stream().alloc_zeros::<f32>(rows * 3).unwrap());
        ops::xent_stats(g, &mut ld, &td, &mut sd, n, first).unwrap();
        let got_stats = g.stream().clone_dtoh(&sd).unwrap();
        assert_close(&got_stats, &want_stats, 1e-4);
        assert_close(&down(g, &ld), &want, tol::<T>().max(1e-5));
        host_stats.push(got_stats);
        dev_parts.push((ld, sd, want, want_stats));
    }
    let mut global = vec![0.0f32; rows * loss::XENT_STATS];
    loss::xent_combine(&host_stats.iter().map(Vec::as_slice).collect::<Vec<_>>(), &mut global);
    let gd = g.stream().clone_htod(&global).unwrap();
    for (&(first, n), (ld, sd, want, want_stats)) in parts.iter().zip(&mut dev_parts) {
        let want_loss = loss::xent_finish(want, &targets, n, first, want_stats, &global, Some(scale));
        let mut losses = g.stream().alloc_zeros::<f32>(rows).unwrap();
        ops::xent_finish(g, ld, &td, &*sd, &gd, &mut losses, n, first, Some(scale)).unwrap();
        let got_loss: f64 = g.stream().clone_dtoh(&losses).unwrap().iter().map(|&l| l as f64).sum();
        assert!((got_loss - want_loss).abs() < 1e-4 * want_loss.abs(), "loss {got_loss} vs {want_loss}");
        assert!((got_loss - whole_loss).abs() < 1e-4 * whole_loss.abs(), "loss {got_loss} vs the whole vocabulary's {whole_loss}");
        let got = down(g, ld);
        assert_close(&got, want, tol::<T>().max(1e-4));
        let whole_part: Vec<f32> = whole.chunks(vocab).flat_map(|row| row[first..first + n].to_vec()).collect();
        assert_close(&got, &whole_part, tol::<T>().max(1e-4));
    }
}

#[test]
fn vocabulary_parallel_cross_entropy_matches_cpu() {
    let Some(g) = gpu() else { return };
    xent_vocab_parallel::<f32>(&g);
    xent_vocab_parallel::<half::bf16>(&g);
}

#[test]
fn softmax_cross_entropy_matches_cpu() {
    let Some(g) = gpu() else { return };
    xent::<f32>(&g);
    xent::<half::bf16>(&g);
}

#[test]
fn adamw_matches_cpu_and_writes_the_16_bit_copy() {
    let Some(g) = gpu() else { return };
    let n = 100_003;
    let (mut p, mut m, mut v) = (seeded(n, 15, 1.0), vec![0.0; n], vec![0.0; n]);
    let (mut pd, mut md, mut vd) = (up::<f32>(&g, &p), up::<f32>(&g, &m), up::<f32>(&g, &v));
    let mut copy = g.stream().alloc_zeros::<half::bf16>(n).unwrap();
    for step in 1..=3 {
        let grad = seeded(n, 20 + step as u64, 0.1);
        let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step };
        adamw_update(&mut p, &grad, &mut m, &mut v, &hp, step != 2);
        let gd = up::<f32>(&g, &grad);
        if step == 3 {
            ops::adamw_update_copy(&g, &mut pd, &mut copy, &gd, &mut md, &mut vd, &hp, true).unwrap();
        } else {
            ops::adamw_update(&g, &mut pd, &gd, &mut md, &mut vd, &hp, step != 2).unwrap();
        }
    }
    let got = down(&g, &pd);
    assert_close(&got, &p, 1e-6);
    assert_close(&down(&g, &md), &m, 1e-6);
    assert_close(&down(&g, &vd), &v, 1e-6);
    let copy: Vec<u16> = g.stream().clone_dtoh(&copy).unwrap().iter().map(|v| v.to_bits()).collect();
    let want: Vec<u16> = got.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    assert_eq!(copy, want, "the bf16 copy is the rounded master");
}

#[test]
fn gradient_norm_and_overflow_check() {
    let Some(g) = gpu() else { return };
    let x = seeded(1_000_001, 30, 1.0);
    let mut xd = up::<f32>(&g, &x);
    let got = ops::sum_squares(&g, &xd).unwrap();
    let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
    // Over pieces (a ZeRO rank's), empty ones included.
    let pieces = [0..5, 5..5, 1000..300_000, 999_990..1_000_001];
    let got = ops::sum_squares_pieces(&g, &xd, &pieces).unwrap();
    let want: f64 = pieces.iter().flat_map(|p| &x[p.clone()]).map(|&v| v as f64 * v as f64).sum();
    assert!((got - want).abs() < 1e-5 * want, "pieces: {got} vs {want}");
    assert!(ops::sum_squares_pieces(&g, &xd, std::slice::from_ref(&(0..1_000_002))).is_err(), "a piece past the end is refused");
    assert!(!ops::unscale_check(&g, &mut xd, 0.5).unwrap());
    assert_close(&down(&g, &xd), &x.iter().map(|v| v * 0.5).collect::<Vec<_>>(), 0.0);
    let mut bad = x.clone();
    bad[123_456] = f32::INFINITY;
    let mut bd = up::<f32>(&g, &bad);
    assert!(ops::unscale_check(&g, &mut bd, 0.5).unwrap(), "an infinite gradient is reported");
    // Over pieces: only they are unscaled, and only their overflow counts.
    let pieces = [10..100_000, 500_000..600_000];
    let mut pd = up::<f32>(&g, &bad);
    assert!(!ops::unscale_check_pieces(&g, &mut pd, &pieces, 0.25).unwrap(), "the infinity lies outside the pieces");
    let got = down(&g, &pd);
    let want: Vec<f32> = bad.iter().enumerate().map(|(i, v)| if pieces.iter().any(|p| p.contains(&i)) { v * 0.25 } else { *v }).collect();
    assert_eq!(got[..1000], want[..1000]);
    assert_eq!(got[500_000..500_100], want[500_000..500_100]);
    let mut pd = up::<f32>(&g, &bad);
    assert!(ops::unscale_check_pieces(&g, &mut pd, &[0..10, 100_000..200_000], 0.5).unwrap(), "the piece holding it reports it");
}

fn attention<T: Host>(g: &Gpu, s: AttnShape, tol_fwd: f32, tol_bwd: f32) {
    let qkv = rounded::<T>(&seeded(s.batch * s.seq * s.qkv_width(), 40, 1.5));
    let dout = rounded::<T>(&seeded(s.batch * s.seq * s.out_width(), 41, 1.0));
    let (mut out, mut lse) = (vec![0.0; dout.len()], vec![0.0; s.batch * s.seq * s.heads]);
    attention_forward(s, &qkv, &mut out, &mut lse);
    let mut dqkv = vec![0.0; qkv.len()];
    attention_backward(s, &qkv, &out, &lse, &dout, &mut dqkv);

    let qd = up::<T>(g, &qkv);
    let (mut od, mut ld) = (up::<T>(g, &vec![0.0; out.len()]), up::<f32>(g, &vec![0.0; lse.len()]));
    ops::attention_forward(g, s, &qd, &mut od, &mut ld).unwrap();
    assert_close(&down(g, &od), &out, tol_fwd);
    assert_close(&down(g, &ld), &lse, 1e-5);
    // The backward from the CPU's saved statistics, so the two differ only in the backward itself.
    let (od_cpu, dod) = (up::<T>(g, &out), up::<T>(g, &dout));
    let mut dq = up::<T>(g, &vec![f32::NAN; qkv.len()]); // every element must be written
    ops::attention_backward(g, s, &qd, &od_cpu, &up::<f32>(g, &lse), &dod, &mut dq).unwrap();
    assert_close(&down(g, &dq), &dqkv, tol_bwd);
}

#[test]
fn attention_matches_cpu_forward_and_backward() {
    let Some(g) = gpu() else { return };
    // GQA, a sequence that fills no tile evenly, small and GPT-2/LLaMA head sizes.
    for s in [
        AttnShape { batch: 2, seq: 150, heads: 4, kv_heads: 2, dim: 8 },
        AttnShape { batch: 1, seq: 77, heads: 6, kv_heads: 1, dim: 12 },
        AttnShape { batch: 2, seq: 256, heads: 4, kv_heads: 4, dim: 64 },
        AttnShape { batch: 1, seq: 130, heads: 8, kv_heads: 2, dim: 128 },
    ] {
        attention::<f32>(&g, s, 1e-5, 1e-4);
    }
    attention::<half::bf16>(&g, AttnShape { batch: 2, seq: 150, heads: 4, kv_heads: 2, dim: 64 }, 2e-2, 3e-2);
    let too_wide = AttnShape { batch: 1, seq: 4, heads: 1, kv_heads: 1, dim: 256 };
    let buf = up::<f32>(&g, &vec![0.0; 4 * 3 * 256]);
    let err = ops::attention_forward(&g, too_wide, &buf, &mut up::<f32>(&g, &[0.0; 1024]), &mut up::<f32>(&g, &[0.0; 4])).unwrap_err();
    assert!(err.to_string().contains("head dimension 256"), "{err}");
}

#[test]
fn matmul_matches_the_oracle_in_every_transpose() {
    let Some(g) = gpu() else { return };
    let (m, k, n) = (67, 129, 45);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = seeded(m * k, 50, 1.0);
        let b = seeded(k * n, 51, 1.0);
        let c0 = seeded(m * n, 52, 1.0);
        for acc in [false, true] {
            let mut want = c0.clone();
            reference::matmul(&mut want, &a, &b, m, k, n, ta, tb, acc);
            let mut cd = up::<f32>(&g, &c0);
            ops::matmul(&g, &mut cd, &up::<f32>(&g, &a), &up::<f32>(&g, &b), m, k, n, ta, tb, acc).unwrap();
            // TF32 keeps 10 mantissa bits of each input.
            assert_close(&down(&g, &cd), &want, 5e-3);
            let (ab, bb) = (rounded::<half::bf16>(&a), rounded::<half::bf16>(&b));
            let mut want = rounded::<half::bf16>(&c0);
            reference::matmul(&mut want, &ab, &bb, m, k, n, ta, tb, acc);
            let mut cd = up::<half::bf16>(&g, &c0);
            ops::matmul(&g, &mut cd, &up::<half::bf16>(&g, &ab), &up::<half::bf16>(&g, &bb), m, k, n, ta, tb, acc).unwrap();
            assert_close(&down(&g, &cd), &want, 1.6e-2);
        }
    }
}

#[test]
fn strided_matmul_bias_and_accumulate_match_the_cpu() {
    let Some(g) = gpu() else { return };
    // y[:, 8..8+n] of a [m, 40] buffer = x[:, 0..k] of a [m, 30] buffer · Wᵀ (W stored [n, k]) + b.
    let (m, k, n) = (33, 20, 12);
    let (x, w, bias, y0) = (seeded(m * 30, 60, 1.0), seeded(n * k, 61, 1.0), seeded(n, 62, 1.0), seeded(m * 40, 63, 1.0));
    let mut want = y0.clone();
    for r in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| x[r * 30 + p] as f64 * w[j * k + p] as f64).sum();
            want[r * 40 + 8 + j] = (bias[j] as f64 + dot) as f32;
        }
    }
    let mut yd = up::<f32>(&g, &y0);
    {
        let mut block = yd.slice_mut(8..);
        ops::add_bias(&g, &mut block, &up::<f32>(&g, &bias), m, 40, true).unwrap();
        let ld = ops::Strides { a: 30, b: k, c: 40 };
        ops::matmul_strided(&g, &mut block, &up::<f32>(&g, &x), &up::<f32>(&g, &w), m, k, n, false, true, ld, true).unwrap();
    }
    assert_close(&down(&g, &yd), &want, 5e-3);

    let (acc0, inc) = (seeded(1000, 64, 1.0), rounded::<half::bf16>(&seeded(1000, 65, 1.0)));
    let mut ad = up::<f32>(&g, &acc0);
    ops::accumulate(&g, &mut ad, &up::<half::bf16>(&g, &inc)).unwrap();
    assert_close(&down(&g, &ad), &acc0.iter().zip(&inc).map(|(a, b)| a + b).collect::<Vec<_>>(), 1e-7);
}

#[test]
fn a_missing_device_is_an_error_naming_it() {
    let Some(_g) = gpu() else { return };
    let err = Gpu::open(99).unwrap_err();
    assert!(matches!(err, Error::NoDevice { ordinal: 99, .. }), "{err}");
}
