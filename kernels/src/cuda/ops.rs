//! Host-side launchers for the CUDA kernels, one per engine operation, with the same semantics
//! as the CPU kernels in `crate::cpu` (which are their oracles in the GPU tests). Every launcher
//! checks buffer sizes before launching, since a kernel given a short buffer would write out of
//! bounds instead of failing.
//!
//! Generic launchers take a storage type `T` (`f32`, `half::bf16`, `half::f16`); activations are
//! stored in `T` and computed in f32. Parameters, gradients, optimizer state, norm statistics and
//! the attention log-sum-exp are always f32.

use cudarc::cublaslt::{Matmul, MatmulConfig};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::Gpu;
use crate::cpu::adamw::AdamWStep;
use crate::cpu::attention::AttnShape;
use crate::cpu::rope::RopeTable;
use crate::{Error, Result};

/// A storage type the kernels are instantiated for.
pub trait Storage: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + Send + Sync + 'static {
    /// The kernel-name suffix: `gelu_fwd_` + `SUFFIX`.
    const SUFFIX: &'static str;
}

impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Storage for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl Storage for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// A device buffer an operation reads: a whole allocation or a view of part of one (a parameter
/// inside the flat buffer, a layer's slice of an activation stack).
pub trait In<T> {
    fn view(&self) -> CudaView<'_, T>;
}

/// A device buffer an operation writes.
pub trait Out<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T>;
}

impl<T> In<T> for CudaSlice<T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
}

impl<T> In<T> for CudaView<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
}

impl<T> In<T> for CudaViewMut<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
}

impl<T> Out<T> for CudaSlice<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.as_view_mut()
    }
}

impl<T> Out<T> for CudaViewMut<'_, T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice_mut(..)
    }
}

const THREADS: u32 = 256;

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::Shape(format!("{what}: buffer holds {got} elements, the operation needs {want}")));
    }
    Ok(())
}

fn launched(name: &str, r: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
    r.map(|_| ()).map_err(|e| Error::cuda(format!("launching {name}"), e))
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds the kernels' 32-bit index")))
}

/// Rows per partial sum in the column reductions (norm weight and bias gradients).
const ROWS_PER_PART: usize = 64;

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
    let x = x.view();
    let n = x.len();
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1024);
    let mut partial = gpu.stream().alloc_zeros::<f32>(blocks).map_err(|e| Error::cuda("allocating partial sums", e))?;
    let f = gpu.function("elementwise", "sum_squares_partial_f32")?;
    let n64 = n as u64;
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut partial).arg(&x).arg(&n64);
    // SAFETY: one partial per block; n elements of x.
    launched("sum_squares_partial_f32", unsafe { b.launch(cfg) }.map(|_| ()))?;
    let host = gpu.stream().clone_dtoh(&partial).map_err(|e| Error::cuda("copying partial sums", e))?;
    Ok(host.iter().map(|&v| v as f64).sum())
}

/// Loss scaling: `g *= inv_scale`; returns whether any element is not finite (the step must
/// then be skipped).
pub fn unscale_check(gpu: &Gpu, g: &mut impl Out<f32>, inv_scale: f32) -> Result<bool> {
    let mut g = g.view_mut();
    let n = g.len();
    let mut flag = gpu.stream().alloc_zeros::<i32>(1).map_err(|e| Error::cuda("allocating the overflow flag", e))?;
    let f = gpu.function("elementwise", "unscale_check_f32")?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut g).arg(&inv_scale).arg(&mut flag).arg(&n64);
    // SAFETY: n elements of g; one flag.
    launched("unscale_check_f32", unsafe { b.launch(elementwise(n)) }.map(|_| ()))?;
    let host = gpu.stream().clone_dtoh(&flag).map_err(|e| Error::cuda("reading the overflow flag", e))?;
    Ok(host[0] != 0)
}

