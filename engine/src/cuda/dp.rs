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
//! Over NCCL the gradient collectives overlap backward, as on the CPU ranks: the one model
//! announces each gradient final through the same hooks on both backends, and `GradOverlap`
//! queues each chunk's all-reduce (ZeRO-0) or reduce-scatter (ZeRO-1) on a side stream as soon as
//! the chunk is complete, while backward goes on on the compute stream. The host-staged path
//! (`"host"`) communicates the whole buffer after backward.
//!
//! Not built yet: ZeRO-2/3 on GPUs, which need the gradients and parameters held per chunk on
//! the device (one allocation per chunk, released as the CPU ranks release pages).

use std::ops::Range;
use std::time::Instant;

use gantry_kernels::cuda::cudarc::cublaslt::{CudaBlasLT, Matmul};
use gantry_kernels::cuda::cudarc::driver::CudaSlice;
use gantry_kernels::cuda::ops::Storage;
use gantry_kernels::cuda::Gpu;

use gantry_kernels::cuda::cudarc::driver::CudaEvent;
use gantry_kernels::cuda::ops;

use crate::backend::{Cuda, Weights};
use crate::comm::{NcclComm, ReduceOp};
use crate::models::hooks::Params;
use crate::models::{Activations, Model};
use crate::parallel::{DataParallel, FinalGrads};
use crate::train::step::{Layout, State};
use crate::train::update::{self, LossScale, Outcome, Summed, Update};
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

    /// Whether the gradient collectives can overlap backward (over NCCL).
    pub fn overlaps(&self) -> bool {
        self.nccl.is_some()
    }

    /// The model's parameter hooks for the last micro-batch's backward: each chunk's collective
    /// queued as soon as its gradients are final. `finish` waits for them, in place of
    /// `reduce_grads`.
    pub fn overlap<'b, T: Storage>(&'b mut self, gpu: &Gpu, weights: Weights<'b, Cuda<T>>) -> Result<GradOverlap<'b, T>>
    where
        CudaBlasLT: Matmul<T>,
    {
        let sharded = self.dp.zero() >= 1;
        let finals = FinalGrads::new(self.dp.chunks().to_vec());
        let nccl = self.nccl.as_deref_mut().ok_or_else(|| Error::Comm { rank: None, message: "overlap needs NCCL".into() })?;
        nccl.defer(gpu.stream())?;
        Ok(GradOverlap { weights, nccl, finals, sharded, started: Instant::now() })
    }

    /// Counts the time `finish` waited for the overlapped gradient collectives.
    pub fn record_overlap(&mut self, waited: std::time::Duration) {
        self.dp.record_comm(waited, true);
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

/// The hooks of a GPU rank's last backward of a step (see `GpuDp::overlap`): parameters are all
/// present (ZeRO-0 and 1); a chunk whose gradients are all final is summed across the group on
/// NCCL's side stream while backward computes the next.
pub struct GradOverlap<'a, T: Storage>
where
    CudaBlasLT: Matmul<T>,
{
    weights: Weights<'a, Cuda<T>>,
    nccl: &'a mut NcclComm,
    /// Which chunks this backward has finished.
    finals: FinalGrads,
    /// ZeRO-1: reduce-scatter (each rank's pieces get the sums) instead of all-reduce.
    sharded: bool,
    started: Instant,
}

impl<T: Storage> GradOverlap<'_, T>
where
    CudaBlasLT: Matmul<T>,
{
    /// After backward: waits for every queued collective, and returns how long the wait took
    /// (the communication backward did not hide). Every gradient must have been announced.
    pub fn finish(self) -> Result<std::time::Duration> {
        let start = Instant::now();
        let queued = self.nccl.wait_deferred()?;
        self.finals.check_all_final()?;
        tracing::trace!(collectives = queued, backward_ms = self.started.elapsed().as_secs_f64() * 1e3, "gradient collectives overlapped");
        Ok(start.elapsed())
    }
}

impl<T: Storage> Drop for GradOverlap<'_, T>
where
    CudaBlasLT: Matmul<T>,
{
    /// A backward that failed part way: its queued collectives are waited for (or time out) so
    /// the gradient buffer is not freed under them and the communicator leaves deferred mode.
    fn drop(&mut self) {
        let _ = self.nccl.wait_deferred();
    }
}

impl<T: Storage> Params<Cuda<T>> for GradOverlap<'_, T>
where
    CudaBlasLT: Matmul<T>,
{
    fn need(&mut self, _: &[Range<usize>]) -> Result<()> {
        Ok(())
    }

    fn get(&self) -> Weights<'_, Cuda<T>> {
        self.weights
    }

    fn grads_ready(&mut self, grads: &mut CudaSlice<f32>, range: Range<usize>) -> Result<()> {
        for c in self.finals.announce(&range)? {
            let chunk = self.finals.chunks()[c].clone();
            if self.sharded {
                self.nccl.reduce_scatter_chunks(grads, std::slice::from_ref(&chunk))?;
            } else {
                self.nccl.all_reduce(&mut grads.slice_mut(chunk), ReduceOp::Sum)?;
            }
        }
        Ok(())
    }
}

