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

mod adamw;
mod attention;
mod embedding;
mod loss;
mod matmul;
mod norm;
mod pointwise;

pub use adamw::*;
pub use attention::*;
pub use embedding::*;
pub use loss::*;
pub use matmul::*;
pub use norm::*;
pub use pointwise::*;

/// A storage type the kernels are instantiated for.
///
/// # Safety
///
/// The launchers pick a kernel by `SUFFIX` and pass it the buffer's length in elements of `Self`:
/// the kernel's element type (`float`, `__nv_bfloat16`, `__half`) must have the size and layout
/// of `Self`, or the kernel reads and writes outside the buffer. Only the three types below
/// qualify.
pub unsafe trait Storage: DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + Send + Sync + 'static {
    /// The kernel-name suffix: `gelu_fwd_` + `SUFFIX`.
    const SUFFIX: &'static str;
}

// SAFETY: the `_f32` kernels take `float`, 4 bytes, as f32 is.
unsafe impl Storage for f32 {
    const SUFFIX: &'static str = "f32";
}

// SAFETY: the `_bf16` kernels take `__nv_bfloat16`, 2 bytes, the bit layout of `half::bf16`.
unsafe impl Storage for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

// SAFETY: the `_f16` kernels take `__half`, 2 bytes, the IEEE binary16 layout of `half::f16`.
unsafe impl Storage for half::f16 {
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

/// Threads of a one-block-per-row kernel: enough for the row, a multiple of 32, at most 1024.
fn row_block(c: usize) -> u32 {
    // One block per row; enough threads for the row, a multiple of 32, at most 1024.
    (c.div_ceil(32) * 32).clamp(32, 1024) as u32
}
