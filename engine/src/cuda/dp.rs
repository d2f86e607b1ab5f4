//! Data parallelism between GPU ranks: what the one-GPU trainer step adds when the job spans a dp
//! group. The layout is the CPU ranks' (see `parallel::dp`): the same chunks, and under ZeRO-1 the
//! same pieces of each chunk per rank, so checkpoints are interchangeable between CPU and GPU
//! runs.
//!
//! - **DDP (ZeRO-0):** after the last micro-batch's backward, the gradient buffer is summed across
//!   the group in one all-reduce; every rank then updates the whole model.
//! - **ZeRO-1:** each chunk of the gradients is reduce-scattered instead (one NCCL group for all
//!   chunks), AdamW's moments and update exist only for this rank's pieces, and an all-gather of
//!   each chunk brings back the updated f32 parameters.
//!
//! The bulk data goes over NCCL (`parallel.gpu_comm = "nccl"`), or through host memory over the
//! dp group's socket communicator (`"host"`); the scalars (loss, gradient norm, fp16 overflow) go
//! over the socket communicator either way, in f64, so they are the same bits on every rank.
//!
//! Not built yet: overlapping the gradient collectives with backward (as the CPU ranks do), and
//! ZeRO-2/3, which need the GPU model to announce finished gradients and to ask for parameters.

use std::time::Instant;

use gantry_kernels::cuda::cudarc::driver::CudaSlice;
use gantry_kernels::cuda::Gpu;

use crate::comm::{NcclComm, ReduceOp};
use crate::parallel::DataParallel;
use crate::{Error, Result};

/// One step's view of a GPU rank's dp group: the group (scalars, layout, host-staged bulk data),
/// and NCCL when the job uses it.
pub struct GpuDp<'a> {
    pub dp: &'a mut DataParallel,
    pub nccl: Option<&'a mut NcclComm>,
}

impl std::fmt::Debug for GpuDp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDp").field("dp", &self.dp).field("nccl", &self.nccl.is_some()).finish()
    }
}

fn dev(what: &'static str) -> impl Fn(gantry_kernels::cuda::cudarc::driver::DriverError) -> Error {
    move |e| Error::Device(format!("{what}: {e}"))
}

impl GpuDp<'_> {
    pub fn size(&self) -> usize {
        self.dp.size()
    }

    pub fn zero(&self) -> u8 {
        self.dp.zero()
    }

    /// The group's sum of a per-rank value.
    pub fn sum(&mut self, x: f64) -> Result<f64> {
        self.dp.sum(x)
    }

    /// After the last micro-batch's backward: ZeRO-0 sums every gradient across the group; ZeRO-1
    /// sums each chunk's pieces into their owners (this rank's pieces hold the group's sum; the
    /// rest of the buffer is scratch).
    pub fn reduce_grads(&mut self, gpu: &Gpu, grads: &mut CudaSlice<f32>) -> Result<()> {
        let start = Instant::now();
        let sharded = self.dp.zero() >= 1;
        match &mut self.nccl {
            Some(nccl) if sharded => nccl.reduce_scatter_chunks(grads, self.dp.chunks())?,
            Some(nccl) => nccl.all_reduce(grads, ReduceOp::Sum)?,
            None => {
                let host = gpu.stream().clone_dtoh(grads).map_err(dev("copying gradients to the host"))?;
                let summed = if sharded { self.dp.reduce_scatter_vec(host)? } else { self.dp.all_reduce_vec(host)? };
                gpu.stream().memcpy_htod(&summed, grads).map_err(dev("copying gradients to the GPU"))?;
            }
        }
        self.dp.record_comm(start.elapsed(), true);
        Ok(())
    }

    /// ZeRO-1, after this rank updated its pieces of `params`: every chunk gathered from the
    /// pieces' owners.
    pub fn gather_params(&mut self, gpu: &Gpu, params: &mut CudaSlice<f32>) -> Result<()> {
        let start = Instant::now();
        match &mut self.nccl {
            Some(nccl) => nccl.all_gather_chunks(params, self.dp.chunks())?,
            None => {
                let host = gpu.stream().clone_dtoh(params).map_err(dev("copying parameters to the host"))?;
                let full = self.dp.all_gather_vec(host)?;
                gpu.stream().memcpy_htod(&full, params).map_err(dev("copying parameters to the GPU"))?;
            }
        }
        self.dp.record_comm(start.elapsed(), false);
        Ok(())
    }
}