/// A GPU rank's layout for the one step (`train::step`): its dp group when it has one, and the
/// state copy to the host that the update, which overwrites the state, must wait for.
pub struct GpuLayout<'a> {
    pub dp: Option<GpuDp<'a>>,
    /// Recorded on the copy stream after a download (see `GpuTrainer::begin_download`); taken
    /// only by the update, so a step that fails before it leaves the event for the next one.
    pub copy_done: &'a mut Option<CudaEvent>,
}

impl GpuLayout<'_> {
    /// ZeRO-1: the rank holds the group's sums and the moments of its pieces only.
    fn sharded(&self) -> bool {
        self.dp.as_ref().is_some_and(|d| d.zero() >= 1)
    }
}

impl<T: Storage> Layout<Cuda<T>> for GpuLayout<'_>
where
    CudaBlasLT: Matmul<T>,
{
    /// Over NCCL the last micro-batch's backward hands each chunk of gradients to its collective
    /// as soon as it is final (`GpuDp::overlap`); otherwise the whole buffer is communicated
    /// after backward.
    fn forward_backward(
        &mut self,
        be: &Cuda<T>,
        model: &Model,
        st: &mut State<'_, Cuda<T>>,
        acts: &mut Activations<Cuda<T>>,
        windows: &[u32],
        scale: f32,
        k: usize,
        n: usize,
    ) -> Result<f64> {
        let last = k + 1 == n;
        let w = State::weights(be, st.params, st.work.as_deref())?;
        match &mut self.dp {
            Some(d) if d.overlaps() && last => {
                let mut hooks = d.overlap(be.gpu(), w)?;
                let loss = model.forward_backward_on(be, &mut hooks, st.grads, acts, windows, scale)?;
                let waited = hooks.finish()?;
                d.record_overlap(waited);
                Ok(loss)
            }
            dp => {
                let loss = model.forward_backward_on(be, &mut { w }, st.grads, acts, windows, scale)?;
                if let (Some(d), true) = (dp, last) {
                    d.reduce_grads(be.gpu(), st.grads)?;
                }
                Ok(loss)
            }
        }
    }

    fn sum(&mut self, x: f64) -> Result<f64> {
        match &mut self.dp {
            Some(d) => d.sum(x),
            None => Ok(x),
        }
    }

    /// Under ZeRO-1 only this rank's pieces hold summed gradients (the rest is scratch, holding
    /// this rank's own or partial sums): the norm and fp16's overflow check read the pieces, and
    /// the group agrees on both. The working copy is written in the same pass, unless the
    /// parameters are gathered afterwards (then it is cast from them once, in `after_update`).
    fn update(&mut self, be: &Cuda<T>, u: &Update<'_>, st: &mut State<'_, Cuda<T>>, scaler: Option<&mut LossScale>) -> Result<Outcome> {
        if let Some(done) = self.copy_done.take() {
            be.gpu().stream().wait(&done).map_err(|e| Error::Device(format!("waiting for the state copy: {e}")))?;
        }
        let sharded = self.sharded();
        let summed = Summed::Full { grads: &mut *st.grads, norm: st.pieces };
        let work = if sharded { None } else { st.work.as_deref_mut() };
        let mut sum = |x: f64| match &mut self.dp {
            Some(d) => d.sum(x),
            None => Ok(x),
        };
        let group: Option<&mut dyn FnMut(f64) -> Result<f64>> = if sharded { Some(&mut sum) } else { None };
        update::apply(be, u, st.params, work, summed, st.m, st.v, group, scaler)
    }

    /// ZeRO-1, after this rank updated its pieces: every chunk gathered from its owners, and the
    /// working copy cast from the result.
    fn after_update(&mut self, be: &Cuda<T>, st: &mut State<'_, Cuda<T>>, applied: bool) -> Result<()> {
        if !applied || !self.sharded() {
            return Ok(());
        }
        if let Some(d) = &mut self.dp {
            d.gather_params(be.gpu(), st.params)?;
        }
        if let Some(wk) = st.work.as_deref_mut() {
            ops::cast_from_f32(be.gpu(), wk, &*st.params)?;
        }
        Ok(())
    }
}
