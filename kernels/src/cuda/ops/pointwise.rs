//! Pointwise launchers: activations and their backward, precision casts, scaling, the gradient
//! norm, loss-scale checks, biases, and buffer copies.

use super::*;

/// `out = gelu(x)` (tanh approximation).
pub fn gelu_forward<T: Storage>(gpu: &Gpu, out: &mut impl Out<T>, x: &impl In<T>) -> Result<()> {
    let mut out = out.view_mut();
    let x = x.view();
    let n = x.len();
    check_len("gelu out", out.len(), n)?;
    let name = format!("gelu_fwd_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&x).arg(&n64);
    // SAFETY: the kernel reads and writes n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// `d *= gelu'(x)`, in place.
pub fn gelu_backward_inplace<T: Storage>(gpu: &Gpu, d: &mut impl Out<T>, x: &impl In<T>) -> Result<()> {
    let mut d = d.view_mut();
    let x = x.view();
    let n = x.len();
    check_len("gelu grad", d.len(), n)?;
    let name = format!("gelu_bwd_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut d).arg(&x).arg(&n64);
    // SAFETY: n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// `out = silu(gate) * up`.
pub fn swiglu_forward<T: Storage>(gpu: &Gpu, out: &mut impl Out<T>, gate: &impl In<T>, up: &impl In<T>) -> Result<()> {
    let mut out = out.view_mut();
    let gate = gate.view();
    let up = up.view();
    let n = gate.len();
    check_len("swiglu out", out.len(), n)?;
    check_len("swiglu up", up.len(), n)?;
    let name = format!("swiglu_fwd_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&gate).arg(&up).arg(&n64);
    // SAFETY: n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// Given `d_out` in `d_gate`, writes the gate gradient there and the up gradient into `d_up`.
pub fn swiglu_backward<T: Storage>(
    gpu: &Gpu,
    d_gate: &mut impl Out<T>,
    d_up: &mut impl Out<T>,
    gate: &impl In<T>,
    up: &impl In<T>,
) -> Result<()> {
    let mut d_gate = d_gate.view_mut();
    let mut d_up = d_up.view_mut();
    let gate = gate.view();
    let up = up.view();
    let n = gate.len();
    for (what, len) in [("swiglu d_gate", d_gate.len()), ("swiglu d_up", d_up.len()), ("swiglu up", up.len())] {
        check_len(what, len, n)?;
    }
    let name = format!("swiglu_bwd_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut d_gate).arg(&mut d_up).arg(&gate).arg(&up).arg(&n64);
    // SAFETY: n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// `out = T(x)`, rounding to nearest even.
pub fn cast_from_f32<T: Storage>(gpu: &Gpu, out: &mut impl Out<T>, x: &impl In<f32>) -> Result<()> {
    let mut out = out.view_mut();
    let x = x.view();
    let n = x.len();
    check_len("cast out", out.len(), n)?;
    let name = format!("cast_f32_to_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&x).arg(&n64);
    // SAFETY: n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// `out = f32(x)`.
pub fn cast_to_f32<T: Storage>(gpu: &Gpu, out: &mut impl Out<f32>, x: &impl In<T>) -> Result<()> {
    let mut out = out.view_mut();
    let x = x.view();
    let n = x.len();
    check_len("cast out", out.len(), n)?;
    let name = format!("cast_{}_to_f32", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&x).arg(&n64);
    // SAFETY: n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// `x *= s`.
pub fn scale(gpu: &Gpu, x: &mut impl Out<f32>, s: f32) -> Result<()> {
    let mut x = x.view_mut();
    let n = x.len();
    let f = gpu.function("elementwise", "scale_f32")?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut x).arg(&s).arg(&n64);
    // SAFETY: n elements of a buffer of n.
    launched("scale_f32", unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// Sum of squares of `x` (for the global gradient norm). Block partials are added on the host
/// in f64, in a fixed order.
pub fn sum_squares(gpu: &Gpu, x: &impl In<f32>) -> Result<f64> {
    let n = x.view().len();
    sum_squares_pieces(gpu, x, std::slice::from_ref(&(0..n)))
}

/// The sum of squares of `x` over `pieces` (ranges of it), with one copy back to the host for all
/// of them: a ZeRO rank's gradient norm over the pieces it owns.
pub fn sum_squares_pieces(gpu: &Gpu, x: &impl In<f32>, pieces: &[std::ops::Range<usize>]) -> Result<f64> {
    let x = x.view();
    if let Some(p) = pieces.iter().find(|p| p.start > p.end || p.end > x.len()) {
        return Err(Error::Shape(format!("sum_squares: piece {p:?} lies outside {} elements", x.len())));
    }
    let blocks: Vec<usize> = pieces.iter().map(|p| p.len().div_ceil(THREADS as usize).clamp(1, 1024)).collect();
    let total = blocks.iter().sum::<usize>().max(1);
    let mut partial = gpu.stream().alloc_zeros::<f32>(total).map_err(|e| Error::cuda("allocating partial sums", e))?;
    let f = gpu.function("elementwise", "sum_squares_partial_f32")?;
    let mut at = 0;
    for (p, &nb) in pieces.iter().zip(&blocks) {
        if !p.is_empty() {
            let xs = x.slice(p.clone());
            let mut out = partial.slice_mut(at..at + nb);
            let n64 = p.len() as u64;
            let cfg = LaunchConfig { grid_dim: (nb as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
            let mut b = gpu.stream().launch_builder(&f);
            b.arg(&mut out).arg(&xs).arg(&n64);
            // SAFETY: one partial per block into this piece's nb slots; n elements of the piece.
            launched("sum_squares_partial_f32", unsafe { b.launch(cfg) }.map(|_| ()))?;
        }
        at += nb;
    }
    let host = gpu.stream().clone_dtoh(&partial).map_err(|e| Error::cuda("copying partial sums", e))?;
    Ok(host.iter().map(|&v| v as f64).sum())
}

/// Loss scaling: `g *= inv_scale`; returns whether any element is not finite (the step must
/// then be skipped).
pub fn unscale_check(gpu: &Gpu, g: &mut impl Out<f32>, inv_scale: f32) -> Result<bool> {
    let n = g.view_mut().len();
    unscale_check_pieces(gpu, g, std::slice::from_ref(&(0..n)), inv_scale)
}

/// As [`unscale_check`] over `pieces` (ranges of `g`), with one overflow flag and one read back
/// for all of them: a ZeRO rank's check of the sums it owns.
pub fn unscale_check_pieces(gpu: &Gpu, g: &mut impl Out<f32>, pieces: &[std::ops::Range<usize>], inv_scale: f32) -> Result<bool> {
    let mut g = g.view_mut();
    if let Some(p) = pieces.iter().find(|p| p.start > p.end || p.end > g.len()) {
        return Err(Error::Shape(format!("unscale_check: piece {p:?} lies outside {} elements", g.len())));
    }
    let mut flag = gpu.stream().alloc_zeros::<i32>(1).map_err(|e| Error::cuda("allocating the overflow flag", e))?;
    let f = gpu.function("elementwise", "unscale_check_f32")?;
    for p in pieces.iter().filter(|p| !p.is_empty()) {
        let mut gp = g.slice_mut(p.clone());
        let n64 = p.len() as u64;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(&mut gp).arg(&inv_scale).arg(&mut flag).arg(&n64);
        // SAFETY: p.len() elements of the piece's view; one flag.
        launched("unscale_check_f32", unsafe { b.launch(elementwise(p.len())) }.map(|_| ()))?;
    }
    let host = gpu.stream().clone_dtoh(&flag).map_err(|e| Error::cuda("reading the overflow flag", e))?;
    Ok(host[0] != 0)
}

/// `y[r, :cols] (+)= bias` for `rows` rows of row stride `stride`: a linear layer's bias,
/// written first (`overwrite`) so the matmul then accumulates onto it.
pub fn add_bias<T: Storage>(
    gpu: &Gpu,
    y: &mut impl Out<T>,
    bias: &impl In<f32>,
    rows: usize,
    stride: usize,
    overwrite: bool,
) -> Result<()> {
    let mut y = y.view_mut();
    let bias = bias.view();
    let cols = bias.len();
    if cols > stride {
        return Err(Error::Shape(format!("bias of {cols} wider than the row stride {stride}")));
    }
    if rows > 0 {
        check_len("bias output", y.len(), (rows - 1) * stride + cols)?;
    }
    let name = format!("add_bias_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let (rows32, cols32, stride32, ow) = (u32_of("rows", rows)?, cols as u32, u32_of("row stride", stride)?, overwrite as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut y).arg(&bias).arg(&rows32).arg(&cols32).arg(&stride32).arg(&ow);
    // SAFETY: rows strided rows of cols elements, checked above.
    launched(&name, unsafe { b.launch(elementwise(rows * cols)) }.map(|_| ()))
}

/// `y += f32(x)`.
pub fn accumulate<T: Storage>(gpu: &Gpu, y: &mut impl Out<f32>, x: &impl In<T>) -> Result<()> {
    let mut y = y.view_mut();
    let x = x.view();
    let n = x.len();
    check_len("accumulate target", y.len(), n)?;
    let name = format!("accumulate_{}", T::SUFFIX);
    let f = gpu.function("elementwise", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut y).arg(&x).arg(&n64);
    // SAFETY: n elements of buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// `dst = src` on the device.
pub fn copy<T: Storage>(gpu: &Gpu, dst: &mut impl Out<T>, src: &impl In<T>) -> Result<()> {
    let mut dst = dst.view_mut();
    let src = src.view();
    if dst.len() != src.len() {
        return Err(Error::Shape(format!("copy of {} elements into {}", src.len(), dst.len())));
    }
    gpu.stream().memcpy_dtod(&src, &mut dst).map_err(|e| Error::cuda("device copy", e))
}

/// Sets every element to zero.
pub fn zero<T: Storage>(gpu: &Gpu, x: &mut impl Out<T>) -> Result<()> {
    let mut x = x.view_mut();
    gpu.stream().memset_zeros(&mut x).map_err(|e| Error::cuda("zeroing a buffer", e))
}