fn row_block(c: usize) -> u32 {
    // One block per row; enough threads for the row, a multiple of 32, at most 1024.
    (c.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// `out = (x - mean) * rstd * w + b` over rows of `w.len()`, saving `mean` and `rstd` per row.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    mean: &mut impl Out<f32>,
    rstd: &mut impl Out<f32>,
    x: &impl In<T>,
    w: &impl In<f32>,
    bias: &impl In<f32>,
    eps: f32,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut mean = mean.view_mut();
    let mut rstd = rstd.view_mut();
    let x = x.view();
    let w = w.view();
    let bias = bias.view();
    let c = w.len();
    let rows = x.len() / c;
    check_len("layernorm out", out.len(), rows * c)?;
    check_len("layernorm mean", mean.len(), rows)?;
    check_len("layernorm rstd", rstd.len(), rows)?;
    check_len("layernorm bias", bias.len(), c)?;
    let name = format!("layernorm_fwd_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let c32 = u32_of("layernorm width", c)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&mut mean).arg(&mut rstd).arg(&x).arg(&w).arg(&bias).arg(&c32).arg(&eps);
    // SAFETY: one block per row of c; buffer sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Column sums of per-row-group partials into `out` (accumulating).
fn reduce_parts(gpu: &Gpu, out: &mut impl Out<f32>, parts: &impl In<f32>, nparts: usize, c: usize) -> Result<()> {
    let mut out = out.view_mut();
    let parts = parts.view();
    let f = gpu.function("norm", "col_sum_parts_f32")?;
    let (np, c32) = (nparts as u32, c as u32);
    let cfg = LaunchConfig { grid_dim: (c.div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&parts).arg(&np).arg(&c32);
    // SAFETY: parts holds nparts*c, out c.
    launched("col_sum_parts_f32", unsafe { b.launch(cfg) }.map(|_| ()))
}

fn parts_grid(rows: usize, c: usize) -> (usize, LaunchConfig) {
    let nparts = rows.div_ceil(ROWS_PER_PART).max(1);
    (
        nparts,
        LaunchConfig { grid_dim: (c.div_ceil(THREADS as usize) as u32, nparts as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 },
    )
}

/// Accumulates `dx += ∂L/∂x`, `dw += ∂L/∂w`, `db += ∂L/∂b`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Storage>(
    gpu: &Gpu,
    dx: &mut impl Out<T>,
    dw: &mut impl Out<f32>,
    db: &mut impl Out<f32>,
    dout: &impl In<T>,
    x: &impl In<T>,
    mean: &impl In<f32>,
    rstd: &impl In<f32>,
    w: &impl In<f32>,
) -> Result<()> {
    let mut dx = dx.view_mut();
    let mut dw = dw.view_mut();
    let mut db = db.view_mut();
    let dout = dout.view();
    let x = x.view();
    let mean = mean.view();
    let rstd = rstd.view();
    let w = w.view();
    let c = w.len();
    let rows = x.len() / c;
    for (what, len, want) in [
        ("layernorm dx", dx.len(), rows * c),
        ("layernorm dout", dout.len(), rows * c),
        ("layernorm dw", dw.len(), c),
        ("layernorm db", db.len(), c),
        ("layernorm mean", mean.len(), rows),
        ("layernorm rstd", rstd.len(), rows),
    ] {
        check_len(what, len, want)?;
    }
    let c32 = u32_of("layernorm width", c)?;
    let name = format!("layernorm_bwd_dx_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut dx).arg(&dout).arg(&x).arg(&mean).arg(&rstd).arg(&w).arg(&c32);
    // SAFETY: one block per row; sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let (nparts, cfg) = parts_grid(rows, c);
    let stream = gpu.stream();
    let mut part_dw = stream.alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let mut part_db = stream.alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let name = format!("layernorm_bwd_dwdb_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let (rows32, rpp) = (rows as u32, ROWS_PER_PART as u32);
    let mut b = stream.launch_builder(&f);
    b.arg(&mut part_dw).arg(&mut part_db).arg(&dout).arg(&x).arg(&mean).arg(&rstd).arg(&rows32).arg(&c32).arg(&rpp);
    // SAFETY: nparts*c partials; rows*c inputs.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    reduce_parts(gpu, &mut dw, &part_dw, nparts, c)?;
    reduce_parts(gpu, &mut db, &part_db, nparts, c)
}

/// `out = x * rstd * w`, saving `rstd` per row.
pub fn rmsnorm_forward<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    rstd: &mut impl Out<f32>,
    x: &impl In<T>,
    w: &impl In<f32>,
    eps: f32,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut rstd = rstd.view_mut();
    let x = x.view();
    let w = w.view();
    let c = w.len();
    let rows = x.len() / c;
    check_len("rmsnorm out", out.len(), rows * c)?;
    check_len("rmsnorm rstd", rstd.len(), rows)?;
    let name = format!("rmsnorm_fwd_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let c32 = u32_of("rmsnorm width", c)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&mut rstd).arg(&x).arg(&w).arg(&c32).arg(&eps);
    // SAFETY: one block per row of c; sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Accumulates `dx += ∂L/∂x` and `dw += ∂L/∂w`.
pub fn rmsnorm_backward<T: Storage>(
    gpu: &Gpu,
    dx: &mut impl Out<T>,
    dw: &mut impl Out<f32>,
    dout: &impl In<T>,
    x: &impl In<T>,
    rstd: &impl In<f32>,
    w: &impl In<f32>,
) -> Result<()> {
    let mut dx = dx.view_mut();
    let mut dw = dw.view_mut();
    let dout = dout.view();
    let x = x.view();
    let rstd = rstd.view();
    let w = w.view();
    let c = w.len();
    let rows = x.len() / c;
    for (what, len, want) in [
        ("rmsnorm dx", dx.len(), rows * c),
        ("rmsnorm dout", dout.len(), rows * c),
        ("rmsnorm dw", dw.len(), c),
        ("rmsnorm rstd", rstd.len(), rows),
    ] {
        check_len(what, len, want)?;
    }
    let c32 = u32_of("rmsnorm width", c)?;
    let name = format!("rmsnorm_bwd_dx_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (row_block(c), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut dx).arg(&dout).arg(&x).arg(&rstd).arg(&w).arg(&c32);
    // SAFETY: one block per row; sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let (nparts, cfg) = parts_grid(rows, c);
    let mut part_dw = gpu.stream().alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let name = format!("rmsnorm_bwd_dw_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let (rows32, rpp) = (rows as u32, ROWS_PER_PART as u32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut part_dw).arg(&dout).arg(&x).arg(&rstd).arg(&rows32).arg(&c32).arg(&rpp);
    // SAFETY: nparts*c partials; rows*c inputs.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    reduce_parts(gpu, &mut dw, &part_dw, nparts, c)
}

/// Accumulates the column sums of the `[rows, c]` matrix at the start of each `row_stride`-wide
/// row of `x` into `out` (a bias gradient).
pub fn add_col_sums<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<f32>,
    x: &impl In<T>,
    rows: usize,
    c: usize,
    row_stride: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let x = x.view();
    check_len("col sums out", out.len(), c)?;
    if rows > 0 {
        check_len("col sums input", x.len(), (rows - 1) * row_stride + c)?;
    }
    let (nparts, cfg) = parts_grid(rows, c);
    let mut parts = gpu.stream().alloc_zeros::<f32>(nparts * c).map_err(|e| Error::cuda("allocating partials", e))?;
    let name = format!("col_sums_partial_{}", T::SUFFIX);
    let f = gpu.function("norm", &name)?;
    let (rows32, c32, stride32, rpp) =
        (u32_of("rows", rows)?, u32_of("columns", c)?, u32_of("row stride", row_stride)?, ROWS_PER_PART as u32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut parts).arg(&x).arg(&rows32).arg(&c32).arg(&stride32).arg(&rpp);
    // SAFETY: reads rows strided rows of c; writes nparts*c partials.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    reduce_parts(gpu, &mut out, &parts, nparts, c)
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

/// A rotary table on the device, uploaded from the CPU table so both paths rotate by the same
/// angles.
pub struct GpuRopeTable {
    pub half: usize,
    pub positions: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl GpuRopeTable {
    pub fn upload(gpu: &Gpu, table: &RopeTable) -> Result<Self> {
        let s = gpu.stream();
        Ok(GpuRopeTable {
            half: table.half,
            positions: table.positions(),
            cos: s.clone_htod(table.cos()).map_err(|e| Error::cuda("uploading the rope table", e))?,
            sin: s.clone_htod(table.sin()).map_err(|e| Error::cuda("uploading the rope table", e))?,
        })
    }
}

/// Rotates heads `0..heads` at the start of every `row_stride`-wide row of `x` (row r at
/// position r % seq); `inverse` is the backward pass.
pub fn rope_apply<T: Storage>(
    gpu: &Gpu,
    x: &mut impl Out<T>,
    row_stride: usize,
    heads: usize,
    seq: usize,
    table: &GpuRopeTable,
    inverse: bool,
) -> Result<()> {
    let mut x = x.view_mut();
    if heads * 2 * table.half > row_stride || seq > table.positions {
        return Err(Error::Shape(format!(
            "rope: {heads} heads of {} at {seq} positions exceed a row of {row_stride} or the table's {} positions",
            2 * table.half,
            table.positions
        )));
    }
    let rows = x.len() / row_stride;
    let name = format!("rope_{}", T::SUFFIX);
    let f = gpu.function("rope", &name)?;
    let (rows32, stride32, heads32, seq32, half32, inv) =
        (u32_of("rows", rows)?, row_stride as u32, heads as u32, seq as u32, table.half as u32, inverse as i32);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut x).arg(&table.cos).arg(&table.sin).arg(&rows32).arg(&stride32).arg(&heads32).arg(&seq32).arg(&half32).arg(&inv);
    // SAFETY: touches rows*heads*2*half elements inside rows of row_stride; table covers seq.
    launched(&name, unsafe { b.launch(elementwise(rows * heads * table.half)) }.map(|_| ()))
}

/// `out[r] = wte[tokens[r]] (+ wpe[r % seq])`, rows of width `c`.
pub fn embedding_forward<T: Storage>(
    gpu: &Gpu,
    out: &mut impl Out<T>,
    tokens: &impl In<u32>,
    wte: &impl In<f32>,
    wpe: Option<&CudaView<'_, f32>>,
    seq: usize,
    c: usize,
) -> Result<()> {
    let mut out = out.view_mut();
    let tokens = tokens.view();
    let wte = wte.view();
    let rows = tokens.len();
    check_len("embedding out", out.len(), rows * c)?;
    if let Some(wpe) = wpe {
        check_len("position table", wpe.len(), seq * c)?;
    }
    let name = format!("embedding_fwd_{}", T::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let (rows32, seq32, c32) = (u32_of("rows", rows)?, seq as u32, u32_of("width", c)?);
    let null: u64 = 0;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&tokens).arg(&wte);
    match wpe {
        Some(p) => b.arg(p),
        // A null `const float*`: the kernel then adds no positions.
        None => b.arg(&null),
    };
    b.arg(&rows32).arg(&seq32).arg(&c32);
    // SAFETY: rows*c outputs; tokens index rows of wte (the caller's tokens are < vocab, as on
    // CPU, where an out-of-range token panics on the slice index).
    launched(&name, unsafe { b.launch(elementwise(rows * c)) }.map(|_| ()))
}

/// `dwte[tokens[r]] += dout[r]` and `dwpe[r % seq] += dout[r]`. `tokens` are the host copy: the
/// rows are bucketed by token here (a counting sort) so the device sums each vocabulary row in
/// row order, with no atomics.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward<T: Storage>(
    gpu: &Gpu,
    dwte: &mut impl Out<f32>,
    dwpe: Option<&mut CudaViewMut<'_, f32>>,
    dout: &impl In<T>,
    tokens: &[u32],
    seq: usize,
    c: usize,
) -> Result<()> {
    let mut dwte = dwte.view_mut();
    let dout = dout.view();
    let vocab = dwte.len() / c;
    let rows = tokens.len();
    check_len("embedding dout", dout.len(), rows * c)?;
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Shape(format!("token {bad} is outside the vocabulary of {vocab}")));
    }
    let mut starts = vec![0u32; vocab + 1];
    for &t in tokens {
        starts[t as usize + 1] += 1;
    }
    for v in 0..vocab {
        starts[v + 1] += starts[v];
    }
    let mut fill = starts.clone();
    let mut order = vec![0u32; rows];
    for (r, &t) in tokens.iter().enumerate() {
        order[fill[t as usize] as usize] = r as u32;
        fill[t as usize] += 1;
    }
    let s = gpu.stream();
    let order_d = s.clone_htod(&order).map_err(|e| Error::cuda("uploading token order", e))?;
    let starts_d = s.clone_htod(&starts).map_err(|e| Error::cuda("uploading token order", e))?;
    let name = format!("embedding_bwd_wte_{}", T::SUFFIX);
    let f = gpu.function("embedding", &name)?;
    let c32 = u32_of("width", c)?;
    let cfg = LaunchConfig {
        grid_dim: (u32_of("vocab", vocab)?, c.div_ceil(THREADS as usize) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = s.launch_builder(&f);
    b.arg(&mut dwte).arg(&dout).arg(&order_d).arg(&starts_d).arg(&c32);
    // SAFETY: one thread per (vocab row, column); order/starts built above from valid tokens.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;
    if let Some(dwpe) = dwpe {
        check_len("position gradient", dwpe.len(), seq * c)?;
        let name = format!("embedding_bwd_wpe_{}", T::SUFFIX);
        let f = gpu.function("embedding", &name)?;
        let (rows32, seq32) = (u32_of("rows", rows)?, seq as u32);
        let mut b = s.launch_builder(&f);
        b.arg(dwpe).arg(&dout).arg(&rows32).arg(&seq32).arg(&c32);
        // SAFETY: seq*c outputs; rows*c elements of dout, checked above.
        launched(&name, unsafe { b.launch(elementwise(seq * c)) }.map(|_| ()))?;
    }
    Ok(())
}

/// Summed loss (nats) of the rows of `logits` (`[rows, vocab]`) against `targets`. With
/// `grad_scale = Some(s)`, overwrites `logits` with `s * (softmax - onehot)`.
pub fn softmax_xent<T: Storage>(
    gpu: &Gpu,
    logits: &mut impl Out<T>,
    targets: &impl In<u32>,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<f64> {
    let rows = targets.view().len();
    let mut losses = gpu.stream().alloc_zeros::<f32>(rows.max(1)).map_err(|e| Error::cuda("allocating losses", e))?;
    softmax_xent_rows(gpu, logits, targets, &mut losses, vocab, grad_scale)?;
    let host = gpu.stream().clone_dtoh(&losses).map_err(|e| Error::cuda("copying losses", e))?;
    Ok(host[..rows].iter().map(|&l| l as f64).sum())
}

/// As [`softmax_xent`], leaving each row's loss in `losses` on the device instead of summing
/// them on the host: no synchronisation, so a caller looping over blocks of rows keeps the GPU
/// busy and reads all the losses once.
pub fn softmax_xent_rows<T: Storage>(
    gpu: &Gpu,
    logits: &mut impl Out<T>,
    targets: &impl In<u32>,
    losses: &mut impl Out<f32>,
    vocab: usize,
    grad_scale: Option<f32>,
) -> Result<()> {
    let mut logits = logits.view_mut();
    let targets = targets.view();
    let mut losses = losses.view_mut();
    let rows = targets.len();
    check_len("logits", logits.len(), rows * vocab)?;
    check_len("losses", losses.len(), rows)?;
    let name = format!("softmax_xent_{}", T::SUFFIX);
    let f = gpu.function("cross_entropy", &name)?;
    let (vocab32, scale, write) = (u32_of("vocab", vocab)?, grad_scale.unwrap_or(0.0), grad_scale.is_some() as i32);
    let cfg = LaunchConfig { grid_dim: (u32_of("rows", rows)?, 1, 1), block_dim: (1024.min(row_block(vocab)), 1, 1), shared_mem_bytes: 0 };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut logits).arg(&mut losses).arg(&targets).arg(&vocab32).arg(&scale).arg(&write);
    // SAFETY: one block per row of vocab, one loss per row; targets are checked < vocab by the
    // data loader, as on CPU.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

struct AdamScalars {
    shrink: f32,
    step_size: f32,
    bc2_sqrt: f32,
}

/// The step's scalars, computed in f64 exactly as the CPU kernel computes them.
fn adam_scalars(hp: &AdamWStep, decay: bool) -> AdamScalars {
    let wd = if decay { hp.weight_decay } else { 0.0 };
    let bc1 = 1.0 - (hp.beta1 as f64).powi(hp.step as i32);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(hp.step as i32);
    AdamScalars { shrink: 1.0 - hp.lr * wd, step_size: (hp.lr as f64 / bc1) as f32, bc2_sqrt: bc2.sqrt() as f32 }
}

/// Updates `p`, `m`, `v` in place from `g`.
pub fn adamw_update(
    gpu: &Gpu,
    p: &mut impl Out<f32>,
    g: &impl In<f32>,
    m: &mut impl Out<f32>,
    v: &mut impl Out<f32>,
    hp: &AdamWStep,
    decay: bool,
) -> Result<()> {
    let mut p = p.view_mut();
    let mut m = m.view_mut();
    let mut v = v.view_mut();
    let g = g.view();
    let n = p.len();
    for (what, len) in [("adamw grad", g.len()), ("adamw m", m.len()), ("adamw v", v.len())] {
        check_len(what, len, n)?;
    }
    let sc = adam_scalars(hp, decay);
    let f = gpu.function("adamw", "adamw_f32")?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut p)
        .arg(&g)
        .arg(&mut m)
        .arg(&mut v)
        .arg(&n64)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&hp.eps)
        .arg(&sc.shrink)
        .arg(&sc.step_size)
        .arg(&sc.bc2_sqrt);
    // SAFETY: n elements of four buffers holding at least n.
    launched("adamw_f32", unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// As [`adamw_update`], also writing the updated parameters into the 16-bit working copy.
#[allow(clippy::too_many_arguments)]
pub fn adamw_update_copy<T: Storage>(
    gpu: &Gpu,
    p: &mut impl Out<f32>,
    p_copy: &mut impl Out<T>,
    g: &impl In<f32>,
    m: &mut impl Out<f32>,
    v: &mut impl Out<f32>,
    hp: &AdamWStep,
    decay: bool,
) -> Result<()> {
    let mut p = p.view_mut();
    let mut p_copy = p_copy.view_mut();
    let mut m = m.view_mut();
    let mut v = v.view_mut();
    let g = g.view();
    let n = p.len();
    for (what, len) in [("adamw copy", p_copy.len()), ("adamw grad", g.len()), ("adamw m", m.len()), ("adamw v", v.len())] {
        check_len(what, len, n)?;
    }
    if T::SUFFIX == "f32" {
        return Err(Error::Shape("adamw_update_copy keeps a 16-bit copy; use adamw_update for f32".into()));
    }
    let sc = adam_scalars(hp, decay);
    let name = format!("adamw_copy_{}", T::SUFFIX);
    let f = gpu.function("adamw", &name)?;
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut p)
        .arg(&mut p_copy)
        .arg(&g)
        .arg(&mut m)
        .arg(&mut v)
        .arg(&n64)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&hp.eps)
        .arg(&sc.shrink)
        .arg(&sc.step_size)
        .arg(&sc.bc2_sqrt);
    // SAFETY: n elements of five buffers holding at least n.
    launched(&name, unsafe { b.launch(elementwise(n)) }.map(|_| ()))
}

/// Head dimensions the attention kernels support (their per-lane accumulators are sized for it).
pub const ATTENTION_MAX_DIM: usize = 128;
const Q_ROWS: usize = 16;
const K_ROWS: usize = 8;
const TILE: usize = 32;

fn attention_check(s: &AttnShape, qkv: usize, out: usize, lse: usize) -> Result<()> {
    if s.dim == 0 || s.dim > ATTENTION_MAX_DIM {
        return Err(Error::Shape(format!("attention: head dimension {} is outside 1..={ATTENTION_MAX_DIM}", s.dim)));
    }
    if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(Error::Shape(format!("attention: {} heads are not a multiple of {} key/value heads", s.heads, s.kv_heads)));
    }
    let rows = s.batch * s.seq;
    check_len("attention qkv", qkv, rows * s.qkv_width())?;
    check_len("attention out", out, rows * s.out_width())?;
    check_len("attention lse", lse, rows * s.heads)
}

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED_MEM: u32 = 48 * 1024;

/// Raises `f`'s dynamic shared-memory limit to `bytes` where that is above the 48 KiB default (the
/// attention backward's dq kernel needs 49.5 KiB at dim 128); without it the launch fails.
fn allow_shared_mem(gpu: &Gpu, f: &CudaFunction, name: &str, bytes: u32) -> Result<()> {
    if bytes <= DEFAULT_SHARED_MEM {
        return Ok(());
    }
    gpu.context().bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
    f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
        .map_err(|e| Error::cuda(format!("allowing {bytes} bytes of shared memory for {name}"), e))
}

fn shape_args(s: &AttnShape) -> Result<[u32; 5]> {
    Ok([u32_of("batch", s.batch)?, u32_of("seq", s.seq)?, s.heads as u32, s.kv_heads as u32, s.dim as u32])
}

/// `out = softmax(q kᵀ / √dim + causal mask) v` per head; `lse` receives each row's log-sum-exp.
pub fn attention_forward<T: Storage>(
    gpu: &Gpu,
    s: AttnShape,
    qkv: &impl In<T>,
    out: &mut impl Out<T>,
    lse: &mut impl Out<f32>,
) -> Result<()> {
    let mut out = out.view_mut();
    let mut lse = lse.view_mut();
    let qkv = qkv.view();
    attention_check(&s, qkv.len(), out.len(), lse.len())?;
    let name = format!("attention_fwd_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let [batch, seq, heads, kv_heads, dim] = shape_args(&s)?;
    let scale = 1.0 / (s.dim as f32).sqrt();
    let smem = ((Q_ROWS + 2 * TILE) * (s.dim + 1) * 4) as u32;
    allow_shared_mem(gpu, &f, &name, smem)?;
    let cfg = LaunchConfig { grid_dim: (s.seq.div_ceil(Q_ROWS) as u32, heads, batch), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&mut out).arg(&mut lse).arg(&qkv).arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
    // SAFETY: sizes checked by attention_check; shared memory sized for the tiles at this dim.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Writes `dqkv` (same layout as `qkv`) from the output gradient `dout`, recomputing the
/// probabilities from `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Storage>(
    gpu: &Gpu,
    s: AttnShape,
    qkv: &impl In<T>,
    out: &impl In<T>,
    lse: &impl In<f32>,
    dout: &impl In<T>,
    dqkv: &mut impl Out<T>,
) -> Result<()> {
    let mut dqkv = dqkv.view_mut();
    let qkv = qkv.view();
    let out = out.view();
    let lse = lse.view();
    let dout = dout.view();
    attention_check(&s, qkv.len(), out.len(), lse.len())?;
    check_len("attention dout", dout.len(), s.batch * s.seq * s.out_width())?;
    check_len("attention dqkv", dqkv.len(), qkv.len())?;
    let [batch, seq, heads, kv_heads, dim] = shape_args(&s)?;
    let rows = s.batch * s.seq;
    let scale = 1.0 / (s.dim as f32).sqrt();
    let stream = gpu.stream();
    let mut delta = stream.alloc_zeros::<f32>(rows * s.heads).map_err(|e| Error::cuda("allocating attention delta", e))?;

    let name = format!("attention_bwd_delta_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let rows32 = u32_of("rows", rows)?;
    let warps = rows * s.heads;
    let cfg =
        LaunchConfig { grid_dim: ((warps * 32).div_ceil(THREADS as usize) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut delta).arg(&out).arg(&dout).arg(&rows32).arg(&heads).arg(&dim);
    // SAFETY: one warp per (row, head); sizes checked above.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let name = format!("attention_bwd_dq_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let smem = ((2 * Q_ROWS + 2 * TILE) * (s.dim + 1) * 4) as u32;
    allow_shared_mem(gpu, &f, &name, smem)?;
    let cfg = LaunchConfig { grid_dim: (s.seq.div_ceil(Q_ROWS) as u32, heads, batch), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dqkv).arg(&qkv).arg(&dout).arg(&lse).arg(&delta).arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
    // SAFETY: as the forward; writes only the query columns of dqkv.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))?;

    let name = format!("attention_bwd_dkv_{}", T::SUFFIX);
    let f = gpu.function("attention", &name)?;
    let smem = (((2 * K_ROWS + 2 * TILE) * (s.dim + 1) + 2 * TILE) * 4) as u32;
    allow_shared_mem(gpu, &f, &name, smem)?;
    let cfg = LaunchConfig { grid_dim: (s.seq.div_ceil(K_ROWS) as u32, kv_heads, batch), block_dim: (128, 1, 1), shared_mem_bytes: smem };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut dqkv).arg(&qkv).arg(&dout).arg(&lse).arg(&delta).arg(&batch).arg(&seq).arg(&heads).arg(&kv_heads).arg(&dim).arg(&scale);
    // SAFETY: writes only the key and value columns of dqkv.
    launched(&name, unsafe { b.launch(cfg) }.map(|_| ()))
}

/// Leading dimensions (row strides, in elements) of the three matrices of a row-major product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl Strides {
    /// Packed matrices: each row stride is its stored width.
    pub fn packed(m: usize, k: usize, n: usize, ta: bool, tb: bool) -> Self {
        Strides { a: if ta { m } else { k }, b: if tb { k } else { n }, c: n }
    }
}

/// Row-major `c = op(a) · op(b)` (`c` is `[m, n]`; `a` is `[m, k]`, or `[k, m]` when `ta`; `b` is
/// `[k, n]`, or `[n, k]` when `tb`), through cuBLASLt with f32 accumulation; `accumulate` adds to
/// `c` instead of overwriting it. f32 inputs use TF32 tensor cores (cuBLASLt's fast-TF32 compute
/// type), as PyTorch does with `allow_tf32`; bf16 and f16 inputs accumulate in f32.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Storage>(
    gpu: &Gpu,
    c: &mut impl Out<T>,
    a: &impl In<T>,
    b: &impl In<T>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    accumulate: bool,
) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: Matmul<T>,
{
    matmul_strided(gpu, c, a, b, m, k, n, ta, tb, Strides::packed(m, k, n, ta, tb), accumulate)
}

/// As [`matmul`], with row strides: each matrix may be a column block of a wider buffer (LLaMA's
/// q, k and v projections write into one fused buffer).
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided<T: Storage>(
    gpu: &Gpu,
    c: &mut impl Out<T>,
    a: &impl In<T>,
    b: &impl In<T>,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    ld: Strides,
    accumulate: bool,
) -> Result<()>
where
    cudarc::cublaslt::CudaBlasLT: Matmul<T>,
{
    let mut c = c.view_mut();
    let a = a.view();
    let b = b.view();
    let stored = |rows: usize, cols: usize, stride: usize| if rows == 0 { 0 } else { (rows - 1) * stride + cols };
    let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
    if ld.a < a_cols || ld.b < b_cols || ld.c < n {
        return Err(Error::Shape(format!("matmul: row strides {ld:?} narrower than the matrices")));
    }
    check_len("matmul a", a.len(), stored(a_rows, a_cols, ld.a))?;
    check_len("matmul b", b.len(), stored(b_rows, b_cols, ld.b))?;
    check_len("matmul c", c.len(), stored(m, n, ld.c))?;
    let blas = gpu.blas()?;
    // cuBLASLt is column-major: a row-major [r, c] matrix is a column-major [c, r] one, so the
    // row-major product C = A·B is computed as the column-major Cᵀ = Bᵀ·Aᵀ.
    let cfg = MatmulConfig {
        transa: tb,
        transb: ta,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: ld.b as i64,
        ldb: ld.a as i64,
        beta: if accumulate { 1.0 } else { 0.0 },
        ldc: ld.c as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    // SAFETY: the three buffers hold the sizes checked above for these dimensions.
    unsafe { blas.matmul(cfg, &b, &a, &mut c, None, None) }.map_err(|e| Error::cuda("cuBLASLt matmul", format!("{e:?}")))
}
